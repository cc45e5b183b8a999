//! Consistency check and repair, with `qemu-img check` semantics: every cluster's refcount is
//! compared with the references the metadata makes to it (header, L1/L2 tables of the active
//! state and of every snapshot, data clusters, refcount structures, snapshot table, bitmaps).
//! A refcount below its references is a corruption, above is a leak; so is a COPIED flag that
//! disagrees with a refcount of one, and an entry pointing outside the file.
//!
//! Repair sets every refcount to its reference count (only lowering them for `leaks`), growing
//! the refcount structures at the end of the file where needed, fixes COPIED flags and clears
//! entries that point outside the file.

use std::fmt::Write as _;

use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFFSET_INCOMPATIBLE};
use super::l2::{self, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::refcount::{RefcountError, Refcounts};
use super::snapshot;
use crate::block::file::ImageFile;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Lower refcounts that are too high.
    Leaks,
    /// Fix everything that can be fixed.
    All,
}

/// The outcome, with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions found (before repair).
    pub corruptions: u64,
    /// Leaked clusters found.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active state.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last used cluster.
    pub image_end_offset: u64,
    /// One line per problem.
    pub messages: Vec<String>,
}

impl CheckResult {
    /// Corruptions left after repair.
    pub fn remaining_corruptions(&self) -> u64 {
        self.corruptions - self.corruptions_fixed
    }

    /// Leaks left after repair.
    pub fn remaining_leaks(&self) -> u64 {
        self.leaks - self.leaks_fixed
    }

    /// `qemu-img check` exit status: 0 clean, 1 check incomplete, 2 corrupted, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.remaining_corruptions() > 0 {
            2
        } else if self.remaining_leaks() > 0 {
            3
        } else {
            0
        }
    }
}

/// An entry of the active L1 or an active L2 table, for the COPIED check and repairs.
struct ActiveRef {
    /// File offset of the entry.
    at: u64,
    /// The entry (first word).
    entry: u64,
    /// Cluster whose refcount decides COPIED (0: none, e.g. data-file clusters).
    cluster: u64,
}

struct Walker<'a> {
    file: &'a ImageFile,
    h: &'a Header,
    refs: Vec<u32>,
    res: CheckResult,
    active: Vec<ActiveRef>,
    /// Entries to clear (offset of the entry, entry size) because they point outside the file.
    clear: Vec<(u64, u64)>,
    last_data: u64,
}

