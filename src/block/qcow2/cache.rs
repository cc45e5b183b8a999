//! A bounded cache of L2 tables shared by every queue thread. Lookups take a shard's read lock
//! and the table's read lock only (hits run in parallel); a miss is read from the file with no
//! lock held, then inserted, evicting with a clock (second-chance) policy within the shard.
//! Tables changed in memory but not yet written to the file are never evicted; what changed is
//! tracked per block, so that only changed blocks are written.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

/// One L2 table: its raw entries (native integers) and which of its blocks memory is ahead of
/// the file in.
pub struct L2Table {
    /// Offset of the table in the image file.
    pub offset: u64,
    entries: RwLock<Box<[u64]>>,
    /// Blocks changed in memory since they were last taken for writing (bit `i % 64` of word
    /// `i / 64` for block `i`).
    dirty: Box<[AtomicU64]>,
    /// log2 of the entries per block.
    block_shift: u32,
    /// Blocks were taken for writing and the write has not finished: the file is still behind.
    writing: AtomicBool,
}

/// Changed blocks of a table taken for writing (see [`L2Table::take_dirty`]).
pub struct DirtyBlocks {
    /// The table.
    pub table: Arc<L2Table>,
    /// Runs of changed blocks as (byte offset in the image file, big-endian bytes).
    pub runs: Vec<(u64, Vec<u8>)>,
    mask: Vec<u64>,
}

impl DirtyBlocks {
    /// The write finished: the table may be evicted again, or (`ok` false) its blocks are
    /// marked changed again.
    pub fn done(self, ok: bool) {
        if !ok {
            for (word, &bits) in self.table.dirty.iter().zip(&self.mask) {
                word.fetch_or(bits, Ordering::AcqRel);
            }
        }
        self.table.writing.store(false, Ordering::Release);
    }
}

/// Write access to a table's entries; [`L2Write::set`] records which block changed.
pub struct L2Write<'a> {
    table: &'a L2Table,
    entries: RwLockWriteGuard<'a, Box<[u64]>>,
}

impl L2Write<'_> {
    /// Sets entry `index` (in bounds: callers index tables by their own entry count).
    pub fn set(&mut self, index: usize, value: u64) {
        if self.entries[index] != value {
            self.entries[index] = value;
            self.table.mark(index >> self.table.block_shift);
        }
    }
}

impl Deref for L2Write<'_> {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.entries
    }
}

impl L2Table {
    /// A table with these entries, tracked in blocks of `block_bytes` (a power of two; at most
    /// the table's size); `dirty`: none of it is in the file yet.
    pub fn new(offset: u64, entries: Box<[u64]>, dirty: bool, block_bytes: u64) -> Self {
        let block_entries = (block_bytes / 8).clamp(1, entries.len().max(1) as u64);
        let block_shift = block_entries.ilog2();
        let blocks = entries.len().div_ceil(1 << block_shift);
        let table = L2Table {
            offset,
            entries: RwLock::new(entries),
            dirty: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            block_shift,
            writing: AtomicBool::new(false),
        };
        if dirty {
            for b in 0..blocks {
                table.mark(b);
            }
        }
        table
    }

    fn mark(&self, block: usize) {
        self.dirty[block / 64].fetch_or(1 << (block % 64), Ordering::AcqRel);
    }

