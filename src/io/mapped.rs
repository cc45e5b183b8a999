//! Page-cache reads as memory copies. Each queue maps the image's files read-only and copies
//! cached data from the mapping straight into the guest's buffers: no system call and no
//! io_uring request per read, which roughly halves the CPU time of a 4 KiB buffered read
//! (docs/benchmarks.md). Only used with the page cache (`--cache writeback`).
//!
//! A mapping has three hazards that `preadv` does not, each handled here:
//! - A page missing from the page cache is read from disk inside the copy, blocking the queue's
//!   thread. A copy that took long and raised the thread's major-fault count sends the following
//!   reads to the I/O engine, which reads asynchronously, for a period that doubles while such
//!   faults recur.
//! - Bytes past the end of the file raise SIGBUS: copies stay below the file size last seen,
//!   which is looked up again when a read reaches past it.
//! - A file shrunk by another process, or a disk error while a page is read in, raise SIGBUS too.
//!   A process-wide handler recognises a fault inside the calling thread's current copy, maps a
//!   page of zeroes over the faulting page so that the copy can finish, and the copy reports
//!   failure: the read is redone through the I/O engine, which gives the file's own answer
//!   (zeroes past the end, or EIO), and the file is mapped back over the patched pages. Other
//!   faults go to the handler that was installed before (Rust's stack-overflow check, or the
//!   default action).

use std::cell::Cell;
use std::os::unix::io::RawFd;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::Transfer;

/// Mappings extend past the end of the file up to a multiple of this, so that a growing image
/// is remapped once per step.
const MAP_STEP: u64 = 1 << 30;

/// Reads sent to the I/O engine after the first major fault; doubles while faults recur.
const MIN_SKIP: u32 = 64;

/// The longest such period.
const MAX_SKIP: u32 = 1 << 16;

/// Copies in a row without a major fault after which the period starts again from
/// [`MIN_SKIP`].
const CLEAN_RESET: u32 = 1024;

/// A copy slower than this plus 1 ns per byte (1 GB/s) is checked for a major fault. A copy
/// from the page cache takes well under a microsecond per 4 KiB, a minor fault about one; a
/// read from disk takes tens of microseconds even on fast flash.
const SLOW: Duration = Duration::from_micros(8);

thread_local! {
    /// The mapped address range the thread is copying from (empty when it is not copying).
    static COPYING: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Set by the SIGBUS handler when it patched a page of `COPYING`.
    static PATCHED: Cell<bool> = const { Cell::new(false) };
    /// The thread's major-fault count when last looked at (-1: not yet).
    static MAJOR_FAULTS: Cell<i64> = const { Cell::new(-1) };
}

/// The SIGBUS disposition before ours (set once, when ours is installed; `None`: it could not be).
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// The system's page size, for the signal handler.
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

fn page_size() -> usize {
    PAGE_SIZE.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler once per process; false if it cannot be.
fn install_handler() -> bool {
    PREVIOUS
        .get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if let Ok(page) = usize::try_from(page) {
                PAGE_SIZE.store(page, Ordering::Relaxed);
            }
            // SAFETY: sigaction with fully initialised structs; the handler only touches
            // thread-local cells, atomics and async-signal-safe system calls.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    on_sigbus;
                new.sa_sigaction = handler as libc::sighandler_t;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                    Some(old)
                } else {
                    warn!(
                        "cannot install a SIGBUS handler ({}); page-cache reads use system calls",
                        std::io::Error::last_os_error()
                    );
                    None
                }
            }
        })
        .is_some()
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = COPYING.with(Cell::get);
    if (start..end).contains(&addr) {
        let page = addr & !(page_size() - 1);
        // SAFETY: the page lies inside a read-only file mapping owned by the copy this thread
        // is running; replacing it with anonymous zeroes changes only what that copy reads,
        // and the copy repairs the mapping before anything else reads it.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size(),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            PATCHED.with(|c| c.set(true));
            return;
        }
    }
    match PREVIOUS.get() {
        Some(Some(prev))
            if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN =>
        {
            // SAFETY: calls the handler that was installed before ours the way the kernel would
            // have, with the arguments its flags ask for.
            unsafe {
                if prev.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(prev.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(prev.sa_sigaction);
                    f(sig);
                }
            }
        }
        _ => {
            // The default action: restore it. A fault happens again when the handler returns
            // and now ends the process as if no handler had been installed; a signal sent by
            // another process is raised again.
            // SAFETY: sigaction and raise are async-signal-safe; the struct is initialised.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                if (*info).si_code <= 0 {
                    libc::raise(sig);
                }
            }
        }
    }
}

/// The calling thread's major-fault count.
fn major_faults() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) != 0 {
            return 0;
        }
        usage.ru_majflt
    }
}

/// The size of a regular file, or `None` (not a regular file, or fstat failed).
fn regular_file_size(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat fills the zeroed struct it is given.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return None;
        }
        st
    };
    (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(st.st_size as u64)
}

/// One file's mapping.
struct Mapping {
    fd: RawFd,
    /// Start address; 0 when nothing is mapped.
    base: usize,
    /// Bytes mapped.
    len: usize,
    /// The file's size when last looked at: copies stay below it.
    size: u64,
    /// The file cannot be mapped (not a regular file, or mmap failed): never try again.
    refused: bool,
}

