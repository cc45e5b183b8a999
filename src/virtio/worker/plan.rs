//! Planning a request: validating it and turning it into host operations (guest buffers →
//! host iovecs, the backend's extents → I/O, copy-on-write pieces, discards and write-zeroes),
//! before anything is submitted.

use std::io;

use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

use super::super::guest::{self, IovCursor};
use super::super::request::{self, Request, RequestType};
use super::super::status::RequestError;
use super::super::{DiscardMode, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use super::{GuestMem, QueueWorker, MAX_REQUEST_BYTES};
use crate::block::{self, probe, BlockError, ExtraData, ExtraWrite, HostOp, Target};
use crate::io::{sys, IoOp, OpKind, Transfer, MAX_IOVECS};
use crate::util::aligned::{zero_block, AlignedBuf, ZERO_BLOCK_LEN};

/// Page-cache reads from this size on are split in two, one half copied by io_uring's workers.
pub(super) const OFFLOAD_MIN: u64 = 512 << 10;

/// Size of the O_DIRECT bounce buffer used for misaligned guest buffers.
const BOUNCE_LEN: usize = 1 << 20;

/// A copy-on-write that waits for the reads filling its buffer.
pub(super) struct Deferred {
    pub(super) write: Option<IoOp>,
    pub(super) reads_left: usize,
}

/// What executing a request produced before any host I/O.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) ops: Vec<IoOp>,
    pub(super) host_ops: Vec<HostOp>,
    pub(super) used_len: u32,
    pub(super) ticket: Option<u64>,
    /// See [`InFlight::metadata`].
    pub(super) metadata: bool,
    pub(super) buffers: Vec<AlignedBuf>,
    /// Reads for the deferred write at the index they carry.
    pub(super) fill_reads: Vec<(usize, IoOp)>,
    /// Reads to run beside the queue's thread (see [`Engine::push_offloaded`]).
    pub(super) offloaded: Vec<IoOp>,
    pub(super) deferred: Vec<Deferred>,
}

impl QueueWorker {
    /// Validates a request and turns it into host operations.
    pub(super) fn plan(&mut self, req: &Request, mem: &GuestMem) -> Result<Plan, RequestError> {
        let mut plan = Plan {
            used_len: 1,
            ..Default::default()
        };
        match req.kind {
            RequestType::In | RequestType::Out => self.plan_rw(req, mem, &mut plan)?,
            RequestType::Flush => self.backend.flush(&mut plan.host_ops)?,
            RequestType::GetId => {
                let n = guest::write_bytes(mem, &req.data, &self.settings.serial)?;
                plan.used_len = n as u32 + 1;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                plan.metadata = true;
                self.plan_discard(req, mem, &mut plan.host_ops)?
            }
            RequestType::Unsupported(t) => return Err(RequestError::UnsupportedType(t)),
        }
        Ok(plan)
    }

