//! The daemon's lifecycle: open the image, listen (socket path or inherited fd), serve one
//! front-end connection at a time with a fresh device, keep listening after a disconnect, and on
//! SIGTERM/SIGINT drain, flush and return.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::Listener;

use crate::block::{self, BlockBackend, OpenError};
use crate::config::{Config, Listen};
use crate::error::Error;
use crate::io::Engine;
use crate::vhost_user::{Connection, Device, End};

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    // Before any thread exists, so every thread inherits the mask and signals arrive only
    // through the signalfd.
    let signals = Signals::new().map_err(Error::EventLoop)?;
    let backend = block::open(&config.image)?;
    let info = backend.info();
    let lbs = config.device.logical_block_size;
    if info.offset_align > u64::from(lbs) {
        return Err(OpenError::Alignment {
            path: config.image.path.clone(),
            align: info.offset_align,
            lbs,
        }
        .into());
    }
    if info.size % u64::from(lbs) != 0 {
        warn!(
            "image size {} is not a multiple of the logical block size {lbs}; the tail is not visible to the guest",
            info.size
        );
    }
    Engine::probe(config.aio)?;
    let mut listener = listen(&config.listen)?;
    let waiter = Waiter::new(&[signals.fd(), listener.as_raw_fd()]).map_err(Error::EventLoop)?;
    match &config.listen {
        Listen::Path(p) => info!("ready for a front-end on {}", p.display()),
        Listen::Fd(fd) => info!("ready for a front-end on the inherited socket (fd {fd})"),
    }
    let result = loop {
        match waiter.wait() {
            Err(e) => break Err(Error::EventLoop(e)),
            Ok(fd) if fd == signals.fd() => {
                info!("{}; exiting", signals.take());
                break Ok(());
            }
            Ok(_) => match serve_connection(&config, &backend, &mut listener, &signals) {
                Ok(Outcome::Disconnected) => info!("waiting for the next front-end"),
                Ok(Outcome::Stop) => break Ok(()),
                Err(e) => break Err(e),
            },
        }
    };
    let flushed = backend.sync().map_err(Error::Flush);
    if flushed.is_ok() {
        info!("image written back; stopped");
    }
    if let Listen::Path(path) = &config.listen {
        let _ = fs::remove_file(path);
    }
    result.and(flushed)
}

enum Outcome {
    Disconnected,
    Stop,
}

/// Serves one front-end connection with a fresh device; returns when it disconnects or a
/// signal asks us to stop.
fn serve_connection(
    config: &Config,
    backend: &Arc<dyn BlockBackend>,
    listener: &mut Listener,
    signals: &Signals,
) -> Result<Outcome, Error> {
    let Some(stream) = listener
        .accept()
        .map_err(|e| Error::VhostUser(format!("accept: {e}")))?
    else {
        return Ok(Outcome::Disconnected);
    };
    let device = Arc::new(
        Device::new(
            Arc::new(config.device.clone()),
            backend.clone(),
            config.aio,
            config.vhost_user,
        )
        .map_err(|e| Error::VhostUser(e.to_string()))?,
    );
    let conn = Connection::start(device, stream).map_err(Error::EventLoop)?;
    info!("front-end connected");
    let waiter = Waiter::new(&[signals.fd(), conn.done_fd()]).map_err(Error::EventLoop)?;
    let (outcome, end) = if waiter.wait().map_err(Error::EventLoop)? == signals.fd() {
        // Stop taking requests, complete and publish what was taken, then disconnect: the
        // front-end resumes from a used ring that accounts for everything.
        info!(
            "{}; completing requests in flight, then disconnecting",
            signals.take()
        );
        (Outcome::Stop, conn.stop())
    } else {
        (Outcome::Disconnected, conn.wait())
    };
    match end {
        End::Disconnected => info!("front-end disconnected"),
        End::Error(e) => warn!("front-end connection ended: {e}"),
    }
    Ok(outcome)
}

/// Creates the listening socket.
fn listen(listen: &Listen) -> Result<Listener, Error> {
    match listen {
        Listen::Path(path) => {
            remove_stale_socket(path)?;
            // Bind under a temporary name and rename once listening, so that a client never
            // finds the socket before it accepts connections.
            let tmp = path.with_file_name(format!(
                ".{}.{}.tmp",
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("socket"),
                std::process::id()
            ));
            let _ = fs::remove_file(&tmp);
            let err = |source| Error::Listen {
                path: path.clone(),
                source,
            };
            let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(err)?;
            if let Err(e) = fs::rename(&tmp, path) {
                let _ = fs::remove_file(&tmp);
                return Err(err(e));
            }
            Ok(Listener::from(listener))
        }
        Listen::Fd(fd) => {
            check_listening_socket(*fd).map_err(|reason| Error::InheritedFd { fd: *fd, reason })?;
            // SAFETY: the descriptor was handed to us on the command line for exclusive use and
            // was just checked to be an open listening Unix socket; nothing else owns it.
            Ok(unsafe { Listener::from_raw_fd(*fd) })
        }
    }
}

/// Replaces a leftover socket file, refuses to clobber anything else.
fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| Error::Listen {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(Error::Listen {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ),
        }),
        Err(_) => Ok(()),
    }
}

fn check_listening_socket(fd: RawFd) -> Result<(), String> {
    let getsockopt = |opt| {
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `val` and `len` are valid out-pointers of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(val)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let domain = getsockopt(libc::SO_DOMAIN).map_err(|e| format!("not a socket ({e})"))?;
    if domain != libc::AF_UNIX {
        return Err("not a Unix socket".into());
    }
    if getsockopt(libc::SO_ACCEPTCONN).map_err(|e| e.to_string())? != 1 {
        return Err("not a listening socket".into());
    }
    // SAFETY: F_SETFD on a descriptor we own; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(())
}

/// SIGTERM and SIGINT, blocked and read from a signalfd.
struct Signals {
    fd: RawFd,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only write to it and the thread mask.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Signals { fd })
    }

    fn fd(&self) -> RawFd {
        self.fd
    }

    /// Consumes a pending signal and names it.
    fn take(&self) -> &'static str {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `len` bytes into `info`, which is `len` bytes long.
        let n = unsafe {
            libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                len,
            )
        };
        match (n == len as isize).then_some(info.ssi_signo as i32) {
            Some(libc::SIGINT) => "SIGINT",
            _ => "SIGTERM",
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// Waits until one of a few descriptors is readable (the daemon's own epoll loop).
struct Waiter {
    epfd: RawFd,
    fds: Vec<RawFd>,
}

impl Waiter {
    fn new(fds: &[RawFd]) -> std::io::Result<Self> {
        let epfd = epoll::create(true)?;
        let w = Waiter {
            epfd,
            fds: fds.to_vec(),
        };
        for &fd in fds {
            epoll::ctl(
                epfd,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, fd as u64),
            )?;
        }
        Ok(w)
    }

    /// Returns a readable descriptor, the earliest in the order given to `new` if several are.
    fn wait(&self) -> std::io::Result<RawFd> {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
        loop {
            match epoll::wait(self.epfd, -1, &mut events) {
                Ok(n) => {
                    let ready = &events[..n];
                    let first = self
                        .fds
                        .iter()
                        .find(|&&fd| ready.iter().any(|e| e.data == fd as u64));
                    if let Some(&fd) = first {
                        return Ok(fd);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // SAFETY: we own the epoll descriptor.
        unsafe { libc::close(self.epfd) };
    }
}
