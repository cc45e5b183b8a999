//! One thread per queue: waits on the queue's kick, its I/O engine's completions and a wake-up
//! of our own, and runs the queue's worker.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::debug;
use vhost_user_backend::VringT;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::worker::{QueueWorker, Vring};

const KICK: u64 = 0;
const IO: u64 = 1;
const WAKE: u64 = 2;
const EXIT: u64 = 3;

/// A queue's thread and the descriptors that drive it.
pub struct QueueThread {
    epoll: RawFd,
    wake: EventFd,
    exit: EventFd,
    /// The kick descriptor registered in `epoll`, if any.
    kick: Mutex<Option<RawFd>>,
    handle: Option<JoinHandle<()>>,
}

impl QueueThread {
    /// Starts the thread of queue `index`.
    pub fn spawn(
        index: u16,
        worker: Arc<Mutex<QueueWorker>>,
        vring: Vring,
        event_idx: Arc<AtomicBool>,
    ) -> io::Result<QueueThread> {
        let epoll = epoll::create(true)?;
        let mut t = QueueThread {
            epoll,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            exit: EventFd::new(libc::EFD_NONBLOCK)?,
            kick: Mutex::new(None),
            handle: None,
        };
        let io_fd = worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .notify_fd();
        for (fd, token) in [
            (io_fd, IO),
            (t.wake.as_raw_fd(), WAKE),
            (t.exit.as_raw_fd(), EXIT),
        ] {
            t.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, token)?;
        }
        let wake = t.wake.try_clone()?;
        t.handle = Some(
            std::thread::Builder::new()
                .name(format!("queue-{index}"))
                .spawn(move || run(epoll, &worker, &vring, &event_idx, &wake))?,
        );
        Ok(t)
    }

    fn ctl(&self, op: epoll::ControlOptions, fd: RawFd, token: u64) -> io::Result<()> {
        epoll::ctl(
            self.epoll,
            op,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, token),
        )
    }

    /// Watches `kick` (the ring runs) or nothing (the ring is stopped or disabled).
    pub fn set_kick(&self, kick: Option<RawFd>) -> io::Result<()> {
        let mut current = self.kick.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == kick {
            return Ok(());
        }
        if let Some(old) = current.take() {
            let _ = self.ctl(epoll::ControlOptions::EPOLL_CTL_DEL, old, KICK);
        }
        if let Some(fd) = kick {
            self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, KICK)?;
            *current = Some(fd);
        }
        Ok(())
    }

    /// Makes the thread look at its ring without a kick (resubmissions after a restart, chains
    /// made available while the ring was stopped).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for QueueThread {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("a queue thread panicked");
            }
        }
        // SAFETY: our own epoll descriptor; the thread using it has ended.
        unsafe { libc::close(self.epoll) };
    }
}

fn run(
    epoll: RawFd,
    worker: &Mutex<QueueWorker>,
    vring: &Vring,
    event_idx: &AtomicBool,
    wake: &EventFd,
) {
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
    loop {
        let n = match epoll::wait(epoll, -1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("queue thread: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let mut w = worker.lock().unwrap_or_else(PoisonError::into_inner);
            match ev.data {
                KICK => {
                    // Consumes the kick; a disabled ring is left alone.
                    if matches!(vring.read_kick(), Ok(true)) {
                        w.process_queue(vring, event_idx.load(Ordering::Acquire));
                    }
                }
                IO => w.process_completions(vring),
                WAKE => {
                    let _ = wake.read();
                    w.process_queue(vring, event_idx.load(Ordering::Acquire));
                }
                EXIT => {
                    debug!("queue thread exiting");
                    return;
                }
                _ => {}
            }
        }
    }
}
