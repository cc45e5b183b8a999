//! Metadata on its way to the file.
//!
//! - **Write-through** ([`Qcow2Image::write_through`]), once per queue pass before the requests
//!   that changed metadata are completed: the changed blocks of L2 tables and the changed L1
//!   entries are written to the file, not synced, so that a completed write survives the daemon
//!   (SIGKILL, restart) though not the host. With eager refcounts the file first counts every
//!   cluster those entries reference (refcount blocks written and synced, counting a reserve of
//!   the clusters allocation hands out next, so that this happens once per reserve).
//! - **Write-back** ([`Qcow2Image::write_back`]), at a guest flush, when changed tables outgrow
//!   the cache, and at clean close: the same, then everything synced, then (eager refcounts) the
//!   frees; at close the refcounts of lazy images and the dirty bit.
//!
//! Order, so that a crash of the host at any point leaves an image that is consistent (eager
//! refcounts; at worst leaked clusters) or repaired at the next open (lazy refcounts):
//! refcount blocks counting new clusters (synced) → L2 tables → sync (only when L1 entries
//! changed: a new table is durable before anything points to it) → L1 entries → sync (write-back
//! only) → refcount blocks with the frees whose last references the synced tables removed.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use log::info;

use super::{lock, Writable};
use crate::block::file::ImageFile;
use crate::block::qcow2::cache::DirtyBlocks;
use crate::block::qcow2::header::OFFSET_INCOMPATIBLE;
use crate::block::qcow2::Qcow2Image;
use crate::block::BlockError;
use crate::io::batch::Batch;

/// Where metadata writes go (kept under `Writable::writeback`).
///
/// An image opened with O_DIRECT (`--cache none`) gets its metadata written through the page
/// cache of a second, buffered descriptor: a write-through then costs a copy, not a round trip
/// to the device that the queue would wait for at every pass (measured: allocating 4 KiB writes
/// at half the rate). The kernel keeps the two coherent (an O_DIRECT read or write of a range
/// first writes its dirty pages back and drops them), and a sync of either descriptor syncs the
/// file. Without that descriptor (no `/proc`), the writes go through O_DIRECT, overlapping on the
/// device.
pub(in crate::block::qcow2) struct WriteBack {
    batch: Batch,
    buffered: Option<File>,
}

impl WriteBack {
    /// For metadata writes to `file`.
    pub(in crate::block::qcow2) fn new(file: &ImageFile) -> WriteBack {
        let buffered = if file.direct {
            file.reopen_buffered()
                .inspect_err(|e| {
                    info!(
                        "{}: metadata written with O_DIRECT (cannot reopen the file buffered: {e})",
                        file.path.display()
                    )
                })
                .ok()
        } else {
            None
        };
        WriteBack {
            batch: Batch::new(file.direct && buffered.is_none()),
            buffered,
        }
    }

    /// Overwrites each `(offset, bytes)` of `file` (the image).
    fn write<'a>(
        &mut self,
        file: &ImageFile,
        runs: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), BlockError> {
        match &self.buffered {
            Some(f) => runs
                .into_iter()
                .try_for_each(|(offset, bytes)| f.write_all_at(bytes, offset)),
            None => file.write_runs(&mut self.batch, runs),
        }
        .map_err(io)
    }
}

/// Metadata taken for writing.
struct Changes {
    /// Clusters freed (and not yet released) before the changes were taken: the changes hold
    /// the removal of their last references (write-back only).
    freed: Vec<u64>,
    /// L1 indices taken, and their blocks as (file offset, bytes).
    l1_indices: Vec<usize>,
    l1: Vec<(u64, Vec<u8>)>,
    /// Changed blocks of L2 tables.
    tables: Vec<DirtyBlocks>,
}

/// When refcount blocks are written before the L2 and L1 changes (eager refcounts).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    /// Only if clusters were allocated that the file does not count yet (write-through).
    IfNeeded,
    /// Whatever changed, reserving ahead (write-back).
    Always,
    /// Whatever changed, without reserving (clean close).
    Exact,
}

fn io(e: std::io::Error) -> BlockError {
    BlockError::Io(e)
}