impl Mapping {
    /// Makes the mapping cover the file's current size (`self.size`); false if it cannot.
    fn cover(&mut self) -> bool {
        if self.size <= self.len as u64 {
            return true;
        }
        self.unmap();
        let Some(len) = self
            .size
            .checked_next_multiple_of(MAP_STEP)
            .and_then(|l| usize::try_from(l).ok())
        else {
            return false;
        };
        // SAFETY: a new read-only shared mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            info!(
                "cannot map the image file ({}); its page-cache reads use system calls",
                std::io::Error::last_os_error()
            );
            self.refused = true;
            return false;
        }
        self.base = p as usize;
        self.len = len;
        true
    }

    /// Maps the file again over `offset..offset + len` (pages the SIGBUS handler patched).
    fn repair(&mut self, offset: u64, len: u64) {
        let page = page_size() as u64;
        let from = offset / page * page;
        let to = (offset + len).next_multiple_of(page).min(self.len as u64);
        // SAFETY: the range lies inside this mapping (`offset + len <= size <= len` held when
        // the copy started); MAP_FIXED replaces exactly those pages with the file's.
        let p = unsafe {
            libc::mmap(
                (self.base + from as usize) as *mut libc::c_void,
                (to - from) as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd,
                from as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            self.unmap();
            self.refused = true;
        }
        // The file may have shrunk: look at its size again before the next copy.
        self.size = 0;
    }

    fn unmap(&mut self) {
        if self.base != 0 {
            // SAFETY: `base..base + len` is a mapping this struct made and nothing else uses.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
            self.base = 0;
            self.len = 0;
        }
    }
}

/// A queue's mappings of the files it reads, and when to stop using them.
pub struct MappedFiles {
    files: Vec<Mapping>,
    /// Reads left to send to the I/O engine before the mappings are tried again.
    skip: u32,
    /// Length of the next such period (0: none yet).
    backoff: u32,
    /// Copies in a row without a major fault.
    clean: u32,
    /// See [`SLOW`] (shorter in tests).
    slow: Duration,
    /// Reads copied so far.
    copies: u64,
}

impl MappedFiles {
    /// Mappings for one queue; `None` if SIGBUS cannot be handled in this process.
    pub fn new() -> Option<Self> {
        install_handler().then_some(MappedFiles {
            files: Vec::new(),
            skip: 0,
            backoff: 0,
            clean: 0,
            slow: SLOW,
            copies: 0,
        })
    }

    /// Copies bytes `offset..` of the file `fd` into `iov` through a mapping. Returns false if
    /// nothing usable was copied: the caller reads through the I/O engine instead.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays mapped for the duration of the
    /// call and that no Rust reference covers.
    pub unsafe fn read(&mut self, fd: RawFd, offset: u64, iov: &[libc::iovec]) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        let len = Transfer::len(iov);
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let Some(m) = self.mapping(fd, end) else {
            return false;
        };
        if MAJOR_FAULTS.with(Cell::get) < 0 {
            MAJOR_FAULTS.with(|c| c.set(major_faults()));
        }
        let start = m.base + offset as usize;
        let began = Instant::now();
        COPYING.with(|c| c.set((start, start + len as usize)));
        compiler_fence(Ordering::SeqCst);
        let mut src = start;
        for v in iov {
            // SAFETY: `src..src + iov_len` lies inside the mapping, below the file's size (see
            // `mapping`); the destination is guaranteed by the caller. A fault on the source
            // is turned into zeroes by the SIGBUS handler and reported through PATCHED.
            unsafe {
                std::ptr::copy_nonoverlapping(src as *const u8, v.iov_base.cast(), v.iov_len)
            };
            src += v.iov_len;
        }
        compiler_fence(Ordering::SeqCst);
        COPYING.with(|c| c.set((0, 0)));
        if PATCHED.with(|c| c.replace(false)) {
            m.repair(offset, len);
            return false;
        }
        let slow = began.elapsed() > self.slow + Duration::from_nanos(len);
        self.note(
            slow && {
                let now = major_faults();
                now > MAJOR_FAULTS.with(|c| c.replace(now))
            },
        );
        self.copies += 1;
        true
    }

    /// Reads copied so far.
    pub fn copies(&self) -> u64 {
        self.copies
    }

    /// The mapping of `fd` if it covers `..end` of the file.
    fn mapping(&mut self, fd: RawFd, end: u64) -> Option<&mut Mapping> {
        let i = match self.files.iter().position(|m| m.fd == fd) {
            Some(i) => i,
            None => {
                self.files.push(Mapping {
                    fd,
                    base: 0,
                    len: 0,
                    size: 0,
                    refused: false,
                });
                self.files.len() - 1
            }
        };
        let m = &mut self.files[i];
        if m.refused {
            return None;
        }
        if end > m.size {
            let Some(size) = regular_file_size(fd) else {
                m.refused = true;
                return None;
            };
            m.size = size;
            if end > size || !m.cover() {
                return None;
            }
        }
        Some(m)
    }

    /// Counts a copy; one that read from disk starts (or lengthens) a period of reads through
    /// the I/O engine.
    fn note(&mut self, major_fault: bool) {
        if major_fault {
            self.backoff = (self.backoff * 2).clamp(MIN_SKIP, MAX_SKIP);
            self.skip = self.backoff;
            self.clean = 0;
        } else {
            self.clean += 1;
            if self.clean >= CLEAN_RESET {
                self.backoff = 0;
                self.clean = 0;
            }
        }
    }
}

impl Drop for MappedFiles {
    fn drop(&mut self) {
        for m in &mut self.files {
            m.unmap();
        }
    }
}

#[cfg(test)]
mod tests;
