//! The write side of the active image: cluster allocation with copy-on-write only where needed,
//! metadata commits after the data is written, lazy refcounts with the dirty bit, discard and
//! write-zeroes. Getting the metadata into the file (write-through, flush, clean close) is in
//! `writeback.rs`.
//!
//! Locking: `Writable::meta` guards the refcounts, the in-flight allocations and pending commits;
//! it is never held across I/O. Reads of missing L2 tables happen before it is taken.
//! `Writable::writeback` serializes metadata writes (write-through, flush, close) and is held
//! across them; it never blocks lookups or the data path.

mod writeback;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::info;

use super::cache::L2Table;
use super::header::{INCOMPAT_DIRTY, OFFSET_INCOMPATIBLE};
use super::l2::{self, L2Mapping, SubState, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::refcount::Refcounts;
use super::Qcow2Image;
use crate::block::{
    BlockError, Extent, ExtraData, ExtraWrite, FillRead, HostOp, Scratch, Target, Waker, WritePlan,
    FILL_ALIGN,
};
use crate::util::aligned::AlignedBuf;

/// Allocation state of a writable image.
pub(super) struct Writable {
    meta: Mutex<Meta>,
    writeback: Mutex<writeback::WriteBack>,
    /// Metadata changed in memory since the last write-through or write-back.
    changed: AtomicBool,
    /// Refcounts are written only at clean close; the dirty bit covers the gap.
    lazy: bool,
    /// Eager refcounts: how many free clusters the refcount blocks in the file count ahead of
    /// allocation (see [`Refcounts::reserve_ahead`]).
    reserve: usize,
    /// End of the file in bytes, as allocation has grown it.
    end: AtomicU64,
    /// In-place writes in flight: clusters freed meanwhile wait for them before reuse.
    in_place: InPlaceWrites,
}

/// Tickets of in-place writes carry this bit and the slot they were counted in.
const IN_PLACE: u64 = 1 << 63;

/// In-place writes in flight, counted by the parity of the generation they started in.
///
/// An in-place write is planned without the metadata lock and its data lands later: a discard
/// or write-zeroes may free its cluster meanwhile. A freed cluster becomes allocatable at a
/// metadata write-back; if it could be handed to a new allocation while such a write is still
/// in flight, that write would land in another guest offset's data (or in a new table). So a
/// write-back starts a new generation and releases the clusters freed before it only once every
/// write counted in the ended generation is done. A generation ends only after the previous one
/// drained, so every write that started before it is counted in one slot.
#[derive(Default)]
struct InPlaceWrites {
    generation: AtomicU64,
    active: [AtomicU64; 2],
}

impl InPlaceWrites {
    /// Counts a write in (before it looks anything up); returns its slot.
    fn enter(&self) -> usize {
        loop {
            let g = self.generation.load(Ordering::SeqCst);
            let slot = (g & 1) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            if self.generation.load(Ordering::SeqCst) == g {
                return slot;
            }
            // A generation ended meanwhile: count in the new one.
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn leave(&self, slot: usize) {
        self.active[slot].fetch_sub(1, Ordering::SeqCst);
    }

    /// Ends the current generation; returns its slot.
    fn next_generation(&self) -> usize {
        (self.generation.fetch_add(1, Ordering::SeqCst) & 1) as usize
    }

    fn drained(&self, slot: usize) -> bool {
        self.active[slot].load(Ordering::SeqCst) == 0
    }
}

struct Meta {
    refcounts: Refcounts,
    l1_dirty: BTreeSet<usize>,
    /// Guest clusters being allocated, with the workers waiting for them.
    inflight: HashMap<u64, Vec<Waker>>,
    pending: HashMap<u64, Pending>,
    next_ticket: u64,
    /// The dirty bit is set on disk.
    marked_dirty: bool,
    /// Where the file's size, grown ahead of allocation, ends (`None`: not grown ahead).
    grown_to: Option<u64>,
    grow: Grow,
    /// Freed clusters, durable as free, waiting for the in-place writes of an ended generation
    /// (its slot) before they are released.
    draining: Option<(usize, Vec<u64>)>,
}

/// How the file grows ahead of allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grow {
    /// It does not (block devices, external data files).
    No,
    /// As a hole: no room taken until data is written.
    Hole,
    /// With allocated space (`fallocate`): O_DIRECT writes into it need no block allocation,
    /// at the price of whole clusters on disk where only subclusters were written.
    Reserve,
}

/// The file grows ahead of allocation in steps of at least this many bytes (and 16 clusters):
/// writes below the end of the file are not size-extending, and file systems serialize
/// size-extending O_DIRECT writes (ext4 waits for each one to complete).
const GROW_STEP: u64 = 8 << 20;

#[derive(Default)]
struct Pending {
    clusters: Vec<u64>,
    updates: Vec<Update>,
    /// Host clusters allocated for this write (freed if it fails).
    allocated: Vec<u64>,
    /// Host clusters that lose a reference when it commits.
    release: Vec<u64>,
}

struct Update {
    table: Arc<L2Table>,
    index: usize,
    entry: u64,
    bitmap: Option<u64>,
}

/// Where copy-on-write data comes from.
enum Source {
    Zero,
    /// The backing chain at this guest offset.
    Backing(u64),
    /// This offset in the data file (an old cluster of ours).
    Host(u64),
    /// A compressed cluster, from this offset within it.
    Compressed(u64, u64),
}

struct CowPiece {
    /// Host offset it goes to.
    to: u64,
    len: u64,
    from: Source,
}

fn lock(m: &Mutex<Meta>) -> MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Eager refcounts count this much ahead of allocation (in bytes; 16 to 1024 clusters): a sync
/// of the refcount blocks every this many allocations, and at most this much leaked by a crash.
const RESERVE_BYTES: u64 = 8 << 20;

impl Writable {
    /// `file`: the image, for metadata writes.
    pub(super) fn new(
        refcounts: Refcounts,
        lazy: bool,
        cluster_bits: u32,
        grow: Grow,
        file: &crate::block::file::ImageFile,
    ) -> Writable {
        let end = refcounts.end << cluster_bits;
        Writable {
            meta: Mutex::new(Meta {
                refcounts,
                l1_dirty: BTreeSet::new(),
                inflight: HashMap::new(),
                pending: HashMap::new(),
                next_ticket: 1,
                marked_dirty: false,
                grown_to: (grow != Grow::No).then_some(end),
                grow,
                draining: None,
            }),
            writeback: Mutex::new(writeback::WriteBack::new(file)),
            changed: AtomicBool::new(false),
            lazy,
            reserve: (RESERVE_BYTES >> cluster_bits).clamp(16, 1024) as usize,
            end: AtomicU64::new(end),
            in_place: InPlaceWrites::default(),
        }
    }

    pub(super) fn end_bytes(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    pub(super) fn lazy(&self) -> bool {
        self.lazy
    }
}

/// What one cluster of a write needs.
struct ClusterWork {
    /// Host offset of the cluster that receives the data.
    host: u64,
    /// The cluster lies past the old end of the file: it reads as zeroes already.
    fresh: bool,
    cow: Vec<CowPiece>,
}

impl Qcow2Image {
    fn w(&self) -> Result<&Writable, BlockError> {
        self.writable.as_ref().ok_or(BlockError::ReadOnly)
    }

    fn sub_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// Sets the dirty bit on disk before the first metadata change (lazy refcounts).
    fn mark_dirty(&self) -> Result<(), BlockError> {
        let w = self.w()?;
        if !w.lazy || lock(&w.meta).marked_dirty {
            return Ok(());
        }
        let _wb = w.writeback.lock().unwrap_or_else(PoisonError::into_inner);
        if lock(&w.meta).marked_dirty {
            return Ok(());
        }
        let value = self.header.incompatible | INCOMPAT_DIRTY;
        self.file
            .write_durable(OFFSET_INCOMPATIBLE, &value.to_be_bytes())?;
        lock(&w.meta).marked_dirty = true;
        Ok(())
    }

    /// [`Qcow2Image::mark_dirty`] for use at open.
    pub(super) fn mark_dirty_for_open(&self) -> Result<(), BlockError> {
        self.mark_dirty()
    }

    /// Drops one reference to each cluster of these (first, count) runs.
    pub(super) fn free_clusters(&self, runs: &[(u64, u64)]) {
        if let Some(w) = &self.writable {
            let mut meta = lock(&w.meta);
            for &(first, n) in runs {
                for c in first..first + n {
                    let _ = meta.refcounts.decrement(c);
                }
            }
        }
    }

    /// Loads the L2 tables covering `offset..offset+len` into the cache (before taking locks).
    fn preload(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let span = cs * self.header.l2_entries();
        let mut at = offset - offset % span;
        while at < offset + len {
            let e = self.l1_entry((at / span) as usize);
            let t = l2::l1_table_offset(e, cs).map_err(|e| self.corrupt(e))?;
            if t != 0 {
                self.l2_table(t)?;
            }
            at += span;
        }
        Ok(())
    }

    /// The active L2 table for guest cluster `gc`, allocating or copying it if the active L1
    /// does not own one. `None`: it was evicted since the preload (retry).
    fn owned_table(
        &self,
        meta: &mut Meta,
        gc: u64,
    ) -> Result<Option<(Arc<L2Table>, usize)>, BlockError> {
        let cs = self.cluster_size();
        let per = self.header.l2_entries();
        let l1_index = (gc / per) as usize;
        let slot = (gc % per) as usize * if self.header.extended_l2() { 2 } else { 1 };
        let e = self.l1_entry(l1_index);
        let off = l2::l1_table_offset(e, cs).map_err(|e| self.corrupt(e))?;
        if off != 0 && e & OFLAG_COPIED != 0 {
            return Ok(self.cache.get(off).map(|t| (t, slot)));
        }
        // A new table, empty or a copy of a table shared with a snapshot.
        let words = (cs / 8) as usize;
        let entries: Box<[u64]> = if off == 0 {
            vec![0; words].into_boxed_slice()
        } else {
            match self.cache.get(off) {
                Some(old) => old.read().clone(),
                None => return Ok(None),
            }
        };
        let c = meta
            .refcounts
            .alloc(1)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        self.grow_end(meta);
        let table = self.cache.insert(self.cache.table(c * cs, entries, true));
        if off != 0 {
            meta.refcounts
                .decrement(off / cs)
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        }
        self.l1.write().unwrap_or_else(PoisonError::into_inner)[l1_index] = (c * cs) | OFLAG_COPIED;
        meta.l1_dirty.insert(l1_index);
        Ok(Some((table, slot)))
    }

    /// Records how far allocation has grown the file, and grows the file ahead of it.
    fn grow_end(&self, meta: &mut Meta) {
        let Some(w) = &self.writable else {
            return;
        };
        let end = meta.refcounts.end << self.header.cluster_bits;
        w.end.fetch_max(end, Ordering::AcqRel);
        let Some(from) = meta.grown_to.filter(|&p| end > p) else {
            return;
        };
        let step = GROW_STEP.max(16 * self.cluster_size());
        let to = (end + 1).next_multiple_of(step);
        // Either way the new space reads as zeroes, as space past the end did.
        let grown = match meta.grow {
            Grow::Reserve => self.file.fallocate(from, to - from),
            _ => self.file.file.set_len(to),
        };
        match grown {
            Ok(()) => meta.grown_to = Some(to),
            Err(e) => {
                info!(
                    "{}: not growing the file ahead of allocation ({e})",
                    self.path.display()
                );
                meta.grown_to = None;
            }
        }
    }

    /// Plans a write of `offset..offset+len`.
    pub(super) fn begin_write(
        &self,
        offset: u64,
        len: u64,
        waker: &Waker,
    ) -> Result<WritePlan, BlockError> {
        let w = self.w()?;
        let slot = w.in_place.enter();
        match self.in_place(offset, len) {
            Ok(Some(mut plan)) => {
                plan.ticket = Some(IN_PLACE | slot as u64);
                return Ok(plan);
            }
            Ok(None) => w.in_place.leave(slot),
            Err(e) => {
                w.in_place.leave(slot);
                return Err(e);
            }
        }
        self.mark_dirty()?;
        for _ in 0..8 {
            self.preload(offset, len)?;
            if let Some(r) = self.plan_allocating(offset, len, waker)? {
                return Ok(r);
            }
        }
        Err(BlockError::Unsupported("L2 cache too small for this write"))
    }

    /// A write that needs no metadata change (allocated, owned clusters), planned lock-free.
    fn in_place(&self, mut offset: u64, mut len: u64) -> Result<Option<WritePlan>, BlockError> {
        let cs = self.cluster_size();
        let sub = self.sub_size();
        let mut plan = WritePlan::default();
        while len > 0 {
            let inc = offset % cs;
            let n = len.min(cs - inc);
            match self.lookup(offset)? {
                m @ L2Mapping::Standard {
                    host, copied: true, ..
                } if ((inc / sub)..=((inc + n - 1) / sub))
                    .all(|i| m.sub(i as u32) == SubState::Data) =>
                {
                    super::push_extent(
                        &mut plan.extents,
                        Extent {
                            len: n,
                            target: Target::Data {
                                fd: self.data_fd(),
                                offset: host + inc,
                            },
                        },
                    )
                }
                _ => return Ok(None),
            }
            offset += n;
            len -= n;
        }
        Ok(Some(plan))
    }

    /// Reserves clusters and plans copy-on-write under the metadata lock, then reads the
    /// copy-on-write data without it. `Ok(None)`: a table was evicted meanwhile; retry.
    fn plan_allocating(
        &self,
        offset: u64,
        len: u64,
        waker: &Waker,
    ) -> Result<Option<WritePlan>, BlockError> {
        let w = self.w()?;
        let cs = self.cluster_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let mut work = Vec::new();
        let ticket;
        {
            let mut meta = lock(&w.meta);
            for gc in first..=last {
                if let Some(waiters) = meta.inflight.get_mut(&gc) {
                    waiters.push(waker.clone());
                    return Err(BlockError::Busy);
                }
            }
            let mut pending = Pending::default();
            for gc in first..=last {
                let a = if gc == first { offset % cs } else { 0 };
                let b = if gc == last {
                    (offset + len - 1) % cs + 1
                } else {
                    cs
                };
                match self.plan_cluster(&mut meta, &mut pending, gc, a, b) {
                    Ok(Some(cw)) => work.push(cw),
                    Ok(None) => {
                        Self::undo(&mut meta, &pending);
                        return Ok(None);
                    }
                    Err(e) => {
                        Self::undo(&mut meta, &pending);
                        return Err(e);
                    }
                }
            }
            for &gc in &pending.clusters {
                meta.inflight.insert(gc, Vec::new());
            }
            ticket = meta.next_ticket;
            meta.next_ticket += 1;
            meta.pending.insert(ticket, pending);
            self.grow_end(&mut meta);
        }
        // Outside the lock: the guest data's place, and the copy-on-write data.
        let mut plan = WritePlan {
            ticket: Some(ticket),
            metadata: true,
            ..Default::default()
        };
        let fd = self.data_fd();
        let mut at = offset;
        for (i, cw) in work.into_iter().enumerate() {
            let gc = first + i as u64;
            let end = ((gc + 1) * cs).min(offset + len);
            super::push_extent(
                &mut plan.extents,
                Extent {
                    len: end - at,
                    target: Target::Data {
                        fd,
                        offset: cw.host + at % cs,
                    },
                },
            );
            at = end;
            for p in cw.cow {
                match self.cow_data(&p) {
                    // Zeroes found only now (holes of the backing chain) need no copy either.
                    Ok(ExtraData::Zero(_)) if cw.fresh => {}
                    Ok(data) => plan.extra.push(ExtraWrite {
                        fd,
                        offset: p.to,
                        data,
                    }),
                    Err(e) => {
                        let _ = self.commit_write(ticket, false);
                        return Err(e);
                    }
                }
            }
        }
        Ok(Some(plan))
    }

    /// Forgets reservations of a plan that was abandoned before anything was written.
    fn undo(meta: &mut Meta, p: &Pending) {
        for &c in &p.allocated {
            let _ = meta.refcounts.decrement(c);
        }
    }

    /// Plans the write of bytes `a..b` of guest cluster `gc`.
    fn plan_cluster(
        &self,
        meta: &mut Meta,
        pending: &mut Pending,
        gc: u64,
        a: u64,
        b: u64,
    ) -> Result<Option<ClusterWork>, BlockError> {
        let cs = self.cluster_size();
        let sub = self.sub_size();
        let n_sub = self.subclusters();
        let ext = self.header.extended_l2();
        let Some((table, slot)) = self.owned_table(meta, gc)? else {
            return Ok(None);
        };
        let (entry, bitmap) = {
            let t = table.read();
            (t[slot], if ext { t[slot + 1] } else { 0 })
        };
        let data_file = self.data_file.is_some();
        let m = if ext {
            l2::decode_extended(entry, bitmap, cs, data_file)
        } else {
            l2::decode_standard(entry, cs, data_file)
        }
        .map_err(|e| self.corrupt(e))?;
        let guest = gc * cs;
        let all: u32 = if n_sub == 32 { u32::MAX } else { 1 };
        let first_sub = (a / sub) as u32;
        let last_sub = ((b - 1) / sub) as u32;
        let touched: u32 = (first_sub..=last_sub).fold(0, |acc, i| acc | 1 << i);

        // Which host cluster receives the data, and the old content per subcluster.
        let (old_host, compressed, old_alloc, old_zero, copied) = match m {
            L2Mapping::Compressed(d) => (0, Some(d), all, 0, false),
            L2Mapping::Standard {
                host,
                alloc,
                zero,
                copied,
            } => (host, None, alloc, zero, copied),
        };
        let reuse = compressed.is_none() && copied && (old_host != 0 || data_file);
        let (host, fresh) = if data_file {
            // External data files are addressed by guest offset and not refcounted.
            (guest, false)
        } else if reuse {
            (old_host, false)
        } else {
            let c = meta
                .refcounts
                .alloc(1)
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
            pending.allocated.push(c);
            // Allocated past the old end: the file reads zeroes there already.
            (c * cs, c * cs >= self.file_end())
        };
        let moving = !reuse && !data_file && (old_host != 0 || compressed.is_some());
        let state = |i: u32| -> SubState {
            if old_alloc & (1 << i) != 0 {
                SubState::Data
            } else if old_zero & (1 << i) != 0 {
                SubState::Zero
            } else {
                SubState::Unallocated
            }
        };
        let source = |i: u32, from: u64| -> Source {
            match state(i) {
                SubState::Zero => Source::Zero,
                SubState::Unallocated if self.backing.is_some() => Source::Backing(guest + from),
                SubState::Unallocated => Source::Zero,
                SubState::Data => match compressed {
                    Some(d) => Source::Compressed(d, from),
                    None => Source::Host(old_host + from),
                },
            }
        };
        let mut cow = Vec::new();
        let piece = |from: u64, to: u64, src: Source, cow: &mut Vec<CowPiece>| {
            if to > from && !(fresh && matches!(src, Source::Zero)) {
                cow.push(CowPiece {
                    to: host + from,
                    len: to - from,
                    from: src,
                });
            }
        };
        let mut new_alloc = touched;
        for i in 0..n_sub {
            let (s0, s1) = (u64::from(i) * sub, u64::from(i + 1) * sub);
            let in_write = touched & (1 << i) != 0;
            let keeps_data = state(i) == SubState::Data;
            if in_write && reuse && keeps_data {
                // Already allocated in the cluster that takes the write: nothing to copy (a
                // copy of the cluster onto itself would race with in-place writes).
            } else if in_write {
                // Only the uncovered part of a partially written subcluster is copied.
                if s0 < a {
                    piece(s0, a.min(s1), source(i, s0), &mut cow);
                }
                if b < s1 {
                    piece(b.max(s0), s1, source(i, b.max(s0)), &mut cow);
                }
            } else if keeps_data {
                new_alloc |= 1 << i;
                if moving {
                    piece(s0, s1, source(i, s0), &mut cow);
                }
            }
        }
        if !ext && new_alloc != 0 {
            new_alloc = 1;
        }
        let new_zero = old_zero & !new_alloc & if ext { u32::MAX } else { 0 };
        let mut new_entry = host | OFLAG_COPIED;
        if data_file && !reuse {
            new_entry = guest | OFLAG_COPIED;
        }
        pending.updates.push(Update {
            table,
            index: slot,
            entry: new_entry,
            bitmap: ext.then_some((u64::from(new_zero) << 32) | u64::from(new_alloc)),
        });
        if moving && !data_file {
            match compressed {
                Some(d) => {
                    let (off, clen) = l2::compressed_range(d, self.header.cluster_bits);
                    for c in off / cs..=(off + clen - 1) / cs {
                        pending.release.push(c);
                    }
                }
                None => pending.release.push(old_host / cs),
            }
        }
        pending.clusters.push(gc);
        Ok(Some(ClusterWork { host, fresh, cow }))
    }

    /// The data a copy-on-write piece copies (no locks held). Aligned reads of image data are
    /// left to the caller ([`ExtraData::Bytes`]); the rest is filled in now.
    fn cow_data(&self, p: &CowPiece) -> Result<ExtraData, BlockError> {
        let len = p.len as usize;
        let mut buf = AlignedBuf::new(len, FILL_ALIGN as usize);
        let mut reads = Vec::new();
        match p.from {
            Source::Zero => return Ok(ExtraData::Zero(p.len)),
            Source::Host(off) => fill(self.data_fd(), off, &mut buf, 0, len, &mut reads)?,
            Source::Compressed(d, from) => {
                let mut s = Scratch::default();
                self.read_compressed(d, &mut s)?;
                buf.as_mut_slice()
                    .copy_from_slice(&s.output[from as usize..from as usize + len]);
            }
            Source::Backing(guest) => {
                if !self.read_backing_into(guest, &mut buf, &mut reads)? {
                    return Ok(ExtraData::Zero(p.len));
                }
            }
        }
        Ok(ExtraData::Bytes { buf, reads })
    }

    /// Fills `buf` with what the backing chain holds at `guest` (zeroes are already there).
    /// `Ok(false)`: it is all zeroes (unallocated, zero clusters, holes of the files).
    fn read_backing_into(
        &self,
        guest: u64,
        buf: &mut AlignedBuf,
        reads: &mut Vec<FillRead>,
    ) -> Result<bool, BlockError> {
        let mut extents = Vec::new();
        self.read_backing(guest, buf.len() as u64, &mut extents)?;
        let mut at = 0usize;
        let mut data = false;
        for e in extents {
            let n = e.len as usize;
            match e.target {
                Target::Zero => {}
                Target::Data { fd, offset } if crate::block::file::is_hole(fd, offset, e.len) => {}
                Target::Data { fd, offset } => {
                    data = true;
                    fill(fd, offset, buf, at, n, reads)?;
                }
                Target::Compressed {
                    image,
                    descriptor,
                    skip,
                } => {
                    let img = self
                        .at_depth(image)
                        .ok_or(BlockError::Corrupt("compressed extent of an unknown image"))?;
                    let mut s = Scratch::default();
                    img.read_compressed(descriptor, &mut s)?;
                    buf.as_mut_slice()[at..at + n]
                        .copy_from_slice(&s.output[skip as usize..skip as usize + n]);
                    data = true;
                }
            }
            at += n;
        }
        Ok(data)
    }

    /// Makes a write visible, or releases what it reserved.
    pub(super) fn commit_write(&self, ticket: u64, ok: bool) -> Result<(), BlockError> {
        let w = self.w()?;
        if ticket & IN_PLACE != 0 {
            w.in_place.leave((ticket & 1) as usize);
            return Ok(());
        }
        let mut meta = lock(&w.meta);
        let Some(p) = meta.pending.remove(&ticket) else {
            return Err(BlockError::Corrupt("unknown write ticket"));
        };
        let mut result = Ok(());
        if ok {
            for u in &p.updates {
                // The planned table may have been evicted (it was clean) and re-read: update
                // the one the cache holds.
                let table = self.cache.insert(u.table.clone());
                let mut t = table.write();
                t.set(u.index, u.entry);
                if let Some(bm) = u.bitmap {
                    t.set(u.index + 1, bm);
                }
            }
            if !p.updates.is_empty() {
                w.changed.store(true, Ordering::Release);
            }
            for &c in &p.release {
                if let Err(e) = meta.refcounts.decrement(c) {
                    result = Err(BlockError::Io(std::io::Error::other(e)));
                }
            }
        } else {
            Self::undo(&mut meta, &p);
        }
        for gc in &p.clusters {
            for waker in meta.inflight.remove(gc).into_iter().flatten() {
                waker.wake();
            }
        }
        drop(meta);
        if result.is_ok() && self.cache.take_over_capacity() {
            // Changed tables would otherwise pile up in memory until the guest flushes.
            result = self.write_back(false);
        }
        result
    }

    /// Discards (`zero`: makes read as zeroes) the (sub)clusters fully inside the range; partial
    /// ones are left alone for discard and written with zeroes for write-zeroes (in `out` as
    /// guest ranges). Freed host ranges are appended to `punch`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn discard_range(
        &self,
        offset: u64,
        len: u64,
        zero: bool,
        unmap: bool,
        waker: &Waker,
        partial: &mut Vec<(u64, u64)>,
        punch: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        let w = self.w()?;
        let sub = self.sub_size();
        let v3 = self.header.version >= 3;
        let has_backing = self.backing.is_some();
        if !zero && !v3 && has_backing {
            // Discarding would expose backing data and v2 cannot say "zero": ignore, as QEMU.
            return Ok(());
        }
        // Whole subclusters only; the rest is written with zeroes (write-zeroes) or ignored.
        let start = offset.next_multiple_of(sub);
        let end = (offset + len) / sub * sub;
        if zero {
            if start > end {
                partial.push((offset, len));
                return Ok(());
            }
            if start > offset {
                partial.push((offset, start - offset));
            }
            if offset + len > end {
                partial.push((end, offset + len - end));
            }
        }
        if start >= end {
            return Ok(());
        }
        if !v3 && zero {
            // No zero flag: write zeroes as data, except where the disk reads zero already.
            partial.push((start, end - start));
            return Ok(());
        }
        self.mark_dirty()?;
        for _ in 0..8 {
            self.preload(start, end - start)?;
            if self.discard_locked(w, start, end, zero, unmap, waker, punch)? {
                return Ok(());
            }
        }
        Err(BlockError::Unsupported(
            "L2 cache too small for this discard",
        ))
    }

    /// The metadata part of [`Qcow2Image::discard_range`]; `Ok(false)`: a table was evicted
    /// since the preload (retry; what was done is idempotent).
    #[allow(clippy::too_many_arguments)]
    fn discard_locked(
        &self,
        w: &Writable,
        start: u64,
        end: u64,
        zero: bool,
        unmap: bool,
        waker: &Waker,
        punch: &mut Vec<HostOp>,
    ) -> Result<bool, BlockError> {
        let cs = self.cluster_size();
        let sub = self.sub_size();
        let ext = self.header.extended_l2();
        let has_backing = self.backing.is_some();
        let mut holes = Vec::new();
        let mut meta = lock(&w.meta);
        let (first, last) = (start / cs, (end - 1) / cs);
        for gc in first..=last {
            if let Some(waiters) = meta.inflight.get_mut(&gc) {
                waiters.push(waker.clone());
                return Err(BlockError::Busy);
            }
        }
        let data_file = self.data_file.is_some();
        let per = self.header.l2_entries();
        for gc in first..=last {
            let a = start.max(gc * cs) - gc * cs;
            let b = end.min((gc + 1) * cs) - gc * cs;
            // Without a backing file an unallocated area reads zeroes already: leave it alone
            // (no L2 table is created just to say so).
            if !has_backing
                && !self.header.data_file_raw()
                && self.l1_entry((gc / per) as usize) == 0
            {
                continue;
            }
            let Some((table, slot)) = self.owned_table(&mut meta, gc)? else {
                return Ok(false);
            };
            let mut t = table.write();
            let (entry, bitmap) = (t[slot], if ext { t[slot + 1] } else { 0 });
            let m = if ext {
                l2::decode_extended(entry, bitmap, cs, data_file)
            } else {
                l2::decode_standard(entry, cs, data_file)
            }
            .map_err(|e| self.corrupt(e))?;
            let n_sub = self.subclusters();
            let covered: u32 = ((a / sub) as u32..(b / sub) as u32).fold(0, |acc, i| acc | 1 << i);
            let all: u32 = if n_sub == 32 { u32::MAX } else { 1 };
            // The covered part reads zeroes afterwards: a zero flag where a backing file would
            // show through (always for write-zeroes without unmap), unallocated otherwise.
            let make_zero = has_backing || (zero && !unmap);
            let (host, alloc, zflags, compressed) = match m {
                L2Mapping::Compressed(d) => (0, all, 0, Some(d)),
                L2Mapping::Standard {
                    host, alloc, zero, ..
                } => (host, alloc, zero, None),
            };
            let new_alloc = alloc & !covered;
            let new_zero = if make_zero {
                (zflags | covered) & all
            } else {
                zflags & !covered
            };
            let keep_host = new_alloc != 0 || (zero && !unmap && compressed.is_none() && host != 0);
            let new_entry = if ext {
                if keep_host {
                    entry
                } else {
                    0
                }
            } else if make_zero {
                OFLAG_ZERO
                    | if keep_host {
                        entry & (OFFSET_MASK | OFLAG_COPIED)
                    } else {
                        0
                    }
            } else {
                0
            };
            t.set(slot, new_entry);
            if ext {
                t.set(slot + 1, (u64::from(new_zero) << 32) | u64::from(new_alloc));
            }
            drop(t);
            w.changed.store(true, Ordering::Release);
            if self.header.data_file_raw() {
                // The raw data file must stay a faithful image of the disk.
                punch.push(HostOp::Zero {
                    fd: self.data_fd(),
                    offset: gc * cs + a,
                    len: b - a,
                    unmap,
                });
            }
            if !keep_host && !data_file {
                match compressed {
                    Some(d) => {
                        let (off, clen) = l2::compressed_range(d, self.header.cluster_bits);
                        for c in off / cs..=(off + clen - 1) / cs {
                            let _ = meta.refcounts.decrement(c);
                        }
                    }
                    None if host != 0 => {
                        let shared = meta.refcounts.get(host / cs) > 1;
                        let _ = meta.refcounts.decrement(host / cs);
                        if unmap && !shared {
                            holes.push(host);
                        }
                    }
                    None => {}
                }
            }
        }
        self.grow_end(&mut meta);
        drop(meta);
        // Give freed clusters back to the host file system now, before the request completes: a
        // later flush may hand them to a new allocation, which must not race with a punch.
        for host in holes {
            let mut op = crate::io::IoOp {
                fd: self.data_fd(),
                offset: host,
                kind: crate::io::OpKind::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    len: cs,
                },
                iov: Vec::new(),
                tag: 0,
            };
            // Advisory: a file system without hole punching keeps the space.
            let _ = crate::io::sys::execute(&mut op);
        }
        Ok(true)
    }
}

/// Reads `len` bytes at `offset` of `fd` into `buf[at..]`: left to the caller when aligned for
/// O_DIRECT, done now otherwise.
fn fill(
    fd: libc::c_int,
    offset: u64,
    buf: &mut AlignedBuf,
    at: usize,
    len: usize,
    reads: &mut Vec<FillRead>,
) -> std::io::Result<()> {
    let a = FILL_ALIGN;
    if offset % a == 0 && at as u64 % a == 0 && len as u64 % a == 0 {
        reads.push(FillRead {
            fd,
            offset,
            at,
            len,
        });
        Ok(())
    } else {
        let dst = &mut buf.as_mut_slice()[at..at + len];
        crate::block::file::read_aligned(fd, offset, dst, a)
    }
}

#[cfg(test)]
mod tests;