    /// Byte range of a request, checked for overflow and logical-block alignment.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::Overflow(sector))?;
        let lbs = u64::from(self.settings.logical_block_size);
        if offset % lbs != 0 || len % lbs != 0 {
            return Err(RequestError::Misaligned { offset, len });
        }
        Ok(offset)
    }

    fn plan_rw(
        &mut self,
        req: &Request,
        mem: &GuestMem,
        plan: &mut Plan,
    ) -> Result<(), RequestError> {
        let write = req.kind == RequestType::Out;
        let len = guest::total(&req.data);
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        let offset = self.byte_range(req.sector, len)?;
        if write && self.settings.read_only {
            return Err(BlockError::ReadOnly.into());
        }
        block::check_range(offset, len, self.backend.info().size)?;
        if !write {
            plan.used_len = u32::try_from(len + 1).unwrap_or(u32::MAX);
        }
        if len == 0 {
            return Ok(());
        }
        if write && offset == 0 && self.backend.info().probed_raw {
            let mut head = [0u8; 512];
            let n = (len as usize).min(head.len());
            guest::read_bytes(mem, &req.data, &mut head[..n])?;
            if let Some(format) = probe::header_signature(&head[..n]) {
                return Err(RequestError::ProtectedHeader(format));
            }
        }
        self.iov.clear();
        let max_iov = self.settings.max_descriptors() * 4;
        guest::host_iovecs(mem, &req.data, max_iov, &mut self.iov)?;
        let align = self.backend.info().mem_align;
        let bounce = align > 1
            && self
                .iov
                .iter()
                .any(|v| v.iov_base as usize % align != 0 || v.iov_len % align != 0);
        self.extents.clear();
        let mut extra = Vec::new();
        if write {
            let wp = self.backend.begin_write(offset, len, &self.waker)?;
            self.extents = wp.extents;
            plan.ticket = wp.ticket;
            plan.metadata = wp.metadata;
            extra = wp.extra;
        } else {
            self.backend.map_read(offset, len, &mut self.extents)?;
        }
        let mut cursor = IovCursor::new(&self.iov);
        let mut pieces = Vec::new();
        for ext in &self.extents {
            match ext.target {
                Target::Data { fd, offset } if bounce => {
                    // Guest buffers misaligned for O_DIRECT: through an aligned buffer,
                    // synchronously, in bounded chunks.
                    let buf = self
                        .bounce
                        .get_or_insert_with(|| AlignedBuf::new(BOUNCE_LEN, align.max(4096)));
                    let mut done = 0;
                    while done < ext.len {
                        let n = (ext.len - done).min(BOUNCE_LEN as u64);
                        pieces.clear();
                        cursor.take(n, usize::MAX, &mut pieces);
                        if write {
                            // SAFETY: the pieces are guest buffers of this request, mapped while
                            // `mem` lives.
                            unsafe { copy_iov(&pieces, buf.as_mut_slice(), true) };
                        }
                        let mut op = IoOp {
                            fd,
                            offset: offset + done,
                            kind: if write { OpKind::Write } else { OpKind::Read },
                            iov: vec![libc::iovec {
                                iov_base: buf.as_mut_ptr().cast(),
                                iov_len: n as usize,
                            }],
                            tag: 0,
                        };
                        let res = sys::execute(&mut op);
                        if res < 0 {
                            if let Some(t) = plan.ticket.take() {
                                let _ = self.backend.commit_write(t, false);
                            }
                            return Err(RequestError::Host(io::Error::from_raw_os_error(-res)));
                        }
                        if !write {
                            // SAFETY: as above; IN buffers are writable descriptors.
                            unsafe { copy_iov(&pieces, buf.as_mut_slice(), false) };
                        }
                        done += n;
                    }
                }
                Target::Data { fd, offset } => {
                    // A large read from the page cache is a memory copy: the second half runs
                    // beside this thread, on another core.
                    let half = if !write && align <= 1 && ext.len >= OFFLOAD_MIN {
                        (ext.len / 2).next_multiple_of(4096)
                    } else {
                        ext.len
                    };
                    let mut done = 0;
                    while done < ext.len {
                        let mut iov = Vec::new();
                        let part_end = if done < half { half } else { ext.len };
                        let n = cursor.take(part_end - done, MAX_IOVECS, &mut iov);
                        if n == 0 {
                            break;
                        }
                        let op = IoOp {
                            fd,
                            offset: offset + done,
                            kind: if write { OpKind::Write } else { OpKind::Read },
                            iov,
                            tag: 0,
                        };
                        let first_half = done < half;
                        done += n;
                        if first_half {
                            // A read not split for io_uring's workers: copied from a mapping of the
                            // file if it is cached.
                            let copied = !write
                                && half == ext.len
                                && self.mapped.as_mut().is_some_and(|m| {
                                    // SAFETY: IN buffers are writable guest memory, mapped while
                                    // `mem` lives; no reference covers guest memory.
                                    unsafe { m.read(fd, op.offset, &op.iov) }
                                });
                            if !copied {
                                plan.ops.push(op);
                            }
                        } else {
                            plan.offloaded.push(op);
                        }
                    }
                }
                Target::Zero => {
                    pieces.clear();
                    cursor.take(ext.len, usize::MAX, &mut pieces);
                    if !write {
                        // SAFETY: IN buffers are writable descriptors inside guest memory that
                        // `mem` keeps mapped.
                        unsafe { Transfer::zero(&pieces) };
                    }
                }
                Target::Compressed {
                    image,
                    descriptor,
                    skip,
                } => {
                    self.backend
                        .read_compressed(image, descriptor, &mut self.scratch)?;
                    let cluster = &mut self.scratch.output;
                    let end = skip
                        .checked_add(ext.len)
                        .filter(|&e| e <= cluster.len() as u64)
                        .ok_or(BlockError::Corrupt("compressed extent outside its cluster"))?;
                    pieces.clear();
                    cursor.take(ext.len, usize::MAX, &mut pieces);
                    if !write {
                        // SAFETY: IN buffers are writable guest memory mapped while `mem` lives.
                        unsafe {
                            copy_iov(&pieces, &mut cluster[skip as usize..end as usize], false)
                        };
                    }
                }
            }
        }
        add_extra_writes(plan, extra);
        Ok(())
    }

    fn plan_discard(
        &mut self,
        req: &Request,
        mem: &GuestMem,
        out: &mut Vec<HostOp>,
    ) -> Result<(), RequestError> {
        if self.settings.read_only {
            return Err(BlockError::ReadOnly.into());
        }
        let discard = req.kind == RequestType::Discard;
        let segments = request::discard_segments(mem, &req.data, MAX_DISCARD_SEGMENTS as usize)?;
        let mut ranges = Vec::with_capacity(segments.len());
        // Validate every segment before planning any, so a bad one changes nothing.
        for s in &segments {
            let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return Err(RequestError::UnsupportedFlags(s.flags));
            }
            if s.num_sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::SegmentTooLarge(s.num_sectors));
            }
            let len = u64::from(s.num_sectors) * SECTOR_SIZE;
            let offset = self.byte_range(s.sector, len)?;
            block::check_range(offset, len, self.backend.info().size)?;
            ranges.push((offset, len, unmap));
        }
        let unmap_allowed = self.settings.discard == DiscardMode::Unmap;
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            if discard {
                if unmap_allowed {
                    self.backend.discard(offset, len, true, &self.waker, out)?;
                }
            } else {
                self.backend
                    .write_zeroes(offset, len, unmap && unmap_allowed, &self.waker, out)?;
            }
        }
        Ok(())
    }
}