impl Walker<'_> {
    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    fn problem(&mut self, msg: String) {
        self.res.messages.push(msg);
    }

    /// Counts one reference to every cluster in `offset..offset+len`.
    fn reference(&mut self, offset: u64, len: u64, what: &str) -> bool {
        let cs = self.cs();
        if len == 0 {
            return true;
        }
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        if last >= self.refs.len() as u64 {
            self.res.corruptions += 1;
            self.problem(format!(
                "ERROR {what} at offset {offset:#x} is beyond the end of the image"
            ));
            return false;
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
        true
    }

    fn read_u64s(&mut self, offset: u64, count: u64) -> Option<Vec<u64>> {
        match self.file.read_at(offset, (count * 8) as usize) {
            Ok(b) => Some(
                b.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            Err(e) => {
                self.res.check_errors += 1;
                self.problem(format!("ERROR reading metadata at {offset:#x}: {e}"));
                None
            }
        }
    }

    fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) {
        let cs = self.cs();
        let Some(l1) = self.read_u64s(l1_offset, u64::from(l1_size)) else {
            return;
        };
        for (i, &e) in l1.iter().enumerate() {
            let table = e & OFFSET_MASK;
            if table == 0 {
                continue;
            }
            let at = l1_offset + 8 * i as u64;
            if table % cs != 0 || !self.reference(table, cs, "L2 table") {
                if table % cs != 0 {
                    self.res.corruptions += 1;
                    self.problem(format!("ERROR L1 entry {i} is not cluster aligned: {e:#x}"));
                }
                if active {
                    self.clear.push((at, 8));
                }
                continue;
            }
            if active {
                self.active.push(ActiveRef {
                    at,
                    entry: e,
                    cluster: table / cs,
                });
            }
            self.walk_l2(table, i as u64, active);
        }
    }

    fn walk_l2(&mut self, table: u64, l1_index: u64, active: bool) {
        let cs = self.cs();
        let ext = self.h.extended_l2();
        let words = cs / 8;
        let Some(t) = self.read_u64s(table, words) else {
            return;
        };
        let step = if ext { 2 } else { 1 };
        let data_file = self.h.has_data_file();
        for j in 0..(words / step) as usize {
            let e = t[j * step as usize];
            let bitmap = if ext { t[j * 2 + 1] } else { 0 };
            let at = table + 8 * step * j as u64;
            let guest = (l1_index * (words / step) + j as u64) * cs;
            if e & OFLAG_COMPRESSED != 0 {
                let (off, len) = l2::compressed_range(
                    e & !(OFLAG_COPIED | OFLAG_COMPRESSED),
                    self.h.cluster_bits,
                );
                if active {
                    self.res.allocated_clusters += 1;
                    self.res.compressed_clusters += 1;
                }
                if ext && bitmap != 0 {
                    self.res.corruptions += 1;
                    self.problem(format!(
                        "ERROR compressed cluster {guest:#x} has a subcluster bitmap"
                    ));
                }
                // The last sector may run past the end of the file.
                let len = len.min((self.refs.len() as u64 * cs).saturating_sub(off));
                if !self.reference(off, len, "compressed cluster") && active {
                    self.clear.push((at, 8 * step));
                }
                continue;
            }
            let decoded = if ext {
                l2::decode_extended(e, bitmap, cs, data_file)
            } else {
                l2::decode_standard(e, cs, data_file)
            };
            let host = e & OFFSET_MASK;
            match decoded {
                Err(reason) => {
                    self.res.corruptions += 1;
                    self.problem(format!(
                        "ERROR L2 entry for guest offset {guest:#x}: {reason}"
                    ));
                    if active {
                        self.clear.push((at, 8 * step));
                    }
                }
                Ok(_) if host == 0 && !(data_file && e & OFLAG_COPIED != 0) => {}
                Ok(m) => {
                    if active && matches!(m, l2::L2Mapping::Standard { alloc, .. } if alloc != 0) {
                        self.res.allocated_clusters += 1;
                        if self.last_data != 0 && host != self.last_data + cs {
                            self.res.fragmented_clusters += 1;
                        }
                        self.last_data = host;
                    }
                    if data_file {
                        continue;
                    }
                    if self.reference(host, cs, "data cluster") {
                        if active {
                            self.active.push(ActiveRef {
                                at,
                                entry: e,
                                cluster: host / cs,
                            });
                        }
                    } else if active {
                        self.clear.push((at, 8 * step));
                    }
                }
            }
        }
    }

    fn walk_bitmaps(&mut self) {
        let Some(b) = self.h.bitmaps else { return };
        let cs = self.cs();
        self.reference(b.directory_offset, b.directory_size, "bitmap directory");
        let Ok(dir) = self
            .file
            .read_at(b.directory_offset, b.directory_size as usize)
        else {
            self.res.check_errors += 1;
            return;
        };
        let mut at = 0usize;
        for _ in 0..b.nb_bitmaps {
            if at + 24 > dir.len() {
                self.res.corruptions += 1;
                self.problem("ERROR bitmap directory truncated".into());
                return;
            }
            let table = u64::from_be_bytes(dir[at..at + 8].try_into().unwrap_or([0; 8]));
            let size = u32::from_be_bytes(dir[at + 8..at + 12].try_into().unwrap_or([0; 4]));
            let name_len = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
            let extra =
                u32::from_be_bytes(dir[at + 20..at + 24].try_into().unwrap_or([0; 4])) as usize;
            at += (24 + extra + name_len).next_multiple_of(8);
            if table % cs != 0 || !self.reference(table, u64::from(size) * 8, "bitmap table") {
                continue;
            }
            if let Some(entries) = self.read_u64s(table, u64::from(size)) {
                for e in entries {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        self.reference(off, cs, "bitmap data");
                    }
                }
            }
        }
    }
}

