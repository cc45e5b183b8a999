//! Replays the fuzz seed corpus (contrib/fuzz/corpus) through the same entry points the
//! cargo-fuzz targets call, so the corpus is exercised without libFuzzer, and checks that the
//! seeds reach deep: chains parse, images open and serve, the vhost-user stream completes a
//! request.

use std::path::PathBuf;
use std::time::Duration;

use vhost_device_blk::fuzzing;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn request_parse_seeds() {
    for (name, data) in corpus("request_parse") {
        let parsed = fuzzing::request_parse(&data);
        // The loop is the one seed that must not parse.
        assert_eq!(parsed, name != "loop", "{name}");
        // Truncations and single-byte changes stay within the invariants too.
        for cut in [0, 1, 17, 255, 256, 257, data.len() / 2] {
            fuzzing::request_parse(&data[..cut.min(data.len())]);
        }
        for i in (0..data.len()).step_by(7) {
            let mut d = data.clone();
            d[i] ^= 0xff;
            fuzzing::request_parse(&d);
        }
    }
}

#[test]
fn qcow2_ops_seeds() {
    for (name, data) in corpus("qcow2_ops") {
        let done = fuzzing::qcow2_ops(&data);
        // Every seed image opens and all eleven operations but the flush count as served.
        assert!(done >= 9, "{name}: {done} operations succeeded");
        // The image with a few header bytes flipped: refused or served, never a panic.
        for at in [4usize, 20, 24, 40, 48, 72, 100] {
            if at + 2 < data.len() {
                let mut d = data.clone();
                d[at + 2] ^= 0x5a;
                fuzzing::qcow2_ops(&d);
            }
        }
    }
}

#[test]
fn vhost_user_stream_seeds() {
    for (name, data) in corpus("vhost_user_stream") {
        let used = fuzzing::vhost_user_stream_until_used(&data, Duration::from_secs(5));
        if name == "config_and_slots" {
            assert_eq!(used, 0, "{name}");
        } else {
            assert_eq!(used, 1, "{name}: the offered read was not completed");
        }
        // Cut short at a few places: the connection ends early, nothing breaks.
        for cut in [3, 40, data.len() / 3, data.len() - 5] {
            fuzzing::vhost_user_stream(&data[..cut]);
        }
    }
}

#[test]
fn inflight_region_seeds() {
    for (name, data) in corpus("inflight_region") {
        let resubmitted = fuzzing::inflight_region(&data);
        assert_eq!(resubmitted, if name == "fresh" { 0 } else { 3 }, "{name}");
        for i in (0..data.len()).step_by(5) {
            let mut d = data.clone();
            d[i] ^= 0xa5;
            fuzzing::inflight_region(&d);
        }
    }
}