/// Adds a write's copy-on-write and zero pieces to its plan. A piece that borders a guest data
/// write joins it (one host write per cluster, as QEMU does); a write whose buffers still need
/// reading waits for those reads.
fn add_extra_writes(plan: &mut Plan, extra: Vec<ExtraWrite>) {
    let mut reads_of: Vec<Vec<IoOp>> = plan.ops.iter().map(|_| Vec::new()).collect();
    for x in extra {
        let (mut buf, reads) = match x.data {
            ExtraData::Zero(n) => {
                for op in zero_ops(x.fd, x.offset, n) {
                    plan.ops.push(op);
                    reads_of.push(Vec::new());
                }
                continue;
            }
            ExtraData::Bytes { buf, reads } => (buf, reads),
        };
        let base = buf.as_mut_ptr();
        let len = buf.len();
        // An internal invariant of the backends; a read outside the buffer would corrupt memory.
        assert!(
            reads
                .iter()
                .all(|r| r.at.checked_add(r.len).is_some_and(|e| e <= len)),
            "copy-on-write read outside its buffer"
        );
        let read_ops = reads.iter().map(|r| IoOp {
            fd: r.fd,
            offset: r.offset,
            kind: OpKind::Read,
            iov: vec![libc::iovec {
                iov_base: base.wrapping_add(r.at).cast(),
                iov_len: r.len,
            }],
            tag: 0,
        });
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        let (start, end) = (x.offset, x.offset + len as u64);
        let neighbour = plan.ops.iter().position(|op| {
            op.kind == OpKind::Write
                && op.fd == x.fd
                && op.iov.len() < MAX_IOVECS
                && (end == op.offset || op.offset + Transfer::len(&op.iov) == start)
        });
        match neighbour {
            Some(j) => {
                let op = &mut plan.ops[j];
                if end == op.offset {
                    op.iov.insert(0, iov);
                    op.offset = start;
                } else {
                    op.iov.push(iov);
                }
                reads_of[j].extend(read_ops);
            }
            None => {
                plan.ops.push(IoOp {
                    fd: x.fd,
                    offset: start,
                    kind: OpKind::Write,
                    iov: vec![iov],
                    tag: 0,
                });
                reads_of.push(read_ops.collect());
            }
        }
        plan.buffers.push(buf);
    }
    if reads_of.iter().all(Vec::is_empty) {
        return;
    }
    for (op, reads) in std::mem::take(&mut plan.ops).into_iter().zip(reads_of) {
        if reads.is_empty() {
            plan.ops.push(op);
            continue;
        }
        let k = plan.deferred.len();
        plan.deferred.push(Deferred {
            write: Some(op),
            reads_left: reads.len(),
        });
        plan.fill_reads.extend(reads.into_iter().map(|r| (k, r)));
    }
}

/// Write operations that put `len` zero bytes at `offset`, from the shared zero block.
pub(super) fn zero_ops(fd: i32, offset: u64, len: u64) -> Vec<IoOp> {
    let zero = zero_block();
    let per_op = (ZERO_BLOCK_LEN * MAX_IOVECS) as u64;
    let mut ops = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(per_op);
        let iov = (0..n.div_ceil(ZERO_BLOCK_LEN as u64))
            .map(|i| libc::iovec {
                // Writes only read from the buffer; the kernel never stores through it.
                iov_base: zero.as_ptr() as *mut libc::c_void,
                iov_len: (n - i * ZERO_BLOCK_LEN as u64).min(ZERO_BLOCK_LEN as u64) as usize,
            })
            .collect();
        ops.push(IoOp {
            fd,
            offset: offset + done,
            kind: OpKind::Write,
            iov,
            tag: 0,
        });
        done += n;
    }
    ops
}

/// Copies between guest iovecs and the start of `buf`: into `buf` if `to_buf`, out of it otherwise.
///
/// # Safety
/// Every iovec must describe mapped memory of `iov_len` bytes, writable when `to_buf` is false.
unsafe fn copy_iov(iov: &[libc::iovec], buf: &mut [u8], to_buf: bool) {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(buf.len() - at);
        let p = v.iov_base.cast::<u8>();
        // SAFETY: the iovec is valid (caller's contract); `buf[at..at + n]` is in bounds.
        unsafe {
            if to_buf {
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr().add(at), n);
            } else {
                std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), p, n);
            }
        }
        at += n;
    }
}
