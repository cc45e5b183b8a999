//! The shared in-flight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings.
//!
//! The front-end keeps this memory across our restarts. Every chain we pop is marked in it before
//! its request runs and cleared when its used element is published, so that a restarted daemon
//! knows which requests its predecessor had taken but not completed, resubmits them in their
//! original order, and resumes the avail ring after them.
//!
//! Layout, one region per queue, back to back at a stride of
//! `round_up(16 * queue_size + 2, 64)` bytes (libvhost-user's, which DPDK and SPDK share): a
//! 16-byte header (`features` u64, `version` u16, `desc_num` u16, `last_batch_head` u16,
//! `used_idx` u16), then 16 bytes per descriptor (`inflight` u8, 5 padding bytes, `next` u16,
//! `counter` u64), little-endian. vhost 0.18's `QueueRegionSplit` has a 24-byte header and is not
//! used.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Version stored in an initialised queue region.
const VERSION: u16 = 1;
/// Size of a queue region's header.
const HEADER: usize = 16;
/// Size of one descriptor's state.
const DESC: usize = 16;
/// Largest queue size the region can describe (virtio's limit for split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes one queue's region takes for a queue of `queue_size` entries.
pub fn queue_stride(queue_size: u16) -> usize {
    (DESC * usize::from(queue_size) + 2).next_multiple_of(64)
}

