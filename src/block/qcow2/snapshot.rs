//! The internal snapshot table: parsed and validated at open (the active state is what we serve;
//! snapshots are kept intact).

use super::header::{Header, HeaderError, MAX_L1_BYTES};
use crate::block::file::ImageFile;

/// Largest snapshot table QEMU accepts (`QCOW_MAX_SNAPSHOTS_SIZE`).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest per-snapshot extra data (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_EXTRA_DATA: u32 = 1024;
/// Fixed part of a snapshot table entry.
const ENTRY_HEADER: usize = 40;

/// What we keep of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Snapshot L1 table offset.
    pub l1_table_offset: u64,
    /// Snapshot L1 entries.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads and validates the snapshot table; returns the snapshots and the table's length in bytes.
pub fn read_table(file: &ImageFile, h: &Header) -> Result<(Vec<Snapshot>, u64), HeaderError> {
    let bad = HeaderError::Snapshots;
    let cs = h.cluster_size();
    let mut out = Vec::with_capacity((h.nb_snapshots as usize).min(1024));
    let mut at = h.snapshots_offset;
    let table_end_limit = h
        .snapshots_offset
        .saturating_add(MAX_TABLE_BYTES)
        .min(file.size);
    for _ in 0..h.nb_snapshots {
        if at + ENTRY_HEADER as u64 > table_end_limit {
            return Err(bad(
                "table runs past the end of the file or the 64 MiB limit",
            ));
        }
        let head = file
            .read_at(at, ENTRY_HEADER)
            .map_err(|_| bad("cannot read the table"))?;
        let l1_table_offset = be64(&head, 0);
        let l1_size = be32(&head, 8);
        let id_len = usize::from(be16(&head, 12));
        let name_len = usize::from(be16(&head, 14));
        let extra = be32(&head, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(bad("extra data larger than 1024 bytes"));
        }
        if h.version >= 3 && extra < 16 {
            return Err(bad("version 3 snapshot without the required extra data"));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad("snapshot L1 table larger than 32 MiB"));
        }
        if l1_table_offset % cs != 0
            || l1_table_offset
                .checked_add(u64::from(l1_size) * 8)
                .is_none_or(|e| e > file.size)
        {
            return Err(bad(
                "snapshot L1 table unaligned or past the end of the file",
            ));
        }
        let var_len = extra as usize + id_len + name_len;
        let entry_len = (ENTRY_HEADER + var_len).next_multiple_of(8) as u64;
        // QEMU does not write the padding of the last entry: only its bytes must be in the file.
        if at + (ENTRY_HEADER + var_len) as u64 > table_end_limit {
            return Err(bad(
                "table runs past the end of the file or the 64 MiB limit",
            ));
        }
        let var = file
            .read_at(at + ENTRY_HEADER as u64, var_len)
            .map_err(|_| bad("cannot read the table"))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let id_at = extra as usize;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: text(&var[id_at..id_at + id_len]),
            name: text(&var[id_at + id_len..]),
        });
        at += entry_len;
    }
    Ok((out, at - h.snapshots_offset))
}