impl Qcow2Image {
    /// Writes the metadata changed since the last write-through or write-back to the file,
    /// without syncing, so that the requests that changed it survive a restart of the daemon.
    /// Returns only when every such change, by any queue, is in the file (or failed: then it is
    /// kept to be written again).
    pub(in crate::block::qcow2) fn write_through(&self) -> Result<(), BlockError> {
        let Some(w) = &self.writable else {
            return Ok(());
        };
        // Taken before the flag is looked at: a write-through in progress on another queue may
        // be writing this queue's changes, and they must be in the file when this returns.
        let mut wb = w.writeback.lock().unwrap_or_else(PoisonError::into_inner);
        if !w.changed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let changes = self.take_changes(w, false);
        let result = self.write_changes(w, &mut wb, &changes, Count::IfNeeded);
        if result.is_err() {
            w.changed.store(true, Ordering::Release);
        }
        self.give_back(w, changes, result.is_ok());
        result
    }

    /// Writes changed metadata back and makes it durable. `close` also writes the refcounts
    /// (lazy mode), drops reservations (eager mode) and clears the dirty bit.
    pub(in crate::block::qcow2) fn write_back(&self, close: bool) -> Result<(), BlockError> {
        let Some(w) = &self.writable else {
            return Ok(());
        };
        let mut wb = w.writeback.lock().unwrap_or_else(PoisonError::into_inner);
        w.changed.store(false, Ordering::Release);
        let eager = !w.lazy;
        if close {
            lock(&w.meta).refcounts.drop_reservations();
        }
        let changes = self.take_changes(w, true);
        let count = if close { Count::Exact } else { Count::Always };
        let result = self
            .write_changes(w, &mut wb, &changes, count)
            .and_then(|()| self.file.file.sync_data().map_err(io))
            .and_then(|()| match &self.data_file {
                Some(d) => d.file.sync_data().map_err(io),
                None => Ok(()),
            });
        if result.is_err() {
            w.changed.store(true, Ordering::Release);
        }
        let freed = changes.freed.clone();
        self.give_back(w, changes, result.is_ok());
        result?;
        if eager || close {
            let blocks = {
                let mut m = lock(&w.meta);
                // Clusters freed after the changes were taken may still be referenced by what
                // the file holds: written as freed at the next write-back.
                let taken: HashSet<u64> = freed.iter().copied().collect();
                let later: Vec<u64> = m
                    .refcounts
                    .quarantined()
                    .into_iter()
                    .filter(|c| !taken.contains(c))
                    .collect();
                if later.is_empty() {
                    m.refcounts.take_dirty_blocks()
                } else {
                    m.refcounts.snapshot_blocks(&later)
                }
            };
            wb.write(&self.file, blocks.iter().map(|(o, b)| (*o, b.as_slice())))?;
            self.write_refcount_table(w)?;
            self.file.file.sync_data().map_err(io)?;
        }
        self.release_freed(w, freed);
        if close {
            // Cut the file back to its last cluster (whatever the refcounts placed last stays).
            let end = (lock(&w.meta).refcounts.end << self.header.cluster_bits).max(w.end_bytes());
            if lock(&w.meta).grown_to.is_some_and(|p| p > end) {
                self.file.file.set_len(end).map_err(io)?;
                lock(&w.meta).grown_to = Some(end);
            }
        }
        if close && w.lazy && lock(&w.meta).marked_dirty {
            self.file
                .write_durable(OFFSET_INCOMPATIBLE, &self.header.incompatible.to_be_bytes())
                .map_err(io)?;
            lock(&w.meta).marked_dirty = false;
        }
        Ok(())
    }

    /// Takes what changed: first the frees and the L1 entries, then the tables, so that every
    /// table a taken L1 entry points to, and every removal of a taken free's last reference, is
    /// among the taken tables (both happen before under the metadata lock). Refcounts are looked
    /// at only after this: every cluster the taken entries reference was allocated before.
    /// `frees`: take the frees too (a write-back writes them).
    fn take_changes(&self, w: &Writable, frees: bool) -> Changes {
        let (freed, l1_indices, l1) = {
            let mut m = lock(&w.meta);
            let freed = if frees {
                m.refcounts.quarantined()
            } else {
                Vec::new()
            };
            let indices: Vec<usize> = std::mem::take(&mut m.l1_dirty).into_iter().collect();
            let l1 = self.l1_blocks(&indices);
            (freed, indices, l1)
        };
        let tables = self
            .cache
            .dirty_tables()
            .iter()
            .filter_map(|t| t.take_dirty())
            .collect();
        Changes {
            freed,
            l1_indices,
            l1,
            tables,
        }
    }

