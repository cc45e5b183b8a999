//! Batches of positioned writes run to completion on the calling thread: all in flight at once
//! through a small private io_uring where the kernel allows, one after the other otherwise.
//!
//! For metadata that must be in the file before requests complete: with O_DIRECT each write
//! waits for the device, and a batch of them overlaps on it instead of taking turns. With the
//! page cache a write is a copy, and plain `pwrite`s cost the least.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, types, IoUring};
use log::{debug, warn};

use super::{sys, IoOp, OpKind};
use crate::util::aligned::AlignedBuf;

/// Operations one submission carries (larger batches go in several).
const ENTRIES: usize = 64;

/// One write: `buf` goes to `offset` of `fd`.
pub struct BatchWrite {
    /// File descriptor.
    pub fd: RawFd,
    /// Byte offset in that file.
    pub offset: u64,
    /// The bytes (aligned as the file needs).
    pub buf: AlignedBuf,
}

/// Runs batches of writes.
pub struct Batch {
    ring: Option<IoUring>,
}

impl Batch {
    /// A runner that overlaps writes (`concurrent`, for O_DIRECT files) when io_uring can be set
    /// up, and runs them one after the other otherwise.
    pub fn new(concurrent: bool) -> Batch {
        let ring = if concurrent {
            match IoUring::new(ENTRIES as u32) {
                Ok(r) => Some(r),
                Err(e) => {
                    debug!("metadata writes one at a time: no io_uring ({e})");
                    None
                }
            }
        } else {
            None
        };
        Batch { ring }
    }

    /// Writes every buffer; all have completed (or failed) when this returns. The first error
    /// is returned.
    pub fn run(&mut self, writes: Vec<BatchWrite>) -> io::Result<()> {
        let mut first = Ok(());
        let mut writes = writes.into_iter().peekable();
        while writes.peek().is_some() {
            let chunk: Vec<BatchWrite> = writes.by_ref().take(ENTRIES).collect();
            let r = match self.ring.as_mut() {
                Some(ring) => match run_ring(ring, chunk) {
                    Ok(r) => r,
                    Err(e) => {
                        // The ring itself failed: its buffers were leaked (see `run_ring`); do
                        // without it from now on.
                        warn!("metadata writes: io_uring failed ({e}); writing one at a time");
                        self.ring = None;
                        Err(e)
                    }
                },
                None => chunk
                    .into_iter()
                    .try_for_each(|w| execute(w.fd, w.offset, &w.buf, 0)),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Writes `buf[done..]` at `offset + done` with plain system calls.
fn execute(fd: RawFd, offset: u64, buf: &AlignedBuf, done: usize) -> io::Result<()> {
    let mut op = IoOp {
        fd,
        offset: offset + done as u64,
        kind: OpKind::Write,
        iov: vec![libc::iovec {
            // Writes only read from the buffer.
            iov_base: buf.as_ptr().wrapping_add(done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        }],
        tag: 0,
    };
    match sys::execute(&mut op) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// Runs at most [`ENTRIES`] writes through `ring`. The outer error means the ring failed with
/// writes possibly still in the kernel: their buffers are leaked rather than freed under it.
fn run_ring(ring: &mut IoUring, chunk: Vec<BatchWrite>) -> io::Result<io::Result<()>> {
    let n = chunk.len();
    {
        let mut sq = ring.submission();
        for (i, w) in chunk.iter().enumerate() {
            let len = u32::try_from(w.buf.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
            let e = opcode::Write::new(types::Fd(w.fd), w.buf.as_ptr(), len)
                .offset(w.offset)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffer lives in `chunk`, which is neither dropped nor changed until
            // every entry pushed here has completed (or is leaked if the ring fails).
            if unsafe { sq.push(&e) }.is_err() {
                // Cannot happen (the ring has ENTRIES slots and is empty between chunks): what
                // was pushed is dropped with the ring by the caller.
                std::mem::forget(chunk);
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
    }
    let mut results = vec![None; n];
    let mut done = 0;
    let mut failures = 0;
    while done < n {
        match ring.submit_and_wait(n - done) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                    && failures < 1000 =>
            {
                failures += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => {
                std::mem::forget(chunk);
                return Err(e);
            }
        }
        for cqe in ring.completion() {
            if let Some(r @ None) = results.get_mut(cqe.user_data() as usize) {
                *r = Some(cqe.result());
                done += 1;
            }
        }
    }
    let mut first = Ok(());
    for (w, res) in chunk.iter().zip(results) {
        let r = match res.unwrap_or(-libc::EIO) {
            // Short (or refused for now): finish it with plain system calls.
            r if r == -libc::EAGAIN => execute(w.fd, w.offset, &w.buf, 0),
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            r if (r as usize) < w.buf.len() => execute(w.fd, w.offset, &w.buf, r as usize),
            _ => Ok(()),
        };
        if first.is_ok() {
            first = r;
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;

    use super::*;

    fn buf(len: usize, fill: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(len, 4096);
        b.as_mut_slice().fill(fill);
        b
    }

    #[test]
    fn writes_land_with_and_without_a_ring() {
        for concurrent in [false, true] {
            let file = tempfile::tempfile().unwrap();
            let fd = file.as_raw_fd();
            let mut b = Batch::new(concurrent);
            // More writes than one submission carries.
            let writes = (0..150u64)
                .map(|i| BatchWrite {
                    fd,
                    offset: i * 4096,
                    buf: buf(4096, i as u8),
                })
                .collect();
            b.run(writes).unwrap();
            for i in 0..150u64 {
                let mut back = [0u8; 4096];
                file.read_exact_at(&mut back, i * 4096).unwrap();
                assert!(back.iter().all(|&x| x == i as u8), "block {i}");
            }
            // A failing write is reported (a read-only descriptor), the others still land.
            let ro = std::fs::File::open(format!("/proc/self/fd/{fd}")).unwrap();
            let writes = vec![BatchWrite {
                fd: ro.as_raw_fd(),
                offset: 0,
                buf: buf(512, 1),
            }];
            assert!(b.run(writes).is_err());
        }
    }
}
