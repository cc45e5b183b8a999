//! qcow2: open an arbitrary image, run a sequence of reads, writes, write-zeroes, discards and
//! flushes through the block layer (executed with the same blocking calls as the thread
//! engine), and check every read against a shadow model of the first [`WINDOW`] bytes; then sync,
//! reopen and check again.
//!
//! Input: a little-endian u16 image length, the image, then 4-byte operations: byte 0 the kind
//! (`% 5`: read, write, write-zeroes, discard, flush; bit 7: UNMAP for write-zeroes), bytes 1-2
//! the first sector (modulo the window), byte 3 the sector count minus one (modulo 16).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::{le16, memfd};
use crate::block::file::ImageFile;
use crate::block::qcow2::check::{self, Repair};
use crate::block::qcow2::header::{self, Header};
use crate::block::{
    self, BlockBackend, CacheMode, ExtraData, HostOp, ImageFormat, LazyRefcounts, OpenOptions,
    Scratch, Target, Wake, Waker,
};
use crate::io::{sys, IoOp, OpKind};

/// Bytes of the virtual disk the model follows.
const WINDOW: u64 = 64 << 10;
const SECTOR: u64 = 512;

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

/// One blocking transfer between `buf` and a file.
fn transfer(fd: i32, offset: u64, buf: *mut u8, len: usize, write: bool) -> Result<(), ()> {
    let mut op = IoOp {
        fd,
        offset,
        kind: if write { OpKind::Write } else { OpKind::Read },
        iov: vec![libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        }],
        tag: 0,
    };
    if sys::execute(&mut op) == 0 {
        Ok(())
    } else {
        Err(())
    }
}

