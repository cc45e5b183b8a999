use super::*;

const CS: u64 = 65536;
const FILE: u64 = 4 * CS;

/// A valid v3 header in a 64 KiB first cluster: 1 GiB, L1 at cluster 3, refcount table at 1.
fn valid() -> Vec<u8> {
    let mut b = vec![0u8; CS as usize];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, QCOW2_MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 16);
    put64(&mut b, 24, 1 << 30);
    put32(&mut b, 36, 2);
    put64(&mut b, 40, 3 * CS);
    put64(&mut b, 48, CS);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    b
}

fn set32(mut b: Vec<u8>, at: usize, v: u32) -> Vec<u8> {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    b
}

fn set64(mut b: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    b
}

fn ext(mut b: Vec<u8>, at: usize, kind: u32, data: &[u8]) -> Vec<u8> {
    b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    b
}

#[test]
fn valid_header_decodes() {
    let h = Header::parse(&valid(), FILE).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_size(), CS);
    assert_eq!(h.l2_entries(), 8192);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.compression, CompressionType::Deflate);
    assert!(!h.dirty() && !h.corrupt() && !h.extended_l2());
}

#[test]
fn extensions_are_decoded_and_unknown_ones_kept() {
    let b = ext(valid(), 112, EXT_BACKING_FORMAT, b"raw");
    let b = ext(b, 128, 0x1234_5678, b"opaque");
    let mut names = vec![0u8; 48];
    names[0] = 0;
    names[1] = 9;
    names[2..7].copy_from_slice(b"shiny");
    let b = ext(b, 144, EXT_FEATURE_NAMES, &names);
    let b = set64(b, 8, 1024);
    let b = set32(b, 16, 8);
    let mut b = b;
    b[1024..1032].copy_from_slice(b"base.img");
    let h = Header::parse(&b, FILE).unwrap();
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.backing_file.as_deref(), Some("base.img"));
    assert_eq!(
        h.unknown_extensions,
        vec![(0x1234_5678, b"opaque".to_vec())]
    );
    assert_eq!(h.feature_list(0, 1 << 9), "shiny (bit 9)");
    // With the name table, an unknown incompatible bit is refused by name.
    let b = set64(b, 72, 1 << 9);
    assert_eq!(
        Header::parse(&b, FILE).unwrap_err(),
        HeaderError::IncompatibleFeatures("shiny (bit 9)".into())
    );
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set32(valid(), 0, 0x1234), "magic"),
        (set32(valid(), 4, 1), "version"),
        (set32(valid(), 4, 4), "version"),
        (set32(valid(), 20, 8), "cluster_bits"),
        (set32(valid(), 20, 22), "cluster_bits"),
        (set32(valid(), 20, 63), "cluster_bits"),
        (set32(valid(), 32, 1), "encrypted"),
        (set32(valid(), 36, 0x7fff_ffff), "l1_size"),
        (set32(valid(), 36, 1), "L1 table"),
        (set64(valid(), 40, 3 * CS + 8), "aligned"),
        (set64(valid(), 40, 100 * CS), "past the end"),
        (set64(valid(), 48, 100), "refcount_table_offset"),
        (set32(valid(), 56, 0), "refcount_table_clusters"),
        (set32(valid(), 56, 0xffff_ffff), "refcount_table_clusters"),
        (set32(valid(), 60, 0xffff_ffff), "nb_snapshots"),
        (set64(set32(valid(), 60, 1), 64, 7), "snapshots_offset"),
        (set64(valid(), 72, 1 << 40), "unknown feature bit 40"),
        (set32(valid(), 96, 7), "refcount_order"),
        (set32(valid(), 100, 105), "header_length"),
        (set32(valid(), 100, 96), "header_length"),
        (set32(valid(), 100, 0x7fff_fff8), "header_length"),
        (
            ext(valid(), 112, 0xdead, &[])
                .iter()
                .copied()
                .enumerate()
                .map(|(i, v)| if i == 116 { 0xff } else { v })
                .collect(),
            "past the first cluster",
        ),
        (set32(set64(valid(), 8, 1024), 16, 2000), "1023"),
        (set32(set64(valid(), 8, CS - 4), 16, 8), "first cluster"),
        (set64(valid(), 72, INCOMPAT_COMPRESSION), "compression_type"),
        (set32(set64(valid(), 72, INCOMPAT_EXTL2), 36, 4), ""),
        (set64(valid(), 72, INCOMPAT_EXTL2), "virtual size"),
        (set64(valid(), 72, INCOMPAT_DATA_FILE), "data file"),
        (set64(valid(), 88, AUTOCLEAR_DATA_FILE_RAW), "data_file_raw"),
    ];
    for (i, (buf, what)) in cases.into_iter().enumerate() {
        match Header::parse(&buf, FILE) {
            Ok(h) if what.is_empty() => assert!(h.extended_l2()),
            Ok(h) => panic!("case {i} ({what}) accepted: {h:?}"),
            Err(e) => assert!(e.to_string().contains(what), "case {i}: {e} lacks {what:?}"),
        }
    }
}

#[test]
fn truncated_buffers_are_refused_not_panicking() {
    let b = valid();
    for len in [0, 3, 71, 72, 100, 103, 111] {
        assert!(Header::parse(&b[..len], FILE).is_err(), "len {len}");
    }
    // Extension area cut short by the end of the buffer.
    let b = ext(valid(), 112, 0x99, &[1; 40]);
    assert!(Header::parse(&b[..150], FILE).is_err());
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let b = set32(set64(valid(), 72, INCOMPAT_EXTL2), 20, 13);
    // 8 KiB clusters: the L1 would also be too small for 1 GiB, so shrink the size.
    let b = set64(b, 24, 1 << 20);
    let b = set64(set64(b, 40, 3 * 8192), 48, 8192);
    assert_eq!(
        Header::parse(&b, FILE).unwrap_err(),
        HeaderError::ExtendedL2ClusterBits(13)
    );
}

#[test]
fn version_2_has_fixed_fields() {
    let b = set32(valid(), 4, 2);
    let h = Header::parse(&b, FILE).unwrap();
    assert_eq!(
        (h.header_length, h.refcount_order, h.incompatible),
        (72, 4, 0)
    );
}
