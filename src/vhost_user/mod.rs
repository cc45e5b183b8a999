//! The only module that knows vhost-user.
//!
//! vhost's message layer (`BackendReqHandler`) reads, decodes and answers the front-end's
//! messages; [`handler::Handler`] decides what they mean for the [`Device`] (our own handler,
//! not vhost-user-backend's, whose handler is private and cannot track in-flight requests).
//! From vhost-user-backend we keep the vring state (`VringRwLock`).
//!
//! - [`Device`]: features, config space, one ring, worker and thread per queue ([`queue`]).
//! - [`inflight`]: the in-flight region shared with the front-end, so a restarted daemon
//!   resubmits what its predecessor had taken.
//! - [`BackendChannel`]: messages to the front-end (config change), from any other thread.
//! - [`Connection`]: one front-end connection on its own thread, stopped cleanly on request.

mod channel;
mod device;
mod handler;
pub mod inflight;
mod queue;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vmm_sys_util::eventfd::EventFd;

pub use channel::{BackendChannel, ChannelError, ACK_TIMEOUT};
pub use device::{Device, DeviceError};
pub use handler::Handler;

/// Connection options fixed for the daemon's life.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Offer INFLIGHT_SHMFD (`--inflight`).
    pub inflight: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { inflight: true }
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// The front-end went away (or we closed the connection at its request).
    Disconnected,
    /// The front-end sent something we refused, or the socket failed.
    Error(VhostUserError),
}

/// One front-end connection, served on its own thread.
pub struct Connection {
    device: Arc<Device>,
    channel: BackendChannel,
    handler: Arc<Mutex<Handler>>,
    socket: UnixStream,
    done: EventFd,
    thread: Option<JoinHandle<End>>,
    stopping: Arc<AtomicBool>,
}

impl Connection {
    /// Starts serving `stream` with `device`.
    pub fn start(device: Arc<Device>, stream: UnixStream) -> std::io::Result<Connection> {
        let channel = BackendChannel::default();
        let handler = Arc::new(Mutex::new(Handler::new(device.clone(), channel.clone())));
        let socket = stream.try_clone()?;
        let done = EventFd::new(libc::EFD_NONBLOCK)?;
        let done_tx = done.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut requests = BackendReqHandler::from_stream(stream, handler.clone());
        let quiet = stopping.clone();
        let ours = handler.clone();
        let hang_up = socket.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                let end = loop {
                    match requests.handle_request() {
                        Ok(()) => {}
                        Err(_) if quiet.load(Ordering::Acquire) => break End::Disconnected,
                        Err(VhostUserError::Disconnected | VhostUserError::PartialMessage) => {
                            break End::Disconnected
                        }
                        Err(e) => break End::Error(e),
                    }
                };
                // Complete and publish what the rings took before the front-end sees the
                // connection close: it reads the used index then (as for SIGTERM, see `stop`).
                ours.lock().unwrap_or_else(PoisonError::into_inner).close();
                let _ = hang_up.shutdown(std::net::Shutdown::Both);
                let _ = done_tx.write(1);
                end
            })?;
        Ok(Connection {
            device,
            channel,
            handler,
            socket,
            done,
            thread: Some(thread),
            stopping,
        })
    }

    /// Readable once the connection has ended.
    pub fn done_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// The channel to the front-end, for messages sent from other threads.
    pub fn channel(&self) -> BackendChannel {
        self.channel.clone()
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Ends the connection cleanly: no message is served and no request taken from then on,
    /// every request taken is completed and published, then the socket is closed. The front-end
    /// (which sees a back-end that went away) restarts its rings from the used index, which now
    /// accounts for everything we took.
    pub fn stop(mut self) -> End {
        {
            // Under the handler's lock: no message is being served meanwhile, and none served
            // afterwards starts a ring again.
            let mut h = self.handler.lock().unwrap_or_else(PoisonError::into_inner);
            self.stopping.store(true, Ordering::Release);
            h.close();
        }
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.finish()
    }

    /// Waits for a connection that ended by itself, and completes every request it took.
    pub fn wait(mut self) -> End {
        self.finish()
    }

    fn finish(&mut self) -> End {
        let end = self
            .thread
            .take()
            .map(|t| t.join().unwrap_or(End::Disconnected))
            .unwrap_or(End::Disconnected);
        self.channel.clear();
        // Finish what the front-end submitted before its memory goes away.
        self.device.quiesce();
        end
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
            self.finish();
        }
    }
}
