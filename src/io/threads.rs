//! The fallback engine: a few threads per queue run operations with blocking system calls and
//! report completions through an eventfd, so the queue thread's epoll loop is the same as with
//! io_uring.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{sys, Completion, EngineError, IoOp};

/// Threads per queue: enough to overlap a handful of blocking calls.
const THREADS: usize = 4;

struct Shared {
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
    done: Mutex<Vec<Completion>>,
    event: EventFd,
}

struct Jobs {
    queue: VecDeque<IoOp>,
    stop: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked cannot leave the plain data inside inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Thread-pool engine for one queue.
pub struct ThreadEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    staged: Vec<IoOp>,
    in_flight: usize,
}

impl ThreadEngine {
    /// Starts the pool.
    pub fn new() -> Result<Self, EngineError> {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                stop: false,
            }),
            job_ready: Condvar::new(),
            done: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK).map_err(EngineError::Setup)?,
        });
        let mut threads = Vec::with_capacity(THREADS);
        for _ in 0..THREADS {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("blk-io".into())
                .spawn(move || run(&s))
                .map_err(EngineError::Setup)?;
            threads.push(t);
        }
        Ok(ThreadEngine {
            shared,
            threads,
            staged: Vec::new(),
            in_flight: 0,
        })
    }

    pub(super) fn push(&mut self, op: IoOp) {
        self.in_flight += 1;
        self.staged.push(op);
    }

    pub(super) fn submit(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let n = self.staged.len();
        lock(&self.shared.jobs).queue.extend(self.staged.drain(..));
        if n == 1 {
            self.shared.job_ready.notify_one();
        } else {
            self.shared.job_ready.notify_all();
        }
    }

    pub(super) fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear the eventfd before looking, so a completion that lands after the look re-arms it.
        let _ = self.shared.event.read();
        let mut done = lock(&self.shared.done);
        self.in_flight -= done.len();
        out.append(&mut done);
    }

    pub(super) fn wait(&mut self, out: &mut Vec<Completion>) {
        self.submit();
        let before = out.len();
        while self.in_flight > 0 && out.len() == before {
            let mut pfd = libc::pollfd {
                fd: self.shared.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            self.reap(out);
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn notifier(&self) -> std::io::Result<EventFd> {
        self.shared.event.try_clone()
    }

    pub(super) fn notify_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }
}

fn run(shared: &Shared) {
    loop {
        let mut op = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if let Some(op) = jobs.queue.pop_front() {
                    break op;
                }
                if jobs.stop {
                    return;
                }
                jobs = shared
                    .job_ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let result = sys::execute(&mut op);
        lock(&shared.done).push(Completion {
            tag: op.tag,
            result,
        });
        let _ = shared.event.write(1);
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        // Operations still queued or running reference memory their submitter keeps alive only
        // until completion: finish them all before the threads go away.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.wait(&mut sink);
            sink.clear();
        }
        lock(&self.shared.jobs).stop = true;
        self.shared.job_ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
