//! The back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): messages we send to the front-end.
//!
//! The front-end hands us one end of a socket pair with SET_BACKEND_REQ_FD. Sending must never
//! happen on the thread that serves the front-end's own socket: QEMU answers a config-change
//! message by sending GET_CONFIG there and waiting for the answer before it acknowledges. So
//! the channel is shared ([`BackendChannel`] is cheap to clone) and used from other threads.
//! A front-end that never acknowledges costs the sender at most the channel's timeout
//! ([`ACK_TIMEOUT`]): the exchange runs on a thread of its own, which the sender unblocks by
//! shutting the socket down (vhost's message layer retries timed-out reads forever, so socket
//! timeouts cannot do it).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// How long a message and its acknowledgement may take.
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
#[derive(Clone)]
pub struct BackendChannel {
    inner: Arc<Mutex<Option<Backend>>>,
    timeout: Duration,
}

impl Default for BackendChannel {
    fn default() -> Self {
        Self::with_timeout(ACK_TIMEOUT)
    }
}

impl BackendChannel {
    /// A channel whose messages may take `timeout` each, acknowledgement included.
    pub fn with_timeout(timeout: Duration) -> Self {
        BackendChannel {
            inner: Default::default(),
            timeout,
        }
    }

    /// Takes the channel the front-end sent (replacing any earlier one). `reply_ack`: the
    /// front-end negotiated REPLY_ACK, so messages ask for, and wait for, an acknowledgement.
    pub fn set(&self, backend: Backend, reply_ack: bool) {
        backend.set_reply_ack_flag(reply_ack);
        if let Some(old) = self.lock().replace(backend) {
            old.set_failed(libc::ENOTCONN);
        }
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
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), e.g. the capacity after a resize. Returns once the
    /// front-end acknowledged it (with REPLY_ACK; once sent otherwise), or after the timeout:
    /// never call it from the thread serving the front-end's socket.
    pub fn config_changed(&self) -> Result<(), ChannelError> {
        let backend = self.lock().clone().ok_or(ChannelError::NoChannel)?;
        // Keeps the socket open (and its number ours) until we are done with it below.
        let held = backend.clone();
        let fd: RawFd = held.as_raw_fd();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("backend-channel".into())
            .spawn(move || {
                let _ = tx.send(backend.handle_config_change());
            })
            .map_err(ChannelError::Failed)?;
        let error = match rx.recv_timeout(self.timeout) {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => {
                // Unblocks the exchange's thread (its read or write returns).
                // SAFETY: `held` keeps the descriptor open; shutdown has no memory effects.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the front-end did not acknowledge",
                )
            }
        };
        // A failed exchange leaves the stream out of step: no later message on it can be trusted.
        held.set_failed(libc::EIO);
        Err(ChannelError::Failed(error))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    /// The message header the front-end reads: request code, flags, payload size.
    fn read_header(peer: &mut UnixStream) -> (u32, u32, u32) {
        let mut h = [0u8; 12];
        peer.read_exact(&mut h).unwrap();
        let word = |i: usize| u32::from_le_bytes(h[4 * i..4 * i + 4].try_into().unwrap());
        (word(0), word(1), word(2))
    }

    fn channel(reply_ack: bool, timeout: Duration) -> (BackendChannel, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let c = BackendChannel::with_timeout(timeout);
        c.set(Backend::from_stream(ours), reply_ack);
        (c, peer)
    }

    #[test]
    fn config_change_is_sent_and_acknowledged() {
        let (c, mut peer) = channel(true, ACK_TIMEOUT);
        let front = std::thread::spawn(move || {
            let hdr = read_header(&mut peer);
            // Acknowledge: the same code, REPLY and version 1, a u64 0.
            let mut reply = Vec::new();
            reply.extend_from_slice(&2u32.to_le_bytes());
            reply.extend_from_slice(&0x5u32.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            peer.write_all(&reply).unwrap();
            (hdr, peer)
        });
        c.config_changed().unwrap();
        let (hdr, _peer) = front.join().unwrap();
        // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, version 1 with NEED_REPLY, no payload.
        assert_eq!(hdr, (2, 0x1 | 0x8, 0));
    }

    #[test]
    fn without_reply_ack_nothing_is_awaited() {
        let (c, mut peer) = channel(false, ACK_TIMEOUT);
        c.config_changed().unwrap();
        assert_eq!(read_header(&mut peer), (2, 0x1, 0));
    }

    #[test]
    fn a_refusal_or_silence_is_an_error_and_no_channel_is_said() {
        let (c, mut peer) = channel(true, Duration::from_millis(200));
        let t = std::time::Instant::now();
        assert!(matches!(c.config_changed(), Err(ChannelError::Failed(_))));
        assert!(t.elapsed() < Duration::from_secs(2));
        let _ = read_header(&mut peer);
        // A channel that failed stays failed: its stream may be out of step.
        assert!(c.config_changed().is_err());
        c.clear();
        assert!(matches!(c.config_changed(), Err(ChannelError::NoChannel)));
        assert!(matches!(
            BackendChannel::default().config_changed(),
            Err(ChannelError::NoChannel)
        ));
    }
}