    /// Reads the entries.
    pub fn read(&self) -> RwLockReadGuard<'_, Box<[u64]>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes entries (through [`L2Write::set`], which marks their blocks).
    pub fn write(&self) -> L2Write<'_> {
        L2Write {
            table: self,
            entries: self.entries.write().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Memory is ahead of the file (changed blocks, or a write of them not finished).
    pub fn is_dirty(&self) -> bool {
        self.writing.load(Ordering::Acquire)
            || self.dirty.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Takes the changed blocks for writing: they count as unchanged from now on (a change made
    /// meanwhile marks its block again), and the table stays in the cache until
    /// [`DirtyBlocks::done`]. Adjacent blocks are joined. `None`: nothing changed.
    pub fn take_dirty(self: &Arc<Self>) -> Option<DirtyBlocks> {
        let mask: Vec<u64> = self
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        if mask.iter().all(|&w| w == 0) {
            return None;
        }
        self.writing.store(true, Ordering::Release);
        let per = 1usize << self.block_shift;
        let is_set = |b: usize| mask[b / 64] & (1 << (b % 64)) != 0;
        let e = self.read();
        let blocks = e.len().div_ceil(per);
        let mut runs = Vec::new();
        let mut b = 0;
        while b < blocks {
            if !is_set(b) {
                b += 1;
                continue;
            }
            let first = b;
            while b < blocks && is_set(b) {
                b += 1;
            }
            let words = &e[first * per..(b * per).min(e.len())];
            let mut bytes = Vec::with_capacity(words.len() * 8);
            for x in words {
                bytes.extend_from_slice(&x.to_be_bytes());
            }
            runs.push((self.offset + (first * per * 8) as u64, bytes));
        }
        drop(e);
        Some(DirtyBlocks {
            table: self.clone(),
            runs,
            mask,
        })
    }
}

struct Slot {
    table: Arc<L2Table>,
    used: AtomicBool,
}

/// L2 tables keyed by their offset in the image file.
pub struct L2Cache {
    shards: Vec<RwLock<HashMap<u64, Slot>>>,
    per_shard: usize,
    cluster_bits: u32,
    /// Unit of change tracking and of writes, in bytes (see [`L2Table::new`]).
    block_bytes: u64,
    /// A shard full of dirty tables had to grow: time to write tables back.
    over: AtomicBool,
}

impl L2Cache {
    /// A cache holding at most `bytes` of clean tables of `1 << cluster_bits` bytes (at least one
    /// table per shard), whose tables track changes in blocks of `block_bytes`. `whole`: `bytes`
    /// holds every table of the image, and no shard evicts (tables do not spread evenly over
    /// shards, and a shard that evicts has them read again).
    pub fn new(bytes: u64, cluster_bits: u32, block_bytes: u64, whole: bool) -> Self {
        let tables = (bytes >> cluster_bits).max(SHARDS as u64) as usize;
        L2Cache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            per_shard: if whole {
                tables
            } else {
                tables.div_ceil(SHARDS)
            },
            cluster_bits,
            block_bytes,
            over: AtomicBool::new(false),
        }
    }

    /// The unit of change tracking and of metadata writes, in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// A table for this cache (see [`L2Table::new`]).
    pub fn table(&self, offset: u64, entries: Box<[u64]>, dirty: bool) -> Arc<L2Table> {
        Arc::new(L2Table::new(offset, entries, dirty, self.block_bytes))
    }

    fn shard(&self, offset: u64) -> &RwLock<HashMap<u64, Slot>> {
        let i = (offset >> self.cluster_bits) as usize % SHARDS;
        &self.shards[i]
    }

    /// The cached table at `offset`.
    pub fn get(&self, offset: u64) -> Option<Arc<L2Table>> {
        let shard = self
            .shard(offset)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard.get(&offset).map(|s| {
            s.used.store(true, Ordering::Relaxed);
            s.table.clone()
        })
    }

    /// Caches `table` (keeping an entry another thread inserted meanwhile) and returns the
    /// cached table.
    pub fn insert(&self, table: Arc<L2Table>) -> Arc<L2Table> {
        let offset = table.offset;
        let mut shard = self
            .shard(offset)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = shard.get(&offset) {
            return s.table.clone();
        }
        if shard.len() >= self.per_shard {
            // Second chance among clean tables; a shard full of dirty tables grows until the
            // next write-back.
            let mut evicted = false;
            for _ in 0..2 {
                let victim = shard
                    .iter()
                    .find(|(_, s)| !s.table.is_dirty() && !s.used.swap(false, Ordering::Relaxed))
                    .map(|(k, _)| *k);
                if let Some(k) = victim {
                    shard.remove(&k);
                    evicted = true;
                    break;
                }
            }
            if !evicted {
                self.over.store(true, Ordering::Relaxed);
            }
        }
        shard.insert(
            offset,
            Slot {
                table: table.clone(),
                used: AtomicBool::new(true),
            },
        );
        table
    }

    /// Whether the cache has grown past its size with dirty tables since the last call: their
    /// write-back lets it shrink again.
    pub fn take_over_capacity(&self) -> bool {
        self.over.load(Ordering::Relaxed) && self.over.swap(false, Ordering::Relaxed)
    }

    /// Every dirty table.
    pub fn dirty_tables(&self) -> Vec<Arc<L2Table>> {
        let mut v = Vec::new();
        for s in &self.shards {
            let s = s.read().unwrap_or_else(PoisonError::into_inner);
            v.extend(
                s.values()
                    .filter(|s| s.table.is_dirty())
                    .map(|s| s.table.clone()),
            );
        }
        v
    }

    /// Drops a table (it was freed).
    pub fn remove(&self, offset: u64) {
        self.shard(offset)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&offset);
    }

    /// Tables currently cached.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// No table cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(offset: u64, v: u64, dirty: bool) -> Arc<L2Table> {
        Arc::new(L2Table::new(
            offset,
            vec![v; 4].into_boxed_slice(),
            dirty,
            16,
        ))
    }

