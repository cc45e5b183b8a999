//! The io_uring engine: one ring per queue, completions signalled through a registered eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, IoOp, OpKind, Transfer};

/// io_uring engine for one queue.
pub struct UringEngine {
    ring: IoUring,
    event: EventFd,
    /// Operations by slot; the slot number is the SQE's user_data.
    slots: Vec<Option<IoOp>>,
    free: Vec<usize>,
    /// Slots waiting for room in the submission queue, and whether to hand each to the kernel's
    /// workers.
    pending: VecDeque<(usize, bool)>,
    /// Slots the kernel owns (bounded by the completion queue's size).
    in_kernel: usize,
    cq_capacity: usize,
    in_flight: usize,
    /// The kernel has IORING_OP_READ/WRITE (5.6), cheaper than the vectored ones for one buffer.
    plain_rw: bool,
}

impl UringEngine {
    /// Sets up a ring sized for `depth` operations and checks the opcodes we need.
    pub fn new(depth: u32) -> io::Result<Self> {
        let entries = depth.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder().build(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks {name}"),
                ));
            }
        }
        let plain_rw =
            probe.is_supported(opcode::Read::CODE) && probe.is_supported(opcode::Write::CODE);
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let cq_capacity = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            in_kernel: 0,
            cq_capacity,
            in_flight: 0,
            plain_rw,
        })
    }

    pub(super) fn push(&mut self, op: IoOp, offload: bool) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(op);
                s
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        };
        self.in_flight += 1;
        self.pending.push_back((slot, offload));
    }

    fn entry(op: &IoOp, slot: usize, offload: bool, plain_rw: bool) -> squeue::Entry {
        let fd = types::Fd(op.fd);
        // One buffer: the plain opcodes spare the kernel importing an iovec array.
        let single = match op.iov.as_slice() {
            [v] if plain_rw && v.iov_len <= u32::MAX as usize => Some(v),
            _ => None,
        };
        let e = match (op.kind, single) {
            (OpKind::Read, Some(v)) => opcode::Read::new(fd, v.iov_base.cast(), v.iov_len as u32)
                .offset(op.offset)
                .build(),
            (OpKind::Write, Some(v)) => opcode::Write::new(fd, v.iov_base.cast(), v.iov_len as u32)
                .offset(op.offset)
                .build(),
            (OpKind::Read, None) => opcode::Readv::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(op.offset)
                .build(),
            (OpKind::Write, None) => opcode::Writev::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
                .offset(op.offset)
                .build(),
            (OpKind::Fdatasync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (OpKind::Fallocate { mode, len }, _) => opcode::Fallocate::new(fd, len)
                .offset(op.offset)
                .mode(mode)
                .build(),
        };
        let e = e.user_data(slot as u64);
        if offload {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        }
    }

    pub(super) fn submit(&mut self) {
        let mut queued = 0;
        {
            let mut sq = self.ring.submission();
            while self.in_kernel + queued < self.cq_capacity && !sq.is_full() {
                let Some((slot, offload)) = self.pending.pop_front() else {
                    break;
                };
                let Some(op) = self.slots[slot].as_ref() else {
                    continue;
                };
                let entry = Self::entry(op, slot, offload, self.plain_rw);
                // SAFETY: the iovec array and the buffers it points to live in `self.slots[slot]`
                // and the submitter's request until this slot's completion is reaped; the slot's
                // `IoOp` is not modified while the kernel owns it.
                if unsafe { sq.push(&entry) }.is_err() {
                    self.pending.push_front((slot, offload));
                    break;
                }
                queued += 1;
            }
        }
        if queued == 0 && self.ring.submission().is_empty() {
            return;
        }
        let mut attempts = 0;
        loop {
            match self.ring.submit() {
                Ok(n) => {
                    self.in_kernel += n;
                    if self.ring.submission().is_empty() {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                        && self.in_kernel > 0 =>
                {
                    // Completions will come and the next reap submits again.
                    break;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts > 1000 {
                        warn!("io_uring submit keeps failing: {e}");
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    pub(super) fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.event.read();
        let mut requeue = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            self.in_kernel -= 1;
            let slot = cqe.user_data() as usize;
            let res = cqe.result();
            let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let result = match op.kind {
                OpKind::Read | OpKind::Write if res >= 0 => {
                    let n = res as usize;
                    if n == 0 && op.kind == OpKind::Read {
                        // End of file: the rest reads as zeroes.
                        // SAFETY: a read op's iovecs are writable memory kept alive by its submitter.
                        unsafe { Transfer::zero(&op.iov) };
                        0
                    } else if n == 0 {
                        -libc::EIO
                    } else if (n as u64) < Transfer::len(&op.iov) {
                        // Short transfer: continue where the kernel stopped.
                        Transfer::advance(&mut op.iov, n);
                        op.offset += n as u64;
                        self.pending.push_front((slot, false));
                        requeue = true;
                        continue;
                    } else {
                        0
                    }
                }
                _ => res.min(0),
            };
            if let Some(op) = self.slots[slot].take() {
                self.free.push(slot);
                self.in_flight -= 1;
                out.push(Completion {
                    tag: op.tag,
                    result,
                });
            }
        }
        if requeue || !self.pending.is_empty() {
            self.submit();
        }
    }

    /// Enters the kernel once so that completions it has not posted yet (task work) are, then
    /// reaps without blocking.
    pub(super) fn poke(&mut self, out: &mut Vec<Completion>) {
        if self.in_kernel > 0 {
            let _ = self.ring.submitter().submit();
        }
        self.reap(out);
    }

    pub(super) fn wait(&mut self, out: &mut Vec<Completion>) {
        self.submit();
        let before = out.len();
        while self.in_flight > 0 && out.len() == before {
            if self.in_kernel > 0 {
                if let Err(e) = self.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        warn!("io_uring wait failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            self.reap(out);
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn notifier(&self) -> std::io::Result<EventFd> {
        self.event.try_clone()
    }

    pub(super) fn notify_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still be writing into memory referenced by in-flight operations.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.wait(&mut sink);
            sink.clear();
        }
    }
}
