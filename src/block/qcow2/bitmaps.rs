//! Persistent dirty bitmaps: we do not maintain them, so a writable open drops them cleanly, as
//! QEMU's spec asks of a program without bitmap support: the extension is removed from the
//! header, the autoclear bit cleared, and the bitmaps' clusters freed.

use super::header::{Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_END};
use super::l2::OFFSET_MASK;
use crate::block::file::ImageFile;

/// Clusters (first, count) used by the bitmap directory, bitmap tables and bitmap data.
pub fn clusters(file: &ImageFile, h: &Header) -> std::io::Result<Vec<(u64, u64)>> {
    let Some(b) = h.bitmaps else {
        return Ok(Vec::new());
    };
    let cs = h.cluster_size();
    let span = |off: u64, len: u64| (off / cs, (off + len).div_ceil(cs) - off / cs);
    let mut out = vec![span(b.directory_offset, b.directory_size)];
    let dir = file.read_at(b.directory_offset, b.directory_size as usize)?;
    let mut at = 0usize;
    for _ in 0..b.nb_bitmaps {
        if at + 24 > dir.len() {
            break;
        }
        let table = u64::from_be_bytes(dir[at..at + 8].try_into().unwrap_or([0; 8]));
        let size = u32::from_be_bytes(dir[at + 8..at + 12].try_into().unwrap_or([0; 4]));
        let name_len = usize::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
        let extra = u32::from_be_bytes(dir[at + 20..at + 24].try_into().unwrap_or([0; 4])) as usize;
        at += (24 + extra + name_len).next_multiple_of(8);
        if table == 0 || table % cs != 0 || table >= file.size {
            continue;
        }
        let len = (u64::from(size) * 8).min(file.size - table);
        out.push(span(table, len));
        let raw = file.read_at(table, len as usize)?;
        for e in raw.chunks_exact(8) {
            let off = u64::from_be_bytes(e.try_into().unwrap_or([0; 8])) & OFFSET_MASK;
            if off != 0 && off % cs == 0 && off < file.size {
                out.push((off / cs, 1));
            }
        }
    }
    Ok(out)
}

/// The first cluster rewritten without the bitmaps extension and with autoclear bit 0 clear
/// (the backing file name moves up with the extensions that remain).
pub fn header_without_bitmaps(head: &[u8], h: &Header) -> Vec<u8> {
    let cs = h.cluster_size() as usize;
    let hl = h.header_length as usize;
    let mut out = head[..hl].to_vec();
    let autoclear = h.autoclear & !AUTOCLEAR_BITMAPS;
    out[88..96].copy_from_slice(&autoclear.to_be_bytes());
    let mut at = hl;
    while at + 8 <= head.len() {
        let kind = u32::from_be_bytes(head[at..at + 4].try_into().unwrap_or([0; 4]));
        let len = u32::from_be_bytes(head[at + 4..at + 8].try_into().unwrap_or([0; 4])) as usize;
        if kind == EXT_END {
            break;
        }
        let end = (at + 8 + len).next_multiple_of(8);
        if kind != EXT_BITMAPS {
            out.extend_from_slice(&head[at..end.min(head.len())]);
        }
        at = end;
    }
    out.extend_from_slice(&[0u8; 8]);
    if let Some(name) = &h.backing_file {
        let offset = out.len() as u64;
        out[8..16].copy_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out.resize(cs, 0);
    out
}