/// Checks (and optionally repairs) a writable or read-only open image file.
pub fn check(file: &ImageFile, h: &Header, repair: Repair) -> CheckResult {
    let cs = h.cluster_size();
    let loaded = Refcounts::load(file, h);
    // Like qemu-img, only clusters inside the file are compared (refcounts past its end are
    // invisible leaks; references past it are corruptions).
    let file_clusters = file.size.div_ceil(cs);
    let mut w = Walker {
        file,
        h,
        refs: vec![0; file_clusters as usize],
        res: CheckResult {
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        },
        active: Vec::new(),
        clear: Vec::new(),
        last_data: 0,
    };
    w.reference(0, cs, "header");
    w.reference(h.l1_table_offset, u64::from(h.l1_size) * 8, "L1 table");
    w.reference(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    );
    if let Ok(r) = &loaded {
        for &off in r.table.iter().filter(|&&o| o != 0) {
            w.reference(off, cs, "refcount block");
        }
    }
    match snapshot::read_table(file, h) {
        Ok((snaps, len)) => {
            w.reference(h.snapshots_offset, len, "snapshot table");
            for s in snaps {
                w.reference(
                    s.l1_table_offset,
                    u64::from(s.l1_size) * 8,
                    "snapshot L1 table",
                );
                w.walk_l1(s.l1_table_offset, s.l1_size, false);
            }
        }
        Err(e) => {
            w.res.corruptions += 1;
            w.problem(format!("ERROR snapshot table: {e}"));
        }
    }
    w.walk_bitmaps();
    w.walk_l1(h.l1_table_offset, h.l1_size, true);

    let Walker {
        refs,
        mut res,
        active,
        clear,
        ..
    } = w;
    let mut refcounts = match loaded {
        Ok(r) => r,
        Err(e) => {
            // qemu-img counts this as a corruption that also stops the check.
            res.corruptions += 1;
            res.messages.push(format!("ERROR {e}"));
            if repair != Repair::All {
                res.check_errors += 1;
                return res;
            }
            // Rebuild from nothing, entirely past the current end of the file.
            Refcounts::empty(h, file_clusters)
        }
    };
    let rebuilt = refcounts.table_offset == 0;

    // Compare.
    let end = refs.len() as u64;
    let mut fixes: Vec<(u64, u64)> = Vec::new();
    let (mut leak_fixes, mut corruption_fixes) = (0, 0);
    for c in 0..end {
        let expected = u64::from(refs.get(c as usize).copied().unwrap_or(0));
        let actual = refcounts.get(c);
        if actual == expected || (rebuilt && c >= file_clusters) {
            continue;
        }
        if actual < expected {
            res.corruptions += 1;
            res.messages.push(format!(
                "ERROR cluster {c} refcount={actual} reference={expected}"
            ));
            if repair == Repair::All {
                fixes.push((c, expected));
                corruption_fixes += 1;
            }
        } else {
            res.leaks += 1;
            res.messages.push(format!(
                "Leaked cluster {c} refcount={actual} reference={expected}"
            ));
            if repair != Repair::None {
                fixes.push((c, expected));
                leak_fixes += 1;
            }
        }
    }
    // COPIED flags of the active state must say "refcount is exactly one": reported against the
    // refcounts as found (as qemu-img does), repaired against the refcounts after repair.
    let mut flag_fixes = Vec::new();
    for a in &active {
        let copied = a.entry & OFLAG_COPIED != 0;
        let found = if rebuilt { 1 } else { refcounts.get(a.cluster) };
        if copied != (found == 1) {
            res.corruptions += 1;
            res.messages.push(format!(
                "ERROR OFLAG_COPIED at {:#x}: entry={:#x} refcount={found}",
                a.at, a.entry
            ));
        }
        let repaired = u64::from(refs.get(a.cluster as usize).copied().unwrap_or(0));
        if copied != (repaired == 1) && repair == Repair::All {
            flag_fixes.push((a.at, a.entry ^ OFLAG_COPIED));
        }
    }
    let last_used = (0..refs.len())
        .rev()
        .find(|&c| refs[c] > 0)
        .map_or(0, |c| c as u64 + 1);
    res.image_end_offset = last_used * cs;
    if repair == Repair::None {
        return res;
    }

    refcounts.append_only = true;
    let mut apply = || -> Result<(), String> {
        for &(c, v) in &fixes {
            refcounts
                .set(c, v)
                .map_err(|e: RefcountError| e.to_string())?;
        }
        if repair == Repair::All {
            for &(at, entry) in &flag_fixes {
                file.write_at(at, &entry.to_be_bytes())
                    .map_err(|e| e.to_string())?;
            }
            for &(at, len) in &clear {
                file.write_at(at, &vec![0u8; len as usize])
                    .map_err(|e| e.to_string())?;
            }
        }
        write_back(file, &mut refcounts).map_err(|e| e.to_string())?;
        Ok(())
    };
    match apply() {
        Ok(()) => {
            res.leaks_fixed = leak_fixes;
            // With `all`, flags, cleared entries and a rebuilt table are fixed too.
            res.corruptions_fixed = if repair == Repair::All {
                res.corruptions
            } else {
                corruption_fixes
            };
        }
        Err(e) => {
            res.check_errors += 1;
            res.messages.push(format!("ERROR repair failed: {e}"));
        }
    }
    if repair == Repair::All && res.remaining_corruptions() == 0 && res.check_errors == 0 {
        let cleared = h.incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if cleared != h.incompatible && h.version >= 3 {
            if let Err(e) = file.write_durable(OFFSET_INCOMPATIBLE, &cleared.to_be_bytes()) {
                res.check_errors += 1;
                res.messages
                    .push(format!("ERROR clearing the dirty/corrupt bits: {e}"));
            }
        }
    }
    res
}

