//! The back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): messages we send to the front-end.
//!
//! The front-end hands us one end of a socket pair with SET_BACKEND_REQ_FD. Sending must never
//! happen on the thread that serves the front-end's own socket: QEMU answers a config-change
//! message by sending GET_CONFIG there and waiting for the answer before it acknowledges. So
//! the channel is shared ([`BackendChannel`] is cheap to clone) and used from other threads; a
//! front-end that never acknowledges costs the sender at most [`ACK_TIMEOUT`].

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// How long a send or an acknowledgement may take.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a message could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The front-end gave us no channel (it did not negotiate BACKEND_REQ, or has not sent
    /// SET_BACKEND_REQ_FD yet).
    #[error("the front-end has no back-end channel")]
    NoChannel,
    /// Sending failed, timed out, or the front-end refused the message.
    #[error("back-end channel: {0}")]
    Failed(std::io::Error),
}

/// The channel to the front-end of the current connection, if it gave us one.
#[derive(Clone, Default)]
pub struct BackendChannel {
    inner: Arc<Mutex<Option<Backend>>>,
}

impl BackendChannel {
    /// Takes the channel the front-end sent (replacing any earlier one). `reply_ack`: the
    /// front-end negotiated REPLY_ACK, so messages ask for, and wait for, an acknowledgement.
    pub fn set(&self, backend: Backend, reply_ack: bool) {
        let timeout = libc::timeval {
            tv_sec: ACK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        let fd = backend.as_raw_fd();
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt on an open socket with a timeval of the size given.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
        }
        backend.set_reply_ack_flag(reply_ack);
        *self.lock() = Some(backend);
    }

    /// Forgets the channel (the connection ended).
    pub fn clear(&self) {
        if let Some(b) = self.lock().take() {
            b.set_failed(libc::ENOTCONN);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Backend>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the front-end that the configuration space changed
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), e.g. the capacity after a resize. Blocks until
    /// the front-end acknowledged it (with REPLY_ACK) or [`ACK_TIMEOUT`]: never call it from the
    /// thread serving the front-end's socket.
    pub fn config_changed(&self) -> Result<(), ChannelError> {
        let backend = self.lock().clone().ok_or(ChannelError::NoChannel)?;
        match backend.handle_config_change() {
            Ok(_) => Ok(()),
            Err(e) => {
                // A timed-out exchange leaves the stream out of step: no later message on it can
                // be trusted.
                backend.set_failed(libc::EIO);
                Err(ChannelError::Failed(e))
            }
        }
    }
}