fn read(
    b: &dyn BlockBackend,
    scratch: &mut Scratch,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ()> {
    let mut extents = Vec::new();
    b.map_read(offset, buf.len() as u64, &mut extents)
        .map_err(drop)?;
    let mut at = 0usize;
    for e in extents {
        let len = usize::try_from(e.len).expect("extent length");
        let piece = buf
            .get_mut(at..at + len)
            .expect("read extents stay inside the range");
        match e.target {
            Target::Zero => piece.fill(0),
            Target::Data { fd, offset } => transfer(fd, offset, piece.as_mut_ptr(), len, false)?,
            Target::Compressed {
                image,
                descriptor,
                skip,
            } => {
                b.read_compressed(image, descriptor, scratch)
                    .map_err(drop)?;
                let src = usize::try_from(skip)
                    .ok()
                    .and_then(|s| scratch.output.get(s..s + len))
                    .ok_or(())?;
                piece.copy_from_slice(src);
            }
        }
        at += len;
    }
    assert_eq!(at, buf.len(), "read extents cover the range");
    Ok(())
}

fn write_zero_bytes(fd: i32, mut offset: u64, mut len: u64) -> Result<(), ()> {
    let mut zero = vec![0u8; 64 << 10];
    while len > 0 {
        let n = len.min(zero.len() as u64) as usize;
        transfer(fd, offset, zero.as_mut_ptr(), n, true)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn write(b: &dyn BlockBackend, waker: &Waker, offset: u64, data: &[u8]) -> Result<(), ()> {
    let plan = b
        .begin_write(offset, data.len() as u64, waker)
        .map_err(drop)?;
    let mut ok = Ok(());
    let mut at = 0usize;
    for e in &plan.extents {
        let len = usize::try_from(e.len).expect("extent length");
        let Target::Data { fd, offset } = e.target else {
            panic!("a write extent that is not data: {e:?}");
        };
        let piece = data
            .get(at..at + len)
            .expect("write extents inside the range");
        // The write only reads from the buffer.
        ok = ok.and(transfer(fd, offset, piece.as_ptr().cast_mut(), len, true));
        at += len;
    }
    assert_eq!(at, data.len(), "write extents cover the range");
    for mut x in plan.extra {
        if x.data.fill_now().is_err() {
            ok = Err(());
            continue;
        }
        ok = ok.and(match x.data {
            ExtraData::Bytes { buf, .. } => {
                transfer(x.fd, x.offset, buf.as_ptr().cast_mut(), buf.len(), true)
            }
            ExtraData::Zero(n) => write_zero_bytes(x.fd, x.offset, n),
        });
    }
    if let Some(ticket) = plan.ticket {
        b.commit_write(ticket, ok.is_ok()).map_err(drop)?;
    }
    ok
}

fn host_ops(ops: &[HostOp]) -> Result<(), ()> {
    for op in ops {
        match *op {
            HostOp::Sync { fd } => {
                let mut op = IoOp {
                    fd,
                    offset: 0,
                    kind: OpKind::Fdatasync,
                    iov: Vec::new(),
                    tag: 0,
                };
                if sys::execute(&mut op) != 0 {
                    return Err(());
                }
            }
            // Advisory: leaving the data is a valid way to discard.
            HostOp::Discard { .. } => {}
            HostOp::Zero {
                fd, offset, len, ..
            } => write_zero_bytes(fd, offset, len)?,
        }
    }
    Ok(())
}

/// What the guest may expect of the first [`WINDOW`] bytes.
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
    /// The image was consistent to begin with: only then is the model an oracle (an image whose
    /// refcounts are wrong may hand one host cluster to two guest clusters).
    oracle: bool,
}

impl Model {
    /// Checks a successful read against what is known, and learns the rest.
    fn read(&mut self, offset: u64, got: &[u8]) {
        for (i, &b) in got.iter().enumerate() {
            let at = offset as usize + i;
            if self.known[at] && self.oracle {
                assert_eq!(
                    self.data[at], b,
                    "byte {at} changed behind the guest's back"
                );
            } else {
                self.known[at] = true;
                self.data[at] = b;
            }
        }
    }

    fn set(&mut self, offset: u64, data: Option<&[u8]>, len: usize) {
        let r = offset as usize..offset as usize + len;
        match data {
            Some(d) => {
                self.data[r.clone()].copy_from_slice(d);
                self.known[r].fill(true);
            }
            None => self.known[r].fill(false),
        }
    }
}

/// Whether `qcow2 check` finds the image free of corruption (leaks allowed) and clean.
fn consistent(path: &std::path::Path) -> bool {
    let Ok(file) = ImageFile::open(path, true, CacheMode::Writeback) else {
        return false;
    };
    let head_len = file.size.min(1 << header::MAX_CLUSTER_BITS) as usize;
    let Ok(head) = file.read_at(0, head_len) else {
        return false;
    };
    let Ok(h) = Header::parse(&head, file.size) else {
        return false;
    };
    let r = check::check(&file, &h, Repair::None);
    !h.dirty() && !h.corrupt() && r.corruptions == 0 && r.check_errors == 0
}

fn open(path: &std::path::Path) -> Option<Arc<dyn BlockBackend>> {
    block::open(&OpenOptions {
        path: path.to_owned(),
        format: Some(ImageFormat::Qcow2),
        read_only: false,
        cache: CacheMode::Writeback,
        l2_cache_size: None,
        lazy_refcounts: LazyRefcounts::Auto,
        locking: block::lock::Locking::Off,
    })
    .ok()
}

/// Runs the image and operations the input describes. Returns how many operations succeeded
/// (0 when the image does not open).
pub fn qcow2_ops(data: &[u8]) -> usize {
    let n = usize::from(le16(data, 0)).min(data.len().saturating_sub(2));
    let image = data.get(2..2 + n).unwrap_or(&[]);
    let ops = data.get(2 + n..).unwrap_or(&[]);
    // Backing and data files are named by path: never let an input open host files.
    if let Ok(h) = Header::parse(image, image.len() as u64) {
        if h.backing_file.is_some() || h.data_file.is_some() {
            return 0;
        }
    }
    let file = memfd(c"fuzz-qcow2", image, 0);
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let oracle = consistent(&path);
    let Some(backend) = open(&path) else {
        return 0;
    };
    let window = backend.info().size.min(WINDOW) / SECTOR * SECTOR;
    if window == 0 {
        return 0;
    }
    let mut done = 0;
    let mut model = Model {
        data: vec![0; window as usize],
        known: vec![false; window as usize],
        oracle,
    };
    let waker: Waker = Arc::new(NoWake);
    let mut scratch = Scratch::default();
    let mut buf = vec![0u8; 16 * SECTOR as usize];
    for (i, op) in ops.chunks_exact(4).enumerate() {
        let offset = u64::from(le16(op, 1)) % (window / SECTOR) * SECTOR;
        let len = ((u64::from(op[3]) % 16 + 1) * SECTOR).min(window - offset);
        let len_us = len as usize;
        let mut hops = Vec::new();
        match (op[0] & 0x7f) % 5 {
            0 => {
                if read(&*backend, &mut scratch, offset, &mut buf[..len_us]).is_ok() {
                    model.read(offset, &buf[..len_us]);
                    done += 1;
                }
            }
            1 => {
                let pattern: Vec<u8> = (0..len_us)
                    .map(|j| (i as u8).wrapping_mul(31) ^ (j as u8) ^ 0x5a)
                    .collect();
                let ok = write(&*backend, &waker, offset, &pattern).is_ok();
                model.set(offset, ok.then_some(&pattern[..]), len_us);
                done += usize::from(ok);
            }
            2 => {
                let unmap = op[0] & 0x80 != 0;
                let ok = backend
                    .write_zeroes(offset, len, unmap, &waker, &mut hops)
                    .is_ok()
                    && host_ops(&hops).is_ok();
                model.set(offset, ok.then_some(&ZEROES[..len_us]), len_us);
                done += usize::from(ok);
            }
            3 => {
                let _ = backend.discard(offset, len, true, &waker, &mut hops);
                let _ = host_ops(&hops);
                model.set(offset, None, len_us);
            }
            _ => {
                if backend.flush(&mut hops).is_ok() {
                    let _ = host_ops(&hops);
                }
            }
        }
    }
    if backend.sync().is_err() {
        return done;
    }
    drop(backend);
    // A consistent image stays consistent, and what was written and synced is there after
    // reopening.
    assert!(
        !oracle || consistent(&path),
        "the operations corrupted the image"
    );
    let Some(backend) = open(&path) else {
        return done;
    };
    let mut at = 0;
    while at < window {
        let n = (window - at).min(buf.len() as u64) as usize;
        if read(&*backend, &mut scratch, at, &mut buf[..n]).is_ok() {
            model.read(at, &buf[..n]);
        }
        at += n as u64;
    }
    done
}

static ZEROES: [u8; 16 * SECTOR as usize] = [0; 16 * SECTOR as usize];
