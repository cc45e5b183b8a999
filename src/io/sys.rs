//! Blocking execution of an [`IoOp`] with plain system calls (used by the thread engine and for
//! O_DIRECT bounce transfers).

use super::{IoOp, OpKind, Transfer};

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `op` to completion on the calling thread, finishing short transfers.
/// Returns 0 on success or `-errno`.
pub fn execute(op: &mut IoOp) -> i32 {
    match op.kind {
        OpKind::Read | OpKind::Write => loop {
            if op.iov.is_empty() {
                return 0;
            }
            let Ok(offset) = libc::off_t::try_from(op.offset) else {
                return -libc::EINVAL;
            };
            let count = op.iov.len().min(super::MAX_IOVECS) as libc::c_int;
            // SAFETY: the iovecs describe memory the submitter keeps valid (see `IoOp`); the
            // kernel checks every pointer and length.
            let n = unsafe {
                if op.kind == OpKind::Read {
                    libc::preadv(op.fd, op.iov.as_ptr(), count, offset)
                } else {
                    libc::pwritev(op.fd, op.iov.as_ptr(), count, offset)
                }
            };
            match n {
                n if n < 0 => {
                    let e = errno();
                    if e != libc::EINTR {
                        return -e;
                    }
                }
                0 if op.kind == OpKind::Read => {
                    // End of file: what lies beyond reads as zeroes.
                    // SAFETY: a read op's iovecs are writable memory kept alive by its submitter.
                    unsafe { Transfer::zero(&op.iov) };
                    return 0;
                }
                0 => return -libc::EIO,
                n => {
                    Transfer::advance(&mut op.iov, n as usize);
                    op.offset += n as u64;
                }
            }
        },
        OpKind::Fdatasync => loop {
            // SAFETY: plain syscall on a descriptor number; no memory is passed.
            if unsafe { libc::fdatasync(op.fd) } == 0 {
                return 0;
            }
            let e = errno();
            if e != libc::EINTR {
                return -e;
            }
        },
        OpKind::Fallocate { mode, len } => {
            let (Ok(offset), Ok(len)) =
                (libc::off_t::try_from(op.offset), libc::off_t::try_from(len))
            else {
                return -libc::EINVAL;
            };
            loop {
                // SAFETY: plain syscall on a descriptor number; no memory is passed.
                if unsafe { libc::fallocate(op.fd, mode, offset, len) } == 0 {
                    return 0;
                }
                let e = errno();
                if e != libc::EINTR {
                    return -e;
                }
            }
        }
    }
}
