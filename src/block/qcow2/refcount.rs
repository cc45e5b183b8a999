//! Refcounts in memory: the refcount table and every refcount block, mirrored byte for byte so
//! that allocation decisions never wait for I/O. Changes are tracked per block and written back
//! by the caller (at flush with eager refcounts, at clean close with lazy refcounts).
//!
//! Memory is bounded by the file: one refcount block per distinct block cluster the table names,
//! and a table of at most 8 MiB.

use std::collections::{BTreeSet, HashSet};

use super::header::{Header, MAX_REFTABLE_BYTES};
use crate::block::file::ImageFile;

/// Refcount structures that cannot be used as they are (a repair rebuilds them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefcountError {
    /// A table entry is unaligned, past the end of the file or repeated.
    #[error("refcount table entry {index} is invalid ({reason})")]
    BadBlock {
        /// Table index.
        index: usize,
        /// Why.
        reason: &'static str,
    },
    /// The refcount table would exceed 8 MiB.
    #[error("the refcount table cannot grow further")]
    TableFull,
    /// Reading failed.
    #[error("cannot read refcount metadata: {0}")]
    Io(String),
}

/// In-memory refcounts of one image.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount table: block offsets (0: no block).
    pub table: Vec<u64>,
    /// Where the table lives and how many clusters it spans.
    pub table_offset: u64,
    /// Clusters of the on-disk table.
    pub table_clusters: u32,
    /// Raw refcount blocks by block index (`None`: no block).
    blocks: Vec<Option<Box<[u8]>>>,
    dirty_blocks: BTreeSet<usize>,
    /// The table (or its location) changed since the last write-back.
    pub table_dirty: bool,
    /// First cluster index past everything allocated: new clusters come from here.
    pub end: u64,
    /// Where to start looking for a free cluster.
    free_hint: u64,
    /// Clusters freed since the last metadata write-back: not reused before it, so that a crash
    /// never leaves an old mapping pointing at reused data.
    quarantine: HashSet<u64>,
    /// Only allocate at the end of the file (during repair, when free-looking clusters may be
    /// referenced).
    pub append_only: bool,
    /// Free clusters counted as used in the refcount blocks written to the file (see
    /// [`Refcounts::reserve_ahead`]): the next ones allocation hands out.
    reserved: BTreeSet<u64>,
    /// A cluster got its first reference since the last [`Refcounts::counted`], and the file
    /// does not count it yet (it was not reserved).
    uncounted: bool,
}

/// Clusters [`Refcounts::reserve_ahead`] looks at below the end of the file, at most.
const RESERVE_SCAN: u64 = 1 << 20;

impl Refcounts {
    fn entries_per_block(&self) -> u64 {
        ((1u64 << self.cluster_bits) * 8) >> self.order
    }

    /// Loads the table and every block from the file.
    pub fn load(file: &ImageFile, h: &Header) -> Result<Refcounts, RefcountError> {
        let cs = h.cluster_size();
        let io = |e: std::io::Error| RefcountError::Io(e.to_string());
        let raw = file
            .read_at(
                h.refcount_table_offset,
                (u64::from(h.refcount_table_clusters) * cs) as usize,
            )
            .map_err(io)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let file_clusters = file.size.div_ceil(cs);
        let mut blocks = Vec::with_capacity(table.len());
        let mut seen = HashSet::new();
        for (index, &entry) in table.iter().enumerate() {
            let off = entry & !(cs - 1) & 0x00ff_ffff_ffff_ffff;
            if entry == 0 {
                blocks.push(None);
                continue;
            }
            let bad = |reason| RefcountError::BadBlock { index, reason };
            if entry & (cs - 1) != 0 {
                return Err(bad("unaligned"));
            }
            if off == 0 || off / cs >= file_clusters {
                return Err(bad("outside the file"));
            }
            if !seen.insert(off) {
                return Err(bad("used twice"));
            }
            blocks.push(Some(
                file.read_at(off, cs as usize)
                    .map_err(io)?
                    .into_boxed_slice(),
            ));
        }
        let mut r = Refcounts {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table,
            table_offset: h.refcount_table_offset,
            table_clusters: h.refcount_table_clusters,
            blocks,
            dirty_blocks: BTreeSet::new(),
            table_dirty: false,
            end: file_clusters,
            free_hint: 0,
            quarantine: HashSet::new(),
            append_only: false,
            reserved: BTreeSet::new(),
            uncounted: false,
        };
        // Preallocated or leaked clusters may have refcounts past the end of the file.
        if let Some(last) = r.last_used() {
            r.end = r.end.max(last + 1);
        }
        Ok(r)
    }

