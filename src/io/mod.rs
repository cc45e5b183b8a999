//! I/O engines: submit positional reads, writes, syncs and fallocates straight from host iovecs,
//! and report completions through an eventfd that the queue thread polls.
//!
//! Two engines sit behind one enum: [`uring::UringEngine`] (one io_uring per queue) and
//! [`threads::ThreadEngine`] (worker threads doing `preadv`/`pwritev`). Both finish short
//! transfers themselves, so a completion is all-or-error. This module knows nothing about
//! virtio or image formats.

pub mod batch;
pub mod mapped;
pub mod sys;
pub mod threads;
pub mod uring;

use std::os::unix::io::RawFd;

use log::{info, warn};

/// What an [`IoOp`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `preadv` into the iovecs.
    Read,
    /// `pwritev` from the iovecs.
    Write,
    /// `fdatasync`.
    Fdatasync,
    /// `fallocate(mode, offset, len)`.
    Fallocate {
        /// The `FALLOC_FL_*` mode bits.
        mode: i32,
        /// Length of the range.
        len: u64,
    },
}

/// One host I/O operation. For reads and writes the iovecs point into memory that the submitter
/// keeps alive and untouched until the operation's completion has been reaped.
#[derive(Debug)]
pub struct IoOp {
    /// File descriptor to operate on.
    pub fd: RawFd,
    /// Byte offset in the file.
    pub offset: u64,
    /// The operation.
    pub kind: OpKind,
    /// Buffers for reads and writes (empty otherwise); at most [`MAX_IOVECS`] entries.
    pub iov: Vec<libc::iovec>,
    /// Returned unchanged in the [`Completion`].
    pub tag: u64,
}

// SAFETY: the raw pointers in `iov` are only dereferenced by the kernel or by the engine while the
// submitter guarantees (see `IoOp` docs) that the memory stays valid until completion; moving the
// op to another thread does not change that.
unsafe impl Send for IoOp {}

/// The most iovecs one operation may carry (Linux `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// A finished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag of the [`IoOp`].
    pub tag: u64,
    /// 0 on success, `-errno` on failure.
    pub result: i32,
}

/// Which engine to use (`--aio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring where the kernel allows it, threads otherwise.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// The thread pool.
    Threads,
}

/// Errors creating an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring was asked for and cannot be used.
    #[error("io_uring is unavailable: {0}")]
    UringUnavailable(std::io::Error),
    /// eventfd or thread creation failed.
    #[error("cannot set up the I/O engine: {0}")]
    Setup(std::io::Error),
}

/// A per-queue I/O engine.
// One per queue and never moved on the hot path: boxing the ring would only add an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    /// io_uring backed.
    Uring(uring::UringEngine),
    /// Thread-pool backed.
    Threads(threads::ThreadEngine),
}

impl Engine {
    /// Creates an engine for one queue that can keep `depth` operations in flight efficiently
    /// (more are queued, never refused).
    pub fn new(mode: AioMode, depth: u32) -> Result<Self, EngineError> {
        match mode {
            AioMode::Threads => Ok(Engine::Threads(threads::ThreadEngine::new()?)),
            AioMode::IoUring => Ok(Engine::Uring(
                uring::UringEngine::new(depth).map_err(EngineError::UringUnavailable)?,
            )),
            AioMode::Auto => match uring::UringEngine::new(depth) {
                Ok(e) => Ok(Engine::Uring(e)),
                Err(e) => {
                    warn!("io_uring unavailable ({e}); using the thread-pool engine");
                    Ok(Engine::Threads(threads::ThreadEngine::new()?))
                }
            },
        }
    }

    /// Checks once, at start-up, which engine `mode` resolves to on this host.
    pub fn probe(mode: AioMode) -> Result<&'static str, EngineError> {
        let name = Engine::new(mode, 8)?.name();
        info!("I/O engine: {name}");
        Ok(name)
    }

    /// The engine's name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Threads(_) => "threads",
        }
    }

    /// Queues an operation; it is handed to the kernel at the next [`Engine::submit`].
    pub fn push(&mut self, op: IoOp) {
        match self {
            Engine::Uring(e) => e.push(op, false),
            Engine::Threads(e) => e.push(op),
        }
    }

    /// Queues an operation to run beside this thread rather than on it where the engine can
    /// (io_uring's workers): a large page-cache read then copies on another core.
    pub fn push_offloaded(&mut self, op: IoOp) {
        match self {
            Engine::Uring(e) => e.push(op, true),
            Engine::Threads(e) => e.push(op),
        }
    }

    /// Submits everything queued.
    pub fn submit(&mut self) {
        match self {
            Engine::Uring(e) => e.submit(),
            Engine::Threads(e) => e.submit(),
        }
    }

    /// Collects finished operations without blocking.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(e) => e.reap(out),
            Engine::Threads(e) => e.reap(out),
        }
    }

    /// Collects finished operations without blocking, including those the kernel has finished
    /// but only posts when this thread enters it (io_uring task work): for polling.
    pub fn poke(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(e) => e.poke(out),
            Engine::Threads(e) => e.reap(out),
        }
    }

    /// Blocks until at least one operation finishes (if any is in flight), then reaps.
    pub fn wait(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(e) => e.wait(out),
            Engine::Threads(e) => e.wait(out),
        }
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Threads(e) => e.in_flight(),
        }
    }

    /// A duplicate of the completion eventfd: writing it wakes the queue's thread.
    pub fn notifier(&self) -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
        match self {
            Engine::Uring(e) => e.notifier(),
            Engine::Threads(e) => e.notifier(),
        }
    }

    /// The eventfd that becomes readable when completions are ready.
    pub fn notify_fd(&self) -> RawFd {
        match self {
            Engine::Uring(e) => e.notify_fd(),
            Engine::Threads(e) => e.notify_fd(),
        }
    }
}

/// Progress of one read or write: how far the iovecs and offset have advanced.
pub(crate) struct Transfer;

impl Transfer {
    /// Drops the first `n` bytes from `iov`, splitting an iovec if needed.
    pub(crate) fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
        let mut skip = 0;
        for v in iov.iter_mut() {
            if n >= v.iov_len {
                n -= v.iov_len;
                skip += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                break;
            }
        }
        iov.drain(..skip);
    }

    /// Total bytes described by `iov`.
    pub(crate) fn len(iov: &[libc::iovec]) -> u64 {
        iov.iter().map(|v| v.iov_len as u64).sum()
    }

    /// Fills the buffers with zeroes (a read that hit the end of the file, a zero extent).
    ///
    /// # Safety
    /// Every iovec must describe writable memory of `iov_len` bytes that stays mapped for the
    /// duration of the call.
    pub(crate) unsafe fn zero(iov: &[libc::iovec]) {
        for v in iov {
            // SAFETY: guaranteed by the caller.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }
}

#[cfg(test)]
mod tests;