/// Writes dirty refcount blocks, a moved or changed table, and the header fields pointing to it;
/// then makes it all durable.
pub fn write_back(file: &ImageFile, r: &mut Refcounts) -> std::io::Result<()> {
    for (offset, bytes) in r.take_dirty_blocks() {
        file.write_at(offset, &bytes)?;
    }
    if r.table_dirty {
        file.write_at(r.table_offset, &r.table_bytes())?;
        file.file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&r.table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&r.table_clusters.to_be_bytes());
        file.write_at(48, &fields)?;
        r.table_written();
    }
    file.file.sync_data()
}

/// Human-readable report, as `qemu-img check` prints it.
pub fn report(res: &CheckResult) -> String {
    let mut s = String::new();
    for m in &res.messages {
        let _ = writeln!(s, "{m}");
    }
    if res.remaining_corruptions() == 0 && res.remaining_leaks() == 0 && res.check_errors == 0 {
        let _ = writeln!(s, "No errors were found on the image.");
    } else {
        if res.remaining_corruptions() > 0 {
            let _ = writeln!(
                s,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                res.remaining_corruptions()
            );
        }
        if res.remaining_leaks() > 0 {
            let _ = writeln!(
                s,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                res.remaining_leaks()
            );
        }
    }
    if res.corruptions_fixed + res.leaks_fixed > 0 {
        let _ = writeln!(
            s,
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            res.leaks_fixed, res.corruptions_fixed
        );
    }
    let pct = |n: u64| {
        if res.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / res.total_clusters as f64
        }
    };
    let _ = writeln!(
        s,
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
        res.allocated_clusters,
        res.total_clusters,
        pct(res.allocated_clusters),
        pct(res.fragmented_clusters),
        pct(res.compressed_clusters)
    );
    let _ = writeln!(s, "Image end offset: {}", res.image_end_offset);
    s
}