    #[test]
    fn bounded_keeps_dirty_and_first_insert() {
        let c = L2Cache::new(16 * 65536, 16, 16, false);
        // All in shard 0: offsets that are multiples of 16 clusters.
        let key = |i: u64| i * 16 * 65536;
        c.insert(t(key(0), 0, false));
        assert_eq!(c.get(key(0)).unwrap().read()[0], 0);
        c.insert(t(key(1), 1, false));
        // Shard 0 holds one clean table: inserting evicted key 0.
        assert!(c.get(key(0)).is_none());
        assert_eq!(c.get(key(1)).unwrap().read()[0], 1);
        // A concurrent insert of the same key keeps the first table.
        assert_eq!(c.insert(t(key(1), 9, false)).read()[0], 1);
        // Dirty tables stay, and the cache says it has grown past its size.
        c.get(key(1)).unwrap().write().set(0, 5);
        assert!(!c.take_over_capacity());
        c.insert(t(key(2), 2, false));
        assert_eq!(c.get(key(1)).unwrap().read()[0], 5);
        assert!(c.take_over_capacity());
        assert!(!c.take_over_capacity());
        assert_eq!(c.dirty_tables().len(), 1);
        let taken = c.get(key(1)).unwrap().take_dirty().unwrap();
        // Only the changed block (two entries of 8 bytes), at the table's offset.
        assert_eq!(taken.runs.len(), 1);
        assert_eq!(taken.runs[0].0, key(1));
        assert_eq!(taken.runs[0].1[..8], 5u64.to_be_bytes());
        assert_eq!(taken.runs[0].1.len(), 16);
        // Taken but not written: still not evictable.
        assert_eq!(c.dirty_tables().len(), 1);
        taken.done(true);
        assert!(c.dirty_tables().is_empty());
    }

    #[test]
    fn changed_blocks_only_and_failed_writes_mark_them_again() {
        // 8 entries in blocks of 2: blocks 1 and 2 change (joined), block 3 unchanged.
        let table = Arc::new(L2Table::new(4096, vec![0; 8].into_boxed_slice(), false, 16));
        assert!(table.take_dirty().is_none());
        {
            let mut w = table.write();
            w.set(2, 7);
            w.set(5, 9);
            // Setting an entry to its value changes nothing.
            w.set(7, 0);
        }
        let taken = table.take_dirty().unwrap();
        assert_eq!(taken.runs.len(), 1);
        assert_eq!(taken.runs[0].0, 4096 + 16);
        assert_eq!(taken.runs[0].1.len(), 32);
        assert!(table.take_dirty().is_none());
        taken.done(false);
        assert!(table.is_dirty());
        let again = table.take_dirty().unwrap();
        assert_eq!(again.runs[0].0, 4096 + 16);
        again.done(true);
        assert!(!table.is_dirty());
        // A new table is dirty whole: one run.
        let fresh = Arc::new(L2Table::new(0, vec![0; 8].into_boxed_slice(), true, 16));
        let all = fresh.take_dirty().unwrap();
        assert_eq!(all.runs, vec![(0, vec![0u8; 64])]);
        all.done(true);
    }
}
