//! A bounded cache of L2 tables shared by every queue thread. Lookups take a shard's read lock
//! only (hits run in parallel); a miss is read from the file with no lock held, then inserted,
//! evicting with a clock (second-chance) policy within the shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

const SHARDS: usize = 16;

struct Slot {
    table: Arc<[u64]>,
    used: AtomicBool,
}

/// L2 tables keyed by their offset in the image file; entries are the raw big-endian words
/// converted to native integers.
pub struct L2Cache {
    shards: Vec<RwLock<HashMap<u64, Slot>>>,
    per_shard: usize,
    cluster_bits: u32,
}

impl L2Cache {
    /// A cache holding at most `bytes` of tables of `1 << cluster_bits` bytes (at least one table
    /// per shard).
    pub fn new(bytes: u64, cluster_bits: u32) -> Self {
        let tables = (bytes >> cluster_bits).max(SHARDS as u64) as usize;
        L2Cache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            per_shard: tables.div_ceil(SHARDS),
            cluster_bits,
        }
    }

    fn shard(&self, offset: u64) -> &RwLock<HashMap<u64, Slot>> {
        let i = (offset >> self.cluster_bits) as usize % SHARDS;
        &self.shards[i]
    }

    /// The cached table at `offset`.
    pub fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        let shard = self
            .shard(offset)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard.get(&offset).map(|s| {
            s.used.store(true, Ordering::Relaxed);
            s.table.clone()
        })
    }

    /// Caches `table` at `offset` (keeping an entry another thread inserted meanwhile) and
    /// returns the cached table.
    pub fn insert(&self, offset: u64, table: Arc<[u64]>) -> Arc<[u64]> {
        let mut shard = self
            .shard(offset)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = shard.get(&offset) {
            return s.table.clone();
        }
        if shard.len() >= self.per_shard {
            // Second chance: clear reference bits until an unreferenced table turns up.
            let victim = loop {
                let mut found = None;
                for (k, s) in shard.iter() {
                    if !s.used.swap(false, Ordering::Relaxed) {
                        found = Some(*k);
                        break;
                    }
                }
                if let Some(k) = found {
                    break k;
                }
            };
            shard.remove(&victim);
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

    #[test]
    fn bounded_and_keeps_recently_used() {
        let c = L2Cache::new(16 * 65536, 16);
        let t = |v: u64| -> Arc<[u64]> { vec![v; 4].into() };
        // All in shard 0: offsets that are multiples of 16 clusters.
        let key = |i: u64| i * 16 * 65536;
        c.insert(key(0), t(0));
        assert_eq!(c.get(key(0)).unwrap()[0], 0);
        c.insert(key(1), t(1));
        // Shard 0 holds one table: inserting evicted key 0.
        assert!(c.get(key(0)).is_none());
        assert_eq!(c.get(key(1)).unwrap()[0], 1);
        assert!(c.len() <= SHARDS);
        // A concurrent insert of the same key keeps the first table.
        assert_eq!(c.insert(key(1), t(9))[0], 1);
    }
}
