//! A bounded cache of L2 tables shared by every queue thread. Lookups take a shard's read lock
//! and the table's read lock only (hits run in parallel); a miss is read from the file with no
//! lock held, then inserted, evicting with a clock (second-chance) policy within the shard.
//! Tables changed in memory but not yet written back are never evicted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

/// One L2 table: its raw entries (native integers) and whether memory is ahead of the file.
pub struct L2Table {
    /// Offset of the table in the image file.
    pub offset: u64,
    entries: RwLock<Box<[u64]>>,
    dirty: AtomicBool,
}

impl L2Table {
    /// A table with these entries.
    pub fn new(offset: u64, entries: Box<[u64]>, dirty: bool) -> Self {
        L2Table {
            offset,
            entries: RwLock::new(entries),
            dirty: AtomicBool::new(dirty),
        }
    }

    /// Reads the entries.
    pub fn read(&self) -> RwLockReadGuard<'_, Box<[u64]>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes entries; the table becomes dirty.
    pub fn write(&self) -> RwLockWriteGuard<'_, Box<[u64]>> {
        self.dirty.store(true, Ordering::Release);
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Memory is ahead of the file.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The table as it goes on disk, marking it clean first (a change made while the bytes are
    /// taken marks it dirty again).
    pub fn take_bytes(&self) -> Vec<u8> {
        self.dirty.store(false, Ordering::Release);
        let e = self.read();
        let mut v = Vec::with_capacity(e.len() * 8);
        for x in e.iter() {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v
    }

    /// Marks the table dirty again (its write-back failed).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
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
    /// A shard full of dirty tables had to grow: time to write tables back.
    over: AtomicBool,
}

impl L2Cache {
    /// A cache holding at most `bytes` of clean tables of `1 << cluster_bits` bytes (at least one
    /// table per shard).
    pub fn new(bytes: u64, cluster_bits: u32) -> Self {
        let tables = (bytes >> cluster_bits).max(SHARDS as u64) as usize;
        L2Cache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            per_shard: tables.div_ceil(SHARDS),
            cluster_bits,
            over: AtomicBool::new(false),
        }
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
        Arc::new(L2Table::new(offset, vec![v; 4].into_boxed_slice(), dirty))
    }

    #[test]
    fn bounded_keeps_dirty_and_first_insert() {
        let c = L2Cache::new(16 * 65536, 16);
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
        c.get(key(1)).unwrap().write()[0] = 5;
        assert!(!c.take_over_capacity());
        c.insert(t(key(2), 2, false));
        assert_eq!(c.get(key(1)).unwrap().read()[0], 5);
        assert!(c.take_over_capacity());
        assert!(!c.take_over_capacity());
        assert_eq!(c.dirty_tables().len(), 1);
        let bytes = c.get(key(1)).unwrap().take_bytes();
        assert_eq!(bytes[..8], 5u64.to_be_bytes());
        assert!(c.dirty_tables().is_empty());
    }
}