    /// An empty structure for a rebuild or a new image: no table and no blocks yet (the first
    /// refcount set places them), allocating from cluster `end`.
    pub fn empty(h: &Header, end: u64) -> Refcounts {
        Refcounts {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table: Vec::new(),
            table_offset: 0,
            table_clusters: 0,
            blocks: Vec::new(),
            dirty_blocks: BTreeSet::new(),
            table_dirty: true,
            end,
            free_hint: 0,
            quarantine: HashSet::new(),
            append_only: true,
            reserved: BTreeSet::new(),
            uncounted: false,
        }
    }

    fn last_used(&self) -> Option<u64> {
        let epb = self.entries_per_block();
        for (b, block) in self.blocks.iter().enumerate().rev() {
            if let Some(block) = block {
                for i in (0..epb).rev() {
                    if read_entry(block, self.order, i) != 0 {
                        return Some(b as u64 * epb + i);
                    }
                }
            }
        }
        None
    }

    /// Largest refcount the width can hold.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// Refcount of `cluster` (0 where no block exists).
    pub fn get(&self, cluster: u64) -> u64 {
        let epb = self.entries_per_block();
        match self.blocks.get((cluster / epb) as usize) {
            Some(Some(block)) => read_entry(block, self.order, cluster % epb),
            _ => 0,
        }
    }

    /// Sets the refcount of `cluster`, creating refcount blocks (and growing the table) as needed.
    pub fn set(&mut self, cluster: u64, value: u64) -> Result<(), RefcountError> {
        if value == 0 && self.get(cluster) == 0 {
            return Ok(());
        }
        self.ensure_block(cluster)?;
        self.put(cluster, value);
        Ok(())
    }

    fn put(&mut self, cluster: u64, value: u64) {
        let epb = self.entries_per_block();
        let b = (cluster / epb) as usize;
        if let Some(Some(block)) = self.blocks.get_mut(b) {
            let old = read_entry(block, self.order, cluster % epb);
            write_entry(block, self.order, cluster % epb, value);
            self.dirty_blocks.insert(b);
            if old == 0 && value > 0 && !self.reserved.remove(&cluster) {
                self.uncounted = true;
            }
        }
        if value > 0 {
            self.end = self.end.max(cluster + 1);
        }
    }

    /// Makes sure the block covering `cluster` exists, allocating it at the end of the file.
    fn ensure_block(&mut self, cluster: u64) -> Result<(), RefcountError> {
        let epb = self.entries_per_block();
        let cs = 1u64 << self.cluster_bits;
        let b = (cluster / epb) as usize;
        if matches!(self.blocks.get(b), Some(Some(_))) {
            return Ok(());
        }
        if b >= self.table.len() {
            self.grow_table(b + 1)?;
            // Growing the table may have created this very block for the table's clusters.
            if matches!(self.blocks.get(b), Some(Some(_))) {
                return Ok(());
            }
        }
        // The new block's own cluster: at the end of the file; its refcount may live in this
        // very block (self-describing) or in another one, created the same way.
        let at = self.end;
        self.end += 1;
        self.blocks[b] = Some(vec![0u8; cs as usize].into_boxed_slice());
        self.table[b] = at << self.cluster_bits;
        self.table_dirty = true;
        self.dirty_blocks.insert(b);
        self.ensure_block(at)?;
        self.put(at, 1);
        Ok(())
    }

