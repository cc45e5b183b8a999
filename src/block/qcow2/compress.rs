//! Decompressing qcow2 compressed clusters: raw deflate (QEMU's default) and zstd. The output is
//! exactly one cluster; anything that does not fill it is corruption. Memory is bounded: the
//! output buffer is the cluster, the zstd window is capped.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::header::CompressionType;

/// Largest zstd window we accept (QEMU's frames use at most the cluster size).
const MAX_ZSTD_WINDOW: u64 = 4 << 20;

/// Fills `out` (one cluster) from the compressed bytes `input`.
pub fn decompress_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), &'static str> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    let mut state = DecompressorOxide::new();
    // Raw deflate (no zlib header); the output buffer holds everything.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        // The compressed length is only known to 512 bytes: like QEMU, accept a stream that
        // fills the cluster whether or not it ends exactly there.
        TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput
            if written == out.len() =>
        {
            Ok(())
        }
        _ => Err("undecodable deflate data in a compressed cluster"),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    const BAD: &str = "undecodable zstd data in a compressed cluster";
    let mut src = input;
    let mut done = 0;
    while done < out.len() {
        if zstd_window(src).ok_or(BAD)? > MAX_ZSTD_WINDOW {
            return Err("zstd window too large in a compressed cluster");
        }
        let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src).map_err(|_| BAD)?;
        let before = done;
        while done < out.len() {
            match dec.read(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => return Err(BAD),
            }
        }
        if done == before {
            return Err(BAD);
        }
    }
    Ok(())
}

/// The window size a zstd frame header asks for (RFC 8878, 3.1.1.1), checked before the decoder
/// allocates it.
fn zstd_window(src: &[u8]) -> Option<u64> {
    if src.get(..4)? != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let desc = *src.get(4)?;
    let single_segment = desc & 0x20 != 0;
    if !single_segment {
        let wd = *src.get(5)?;
        let log = 10 + u64::from(wd >> 3);
        if log > 41 {
            return None;
        }
        let base = 1u64 << log;
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    let dict_len = [0usize, 1, 2, 4][usize::from(desc & 3)];
    let fcs_at = 5 + dict_len;
    let fcs = match desc >> 6 {
        0 => u64::from(*src.get(fcs_at)?),
        1 => {
            u64::from(u16::from_le_bytes(
                src.get(fcs_at..fcs_at + 2)?.try_into().ok()?,
            )) + 256
        }
        2 => u64::from(u32::from_le_bytes(
            src.get(fcs_at..fcs_at + 4)?.try_into().ok()?,
        )),
        _ => u64::from_le_bytes(src.get(fcs_at..fcs_at + 8)?.try_into().ok()?),
    };
    Some(fcs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trip_and_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut padded = comp.clone();
        padded.resize(comp.len().next_multiple_of(512), 0xee);
        let mut out = vec![0u8; 65536];
        decompress_cluster(CompressionType::Deflate, &padded, &mut out).unwrap();
        assert_eq!(out, data);
        // Truncated input cannot fill the cluster.
        assert!(
            decompress_cluster(CompressionType::Deflate, &comp[..comp.len() / 2], &mut out)
                .is_err()
        );
        assert!(decompress_cluster(CompressionType::Deflate, &[0xff; 512], &mut out).is_err());
    }

    #[test]
    fn zstd_garbage_is_refused() {
        let mut out = vec![0u8; 65536];
        assert!(decompress_cluster(CompressionType::Zstd, &[0xff; 512], &mut out).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[], &mut out).is_err());
        // A frame header claiming a 1 GiB window (window log 30).
        let mut hdr = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 20 << 3];
        assert_eq!(zstd_window(&hdr), Some(1 << 30));
        hdr.resize(512, 0);
        assert!(decompress_cluster(CompressionType::Zstd, &hdr, &mut out).is_err());
    }
}