/// Why a region cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The message's queue count or size is not one we can track.
    #[error("in-flight region for {queues} queues of {size}: {reason}")]
    Geometry {
        /// Queues named.
        queues: u16,
        /// Queue size named.
        size: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// The region does not fit the file or the address space.
    #[error("in-flight region of {size} bytes at offset {offset}: {reason}")]
    Placement {
        /// Bytes named.
        size: u64,
        /// Offset named.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A system call failed.
    #[error("in-flight region: {0}")]
    Io(#[from] io::Error),
}

/// A mapping of the whole in-flight area, shared with the front-end.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics; it lives until drop.
unsafe impl Send for Region {}
// SAFETY: as above; every access is an atomic load or store.
unsafe impl Sync for Region {}

impl Region {
    /// Creates a zeroed region for GET_INFLIGHT_FD: the file to hand to the front-end and our
    /// mapping of it.
    pub fn create(queues: u16, queue_size: u16) -> Result<(File, Region), InflightError> {
        check_geometry(queues, queue_size)?;
        let len = usize::from(queues) * queue_stride(queue_size);
        // SAFETY: a static NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-device-blk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: the descriptor was just created and nobody else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64)?;
        // The size is fixed from now on: neither side can make the other's mapping fault.
        // SAFETY: fcntl on a descriptor we own; no memory is involved.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        let region = Region::map(&file, 0, len, queues, queue_size)?;
        Ok((file, region))
    }

    /// Maps a region the front-end hands us (SET_INFLIGHT_FD), after checking that what it
    /// describes fits its file: only the part our queues need is mapped.
    pub fn open(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        check_geometry(queues, queue_size)?;
        let need = usize::from(queues) * queue_stride(queue_size);
        let bad = |reason| InflightError::Placement {
            size: mmap_size,
            offset: mmap_offset,
            reason,
        };
        if mmap_size < need as u64 {
            return Err(bad("smaller than the queues need"));
        }
        if mmap_offset % page_size() != 0 {
            return Err(bad("offset not page-aligned"));
        }
        let meta = file.metadata()?;
        let end = mmap_offset
            .checked_add(need as u64)
            .ok_or(bad("past 2^64"))?;
        // Touching a shared mapping past the end of its file raises SIGBUS.
        if !meta.file_type().is_file() || end > meta.len() {
            return Err(bad("past the end of its file"));
        }
        Region::map(file, mmap_offset, need, queues, queue_size)
    }

    fn map(
        file: &File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        let off = libc::off_t::try_from(offset).map_err(|_| InflightError::Placement {
            size: len as u64,
            offset,
            reason: "offset too large",
        })?;
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; the kernel picks the
        // address; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
            queues,
            queue_size,
        })
    }

    /// The queue size the region was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region of queue `index` for a ring of `ring_size` entries, if it has one that can hold
    /// that ring.
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Option<QueueLog> {
        if index >= self.queues || ring_size == 0 || ring_size > self.queue_size {
            return None;
        }
        Some(QueueLog {
            region: self.clone(),
            base: usize::from(index) * queue_stride(self.queue_size),
            size: ring_size,
            counter: 0,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes; every QueueLog holds an Arc, so none is left.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn check_geometry(queues: u16, queue_size: u16) -> Result<(), InflightError> {
    let reason = if queues == 0 {
        "no queue"
    } else if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        "queue size not a power of two up to 32768"
    } else {
        return Ok(());
    };
    Err(InflightError::Geometry {
        queues,
        size: queue_size,
        reason,
    })
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096).max(1)
}

/// One queue's part of the region, written only by that queue's thread.
pub struct QueueLog {
    region: Arc<Region>,
    base: usize,
    /// The ring's size: heads at or above it are never tracked.
    size: u16,
    /// The pop order of the next chain.
    counter: u64,
}

/// What [`QueueLog::recover`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken by the previous incarnation and not completed, in the order they were taken.
    pub resubmit: Vec<u16>,
    /// The region was fresh (first start): nothing to recover.
    pub fresh: bool,
}

impl QueueLog {
    fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= queue_stride(self.region.queue_size));
        // SAFETY: `offset` is inside this queue's region (header fields, or a descriptor entry of
        // an index below `size` <= the region's queue size), which lies inside the mapping that
        // `region` keeps alive; the mapping is page-aligned, strides are multiples of 64 and every
        // field is naturally aligned, so the atomic types' alignment holds.
        unsafe { &*self.region.ptr.add(self.base + offset).cast::<T>() }
    }

    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }
    fn desc_num(&self) -> &AtomicU16 {
        self.at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER + DESC * usize::from(head))
    }
    fn next(&self, head: u16) -> &AtomicU16 {
        self.at(HEADER + DESC * usize::from(head) + 6)
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER + DESC * usize::from(head) + 8)
    }

    /// Marks `head` as taken, before its request runs. Stores are in program order (Release):
    /// a killed process loses none it executed, and the front-end reads them only after we
    /// are gone.
    pub fn mark(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter(head).store(self.counter, Ordering::Release);
        self.counter += 1;
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Records `head` as the batch about to be published (before its used element is written).
    pub fn publishing(&self, head: u16) {
        if head >= self.size {
            return;
        }
        let last = self.last_batch_head();
        self.next(head)
            .store(last.load(Ordering::Relaxed), Ordering::Release);
        last.store(head, Ordering::Release);
    }

    /// Clears `head` once its used element is published; `used_idx` is the ring's used index
    /// after it.
    pub fn published(&self, head: u16, used_idx: u16) {
        if head < self.size {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// Makes the region consistent with the ring at a ring start, `ring_used` being the used
    /// index found in guest memory, and says what to resubmit.
    ///
    /// A fresh region (never initialised, or laid out for another ring size) is initialised with
    /// the ring's used index, so that a later restart does not take published chains for
    /// unpublished ones. Otherwise the chains published after the last `used_idx` update (a
    /// process killed between publishing and clearing) are cleared, then every chain still
    /// marked is returned in the order it was taken. Nothing the front-end wrote here can make
    /// this read or write outside the region or loop: walks are bounded by the ring size.
    pub fn recover(&mut self, ring_used: u16) -> Recovery {
        let n = self.size;
        if self.version().load(Ordering::Acquire) != VERSION
            || self.desc_num().load(Ordering::Acquire) != n
        {
            for head in 0..n {
                self.inflight(head).store(0, Ordering::Relaxed);
                self.next(head).store(0, Ordering::Relaxed);
                self.counter(head).store(0, Ordering::Relaxed);
            }
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.desc_num().store(n, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            self.counter = 1;
            return Recovery {
                resubmit: Vec::new(),
                fresh: true,
            };
        }
        let unrecorded = ring_used.wrapping_sub(self.used_idx().load(Ordering::Acquire));
        // More than a ring's worth is not something we wrote: trust only the marks.
        if unrecorded <= n {
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            for _ in 0..unrecorded {
                if head >= n {
                    break;
                }
                self.inflight(head).store(0, Ordering::Release);
                head = self.next(head).load(Ordering::Acquire);
            }
        }
        self.used_idx().store(ring_used, Ordering::Release);
        let mut marked: Vec<(u64, u16)> = (0..n)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) != 0)
            .map(|h| (self.counter(h).load(Ordering::Acquire), h))
            .collect();
        marked.sort_unstable();
        // Renumbered from 1 in that order, so that chains taken from now on come after them
        // whatever counters the region held.
        for (i, &(_, h)) in marked.iter().enumerate() {
            self.counter(h).store(i as u64 + 1, Ordering::Release);
        }
        self.counter = marked.len() as u64 + 1;
        Recovery {
            resubmit: marked.into_iter().map(|(_, h)| h).collect(),
            fresh: false,
        }
    }
}

impl crate::virtio::worker::InflightLog for QueueLog {
    fn taken(&mut self, head: u16) {
        self.mark(head);
    }
    fn publishing(&mut self, head: u16) {
        QueueLog::publishing(self, head);
    }
    fn published(&mut self, head: u16, used_idx: u16) {
        QueueLog::published(self, head, used_idx);
    }
}

#[cfg(test)]
mod tests;