    /// Moves the table to a larger place at the end of the file with room for `entries`.
    fn grow_table(&mut self, entries: usize) -> Result<(), RefcountError> {
        let cs = 1u64 << self.cluster_bits;
        // Room for the blocks the new table and its own blocks may need, then some.
        let want = (entries + 2).max(self.table.len() * 2).max(cs as usize / 8);
        let clusters = ((want as u64 * 8).div_ceil(cs)) as u32;
        if u64::from(clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(RefcountError::TableFull);
        }
        let new_len = (u64::from(clusters) * cs / 8) as usize;
        self.table.resize(new_len, 0);
        self.blocks.resize(new_len, None);
        let old = (self.table_offset >> self.cluster_bits, self.table_clusters);
        let at = self.end;
        self.end += u64::from(clusters);
        self.table_offset = at << self.cluster_bits;
        self.table_clusters = clusters;
        self.table_dirty = true;
        for c in at..at + u64::from(clusters) {
            self.ensure_block(c)?;
            self.put(c, 1);
        }
        // The old table's clusters are free once the header points at the new one.
        if old.1 > 0 && old.0 > 0 {
            for c in old.0..old.0 + u64::from(old.1) {
                self.decrement(c)?;
            }
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the first index.
    pub fn alloc(&mut self, n: u64) -> Result<u64, RefcountError> {
        let start = if self.append_only {
            None
        } else {
            self.find_free(n)
        };
        let first = match start {
            Some(f) => f,
            None => {
                // Claim the range before any refcount block it needs is placed at the end.
                let f = self.end;
                self.end += n;
                f
            }
        };
        for c in first..first + n {
            self.set(c, 1)?;
        }
        if start.is_some() {
            self.free_hint = first + n;
        }
        Ok(first)
    }

    /// The first run of `n` free clusters at or after the hint. Every cluster below the hint is
    /// in use (frees lower the hint), so a failed search moves the hint to the end: appending
    /// then costs nothing.
    fn find_free(&mut self, n: u64) -> Option<u64> {
        let mut run = 0;
        let mut c = self.free_hint.max(1);
        let mut first_busy_free = None;
        while c < self.end {
            if self.get(c) == 0 && !self.quarantine.contains(&c) {
                run += 1;
                if run == n {
                    return Some(c + 1 - n);
                }
            } else {
                if self.get(c) == 0 {
                    // Free but quarantined: the hint must not move past it.
                    first_busy_free.get_or_insert(c);
                }
                run = 0;
            }
            c += 1;
        }
        self.free_hint = first_busy_free.unwrap_or(self.end - run);
        None
    }

    /// Drops one reference to `cluster`; a cluster reaching zero is quarantined until the next
    /// metadata write-back.
    pub fn decrement(&mut self, cluster: u64) -> Result<(), RefcountError> {
        let v = self.get(cluster);
        if v == 0 {
            return Ok(());
        }
        self.set(cluster, v - 1)?;
        if v == 1 {
            self.quarantine.insert(cluster);
        }
        Ok(())
    }

    /// Adds one reference.
    pub fn increment(&mut self, cluster: u64) -> Result<(), RefcountError> {
        let v = self.get(cluster);
        self.set(cluster, v.saturating_add(1).min(self.max_value()))
    }

    /// Freed clusters become allocatable (call after a metadata write-back made the frees durable).
    pub fn release_quarantine(&mut self) {
        if let Some(&min) = self.quarantine.iter().min() {
            self.free_hint = self.free_hint.min(min);
        }
        self.quarantine.clear();
    }

    /// Clusters freed and not yet released.
    pub fn quarantined(&self) -> Vec<u64> {
        self.quarantine.iter().copied().collect()
    }

    /// Releases these quarantined clusters (their frees are durable now).
    pub fn release(&mut self, clusters: &[u64]) {
        if clusters.is_empty() {
            return;
        }
        for c in clusters {
            self.quarantine.remove(c);
        }
        if let Some(&min) = clusters.iter().min() {
            self.free_hint = self.free_hint.min(min);
        }
    }

    /// Copies of the dirty blocks as the file should hold them: reserved clusters counted, and
    /// one reference added back to each of `bump` (frees not yet to be written). They stay dirty.
    pub fn snapshot_blocks(&self, bump: &[u64]) -> Vec<(u64, Vec<u8>)> {
        let epb = self.entries_per_block();
        let mut blocks: Vec<(usize, Vec<u8>)> = self
            .dirty_blocks
            .iter()
            .filter_map(|&b| Some((b, self.blocks.get(b)?.as_ref()?.to_vec())))
            .collect();
        let reserved = self.reserved.iter().map(|&c| (c, true));
        for (c, set) in reserved.chain(bump.iter().map(|&c| (c, false))) {
            let b = (c / epb) as usize;
            if let Ok(i) = blocks.binary_search_by_key(&b, |(i, _)| *i) {
                let bytes = &mut blocks[i].1;
                let v = read_entry(bytes, self.order, c % epb);
                let v = if set { v.max(1) } else { v + 1 };
                write_entry(bytes, self.order, c % epb, v.min(self.max_value()));
            }
        }
        blocks
            .into_iter()
            .map(|(b, bytes)| (self.table[b], bytes))
            .collect()
    }

    /// Dirty blocks as (file offset, bytes) as the file should hold them (reserved clusters
    /// counted), and forgets that they were dirty.
    pub fn take_dirty_blocks(&mut self) -> Vec<(u64, Vec<u8>)> {
        let blocks = self.snapshot_blocks(&[]);
        self.dirty_blocks.clear();
        blocks
    }

    /// Whether a cluster got its first reference, unreserved, since the last call (then the
    /// caller writes the blocks and syncs before anything referencing it may reach the file).
    pub fn counted(&mut self) -> bool {
        std::mem::replace(&mut self.uncounted, false)
    }

    /// Makes the next [`Refcounts::counted`] say that clusters are not counted (writing the
    /// blocks failed).
    pub fn uncount(&mut self) {
        self.uncounted = true;
    }

    /// Reserves the next free clusters allocation will hand out, up to `n` in all, so that the
    /// refcount blocks written next count them as used: entries pointing to them may then be
    /// written before the blocks are written again (a crash leaks the unused ones, at worst).
    /// Best effort: a cluster allocated outside the reservation only makes [`Refcounts::counted`]
    /// say so.
    pub fn reserve_ahead(&mut self, n: usize) {
        let epb = self.entries_per_block();
        // Free clusters below the end, in the order `find_free` takes them.
        let start = self.free_hint.max(1);
        let stop = self.end.min(start.saturating_add(RESERVE_SCAN));
        let mut c = start;
        while self.reserved.len() < n && c < stop && !self.append_only {
            if self.get(c) == 0 && !self.quarantine.contains(&c) && self.reserved.insert(c) {
                self.dirty_blocks.insert((c / epb) as usize);
            }
            c += 1;
        }
        // Then the end of the file; a refcount block it needs takes the first of them.
        let mut c = self.end;
        while self.reserved.len() < n {
            if self.ensure_block(c).is_err() {
                break;
            }
            if self.get(c) == 0 && self.reserved.insert(c) {
                self.dirty_blocks.insert((c / epb) as usize);
            }
            c += 1;
        }
    }

    /// Forgets the reservations (the blocks get written with the real counts).
    pub fn drop_reservations(&mut self) {
        let epb = self.entries_per_block();
        for c in std::mem::take(&mut self.reserved) {
            self.dirty_blocks.insert((c / epb) as usize);
        }
    }

    /// The table as it goes on disk (its full cluster span).
    pub fn table_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.table.len() * 8);
        for e in &self.table {
            v.extend_from_slice(&e.to_be_bytes());
        }
        v.resize(
            (u64::from(self.table_clusters) << self.cluster_bits) as usize,
            0,
        );
        v
    }

