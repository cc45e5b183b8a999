//! Guest buffers: descriptor pieces (guest address + length), copying small amounts (headers,
//! segments, serial) through vm-memory, and translating data buffers into host iovecs for
//! zero-copy I/O.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::status::RequestError;

/// A piece of a descriptor buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Total length of `segs`.
pub fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Removes the first `n` bytes of `segs` (there must be at least `n`).
pub fn skip_front(segs: &mut Vec<Seg>, mut n: u64) {
    let mut drop = 0;
    for s in segs.iter_mut() {
        if n >= u64::from(s.len) {
            n -= u64::from(s.len);
            drop += 1;
        } else {
            // `n < s.len` so it fits in u32, and the address does not overflow because the guest
            // range was representable before.
            s.addr = GuestAddress(s.addr.0.wrapping_add(n));
            s.len -= n as u32;
            break;
        }
    }
    segs.drain(..drop);
}

/// Removes the last `n` bytes of `segs` (there must be at least `n`).
pub fn truncate_back(segs: &mut Vec<Seg>, mut n: u64) {
    while n > 0 {
        let Some(last) = segs.last_mut() else { return };
        if n >= u64::from(last.len) {
            n -= u64::from(last.len);
            segs.pop();
        } else {
            last.len -= n as u32;
            n = 0;
        }
    }
    segs.retain(|s| s.len > 0);
}

/// Copies the first `buf.len()` bytes of `segs` into `buf`.
pub fn read_bytes<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::BadBuffer)?;
        done += n;
    }
    if done < buf.len() {
        return Err(RequestError::Malformed("buffer shorter than its contents"));
    }
    Ok(())
}

/// Copies `data` into the start of `segs`, as far as they reach; returns the bytes written.
pub fn write_bytes<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    data: &[u8],
) -> Result<usize, RequestError> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(s.len as usize);
        mem.write_slice(&data[done..done + n], s.addr)
            .map_err(|_| RequestError::BadBuffer)?;
        done += n;
    }
    Ok(done)
}

/// Appends host iovecs for `segs` to `out`, following buffers across memory regions. Fails if any
/// byte is outside guest memory or the result would need more than `max` iovecs.
pub fn host_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    max: usize,
    out: &mut Vec<libc::iovec>,
) -> Result<(), RequestError> {
    for s in segs {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|_| RequestError::BadBuffer)?;
            if out.len() == max {
                return Err(RequestError::Malformed("too many buffer pieces"));
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Walks a list of host iovecs, handing out consecutive byte ranges as iovec lists.
pub struct IovCursor<'a> {
    iov: &'a [libc::iovec],
    idx: usize,
    off: usize,
}

impl<'a> IovCursor<'a> {
    /// Starts at the first byte of `iov`.
    pub fn new(iov: &'a [libc::iovec]) -> Self {
        IovCursor {
            iov,
            idx: 0,
            off: 0,
        }
    }

    /// Appends iovecs for up to `n` further bytes, using at most `max` entries; returns the bytes
    /// taken (less than `n` only when `max` or the end is reached).
    pub fn take(&mut self, n: u64, max: usize, out: &mut Vec<libc::iovec>) -> u64 {
        let mut taken = 0u64;
        let mut used = 0;
        while taken < n && used < max && self.idx < self.iov.len() {
            let v = &self.iov[self.idx];
            let avail = v.iov_len - self.off;
            let want = usize::try_from(n - taken).unwrap_or(usize::MAX).min(avail);
            if want > 0 {
                out.push(libc::iovec {
                    // SAFETY: `off + want <= iov_len`, so the pointer stays inside the buffer.
                    iov_base: unsafe { v.iov_base.cast::<u8>().add(self.off) }.cast(),
                    iov_len: want,
                });
                used += 1;
            }
            taken += want as u64;
            self.off += want;
            if self.off == v.iov_len {
                self.idx += 1;
                self.off = 0;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn seg(a: u64, l: u32) -> Seg {
        Seg {
            addr: GuestAddress(a),
            len: l,
        }
    }

    #[test]
    fn skip_and_truncate() {
        let mut v = vec![seg(0, 10), seg(100, 10)];
        skip_front(&mut v, 12);
        assert_eq!(v, vec![seg(102, 8)]);
        let mut v = vec![seg(0, 10), seg(100, 10)];
        truncate_back(&mut v, 11);
        assert_eq!(v, vec![seg(0, 9)]);
        let mut v = vec![seg(0, 10), seg(100, 1)];
        truncate_back(&mut v, 1);
        assert_eq!(v, vec![seg(0, 10)]);
    }

    #[test]
    fn iovecs_span_regions_and_reject_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let mut out = Vec::new();
        host_iovecs(&mem, &[seg(0xf00, 0x200)], 8, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len + out[1].iov_len, 0x200);
        out.clear();
        assert!(host_iovecs(&mem, &[seg(0x1f00, 0x200)], 8, &mut out).is_err());
        out.clear();
        assert!(host_iovecs(&mem, &[seg(0xf00, 0x200)], 1, &mut out).is_err());
    }

    #[test]
    fn cursor_splits_at_byte_boundaries() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let mut c = IovCursor::new(&iov);
        let mut out = Vec::new();
        assert_eq!(c.take(5, 10, &mut out), 5);
        out.clear();
        assert_eq!(c.take(6, 10, &mut out), 6);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len, 3);
        assert_eq!(out[1].iov_len, 3);
        out.clear();
        assert_eq!(c.take(100, 10, &mut out), 5);
    }
}