    /// The blocks of the L1 table holding these (sorted) entries, as they go to the file.
    fn l1_blocks(&self, indices: &[usize]) -> Vec<(u64, Vec<u8>)> {
        let per = (self.cache.block_bytes() / 8).max(1) as usize;
        let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut last_block = None;
        for &i in indices {
            let block = i / per;
            if last_block == Some(block) {
                continue;
            }
            let words = &l1[block * per..((block + 1) * per).min(l1.len())];
            let offset = self.header.l1_table_offset + (block * per * 8) as u64;
            let mut bytes: Vec<u8> = words.iter().flat_map(|e| e.to_be_bytes()).collect();
            match out.last_mut() {
                // Adjacent to the previous block: one write.
                Some((o, b)) if last_block == Some(block - 1) && *o + b.len() as u64 == offset => {
                    b.append(&mut bytes)
                }
                _ => out.push((offset, bytes)),
            }
            last_block = Some(block);
        }
        out
    }

    /// Puts back what could not be written (`ok` false), and lets written tables be evicted.
    fn give_back(&self, w: &Writable, changes: Changes, ok: bool) {
        for t in changes.tables {
            t.done(ok);
        }
        if !ok {
            lock(&w.meta).l1_dirty.extend(changes.l1_indices);
        }
    }

    /// Writes taken changes: with eager refcounts, refcount blocks first (see [`Count`]); then
    /// the L2 blocks; then, if L1 entries changed, a sync and the L1 blocks.
    fn write_changes(
        &self,
        w: &Writable,
        wb: &mut WriteBack,
        changes: &Changes,
        count: Count,
    ) -> Result<(), BlockError> {
        if !w.lazy {
            let blocks = {
                let mut m = lock(&w.meta);
                let r = &mut m.refcounts;
                let needed = r.counted();
                if count == Count::IfNeeded && !needed {
                    None
                } else {
                    if count != Count::Exact {
                        r.reserve_ahead(w.reserve);
                        // The reserve's own new blocks are in this snapshot.
                        r.counted();
                    }
                    // Freed clusters stay counted until nothing in the file references them.
                    let freed = r.quarantined();
                    r.is_dirty().then(|| r.snapshot_blocks(&freed))
                }
            };
            if let Some(blocks) = blocks {
                let written = wb
                    .write(&self.file, blocks.iter().map(|(o, b)| (*o, b.as_slice())))
                    .and_then(|()| self.write_refcount_table(w))
                    .and_then(|()| self.file.file.sync_data().map_err(io));
                if let Err(e) = written {
                    // Not counted after all: the next attempt writes them again.
                    lock(&w.meta).refcounts.uncount();
                    return Err(e);
                }
            }
        }
        let runs = changes.tables.iter().flat_map(|t| t.runs.iter());
        wb.write(&self.file, runs.map(|(o, b)| (*o, b.as_slice())))?;
        if !changes.l1.is_empty() {
            self.file.file.sync_data().map_err(io)?;
            let runs = changes.l1.iter().map(|(o, b)| (*o, b.as_slice()));
            wb.write(&self.file, runs)?;
        }
        Ok(())
    }

    /// Releases clusters whose frees a write-back made durable, once no in-place write that
    /// started before the frees is in flight (see `InPlaceWrites`); the rest stay quarantined.
    fn release_freed(&self, w: &Writable, freed: Vec<u64>) {
        let mut meta = lock(&w.meta);
        if let Some((slot, earlier)) = meta.draining.take() {
            if w.in_place.drained(slot) {
                meta.refcounts.release(&earlier);
            } else {
                meta.draining = Some((slot, earlier));
                return;
            }
        }
        if freed.is_empty() {
            return;
        }
        let slot = w.in_place.next_generation();
        if w.in_place.drained(slot) {
            meta.refcounts.release(&freed);
        } else {
            meta.draining = Some((slot, freed));
        }
    }

    fn write_refcount_table(&self, w: &Writable) -> Result<(), BlockError> {
        let (offset, clusters, bytes) = {
            let m = lock(&w.meta);
            if !m.refcounts.table_dirty {
                return Ok(());
            }
            (
                m.refcounts.table_offset,
                m.refcounts.table_clusters,
                m.refcounts.table_bytes(),
            )
        };
        self.file.write_at(offset, &bytes).map_err(io)?;
        self.file.file.sync_data().map_err(io)?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&offset.to_be_bytes());
        fields[8..].copy_from_slice(&clusters.to_be_bytes());
        self.file.write_durable(48, &fields).map_err(io)?;
        lock(&w.meta).refcounts.table_written();
        info!(
            "{}: refcount table moved to {offset:#x}",
            self.path.display()
        );
        Ok(())
    }
}