    /// Whether anything needs writing back.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || !self.dirty_blocks.is_empty()
    }

    /// Marks the table as written.
    pub fn table_written(&mut self) {
        self.table_dirty = false;
    }
}

/// Reads entry `i` of a raw refcount block of width `1 << order` bits.
pub fn read_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            u64::from((byte >> ((i % per_byte) * bits)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]),
        )),
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])),
    }
}

/// Writes entry `i` of a raw refcount block.
pub fn write_entry(block: &mut [u8], order: u32, i: u64, value: u64) {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let mask = (((1u16 << bits) - 1) as u8) << ((i % per_byte) * bits);
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << ((i % per_byte) * bits)) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (512 * 8) >> order;
            for i in 0..n as u64 {
                write_entry(&mut block, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n as u64 {
                assert_eq!(
                    read_entry(&block, order, i),
                    (i * 7 + 3) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // QEMU's layout for sub-byte widths: the lowest bits hold the first entry.
        let mut b = [0u8; 1];
        write_entry(&mut b, 0, 0, 1);
        write_entry(&mut b, 0, 3, 1);
        assert_eq!(b[0], 0b1001);
    }

    fn fresh(order: u32) -> Refcounts {
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 9,
            size: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: order,
            header_length: 104,
            compression: super::super::header::CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_extensions: Vec::new(),
        };
        let mut r = Refcounts::empty(&h, 1);
        r.append_only = false;
        r
    }

    #[test]
    fn growth_is_self_describing() {
        let mut r = fresh(4);
        // 512-byte clusters, 16-bit refcounts: 256 entries per block, 64 per table cluster.
        for _ in 0..2000 {
            r.alloc(1).unwrap();
        }
        // Every block and table cluster has refcount 1, and nothing overlaps.
        let mut used = HashSet::new();
        for (b, &off) in r.table.iter().enumerate() {
            if off != 0 {
                assert_eq!(r.get(off >> 9), 1, "block {b}");
                assert!(used.insert(off >> 9));
            }
        }
        for c in (r.table_offset >> 9)..(r.table_offset >> 9) + u64::from(r.table_clusters) {
            assert_eq!(r.get(c), 1);
            assert!(used.insert(c));
        }
        let total: u64 = (0..r.end).map(|c| r.get(c)).sum();
        assert_eq!(total, 2000 + used.len() as u64);
    }

    #[test]
    fn freed_clusters_wait_for_a_write_back() {
        let mut r = fresh(4);
        let a = r.alloc(1).unwrap();
        let _b = r.alloc(1).unwrap();
        r.decrement(a).unwrap();
        assert_ne!(r.alloc(1).unwrap(), a, "reused before the free was durable");
        r.release_quarantine();
        assert_eq!(r.alloc(1).unwrap(), a);
    }

    #[test]
    fn saturating_and_contiguous() {
        let mut r = fresh(0);
        let a = r.alloc(1).unwrap();
        r.increment(a).unwrap();
        assert_eq!(r.get(a), 1, "1-bit refcounts saturate");
        let run = r.alloc(5).unwrap();
        for c in run..run + 5 {
            assert_eq!(r.get(c), 1);
        }
    }
}
