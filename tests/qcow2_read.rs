//! The qcow2 interop matrix: images made by qemu-img and qemu-io, read through the daemon by a
//! real vhost-user front-end, compared byte for byte with `qemu-img convert -O raw`.

mod common;

use std::path::{Path, PathBuf};

use common::qemu::{create_options, qemu_check, qemu_io, qemu_raw, sh};
use common::{Client, Daemon, Rng, REGION_LEN};

const MIB: u64 = 1 << 20;

/// Writes, zero writes, discards and a compressed cluster at odd offsets, scaled to the cluster
/// size so each lands in distinct clusters.
fn workload(cs: u64, size: u64) -> Vec<String> {
    // Positions in units of at least 64 KiB, so that small clusters do not overlap either.
    let u = cs.max(65536);
    let mut v = vec![
        "write -P 0x11 0 64k".to_string(),
        "write -P 0x22 1000 3000".into(),
        format!("write -P 0x33 {} {}", u + 7 * 512, 3 * u + 1024),
        format!("write -P 0x44 {} {}", 8 * u, 4 * u),
        format!("write -z {} {}", 9 * u + 4096, u),
        format!("discard {} {}", 10 * u, u),
        format!("write -P 0x66 {} 4096", size - 4096),
    ];
    if 21 * u <= size - 4096 {
        v.push(format!("write -c -P 0x55 {} {}", 20 * u, cs));
    }
    v
}

/// Reads the whole disk through the daemon (and some odd-sized pieces) and compares.
fn check_through_daemon(dir: &Path, image: &Path, extra: &[&str]) {
    let expect = qemu_raw(image);
    let d = Daemon::start(dir, image, &[&["--format", "qcow2"], extra].concat());
    let mut c = Client::connect(d.path(), 1, extra.contains(&"--read-only")).unwrap();
    assert_eq!(
        c.capacity(),
        expect.len() as u64 / 512 * 512,
        "{}",
        image.display()
    );
    let cap = c.capacity() as usize;
    let mut at = 0;
    while at < cap {
        let n = (cap - at).min(REGION_LEN / 2);
        let got = c
            .read(0, at as u64, n)
            .unwrap_or_else(|e| panic!("read {at}+{n}: {e}\n{}", d.log_text()));
        if got != expect[at..at + n] {
            let first = (0..n).find(|&i| got[i] != expect[at + i]).unwrap();
            panic!(
                "{}: byte {} differs: {:#x} != {:#x}\n{}",
                image.display(),
                at + first,
                got[first],
                expect[at + first],
                d.log_text()
            );
        }
        at += n;
    }
    let mut rng = Rng::new(cap as u64);
    for _ in 0..64 {
        let len = (1 + rng.below(300) as usize) * 512;
        let off = rng.below(((cap - len) / 512) as u64) as usize * 512;
        assert!(
            c.read(0, off as u64, len).unwrap() == expect[off..off + len],
            "{off}+{len}"
        );
    }
    drop(c);
    assert!(d.stop().success());
}

struct Case {
    name: &'static str,
    /// Makes the image in the directory; returns its path.
    make: fn(&Path) -> PathBuf,
}

fn create(dir: &Path, opts: &str, size: u64) -> PathBuf {
    let o = create_options(opts);
    sh(
        dir,
        &format!("qemu-img create -q -f qcow2 {o} img.qcow2 {size}"),
    );
    dir.join("img.qcow2")
}

fn with_workload(dir: &Path, opts: &str, cs: u64, size: u64) -> PathBuf {
    let img = create(dir, opts, size);
    qemu_io(dir, "img.qcow2", &workload(cs, size));
    img
}

fn pattern_raw(dir: &Path, name: &str, size: u64, seed: u64) {
    common::pattern_image(&dir.join(name), size as usize, seed);
}

const CASES: &[Case] = &[
    Case {
        name: "v2",
        make: |d| with_workload(d, "compat=0.10", 65536, 32 * MIB),
    },
    Case {
        name: "v3-512b-clusters",
        make: |d| with_workload(d, "cluster_size=512", 512, 4 * MIB),
    },
    Case {
        name: "v3-4k-clusters",
        make: |d| with_workload(d, "cluster_size=4k", 4096, 8 * MIB),
    },
    Case {
        name: "v3-64k",
        make: |d| with_workload(d, "", 65536, 32 * MIB),
    },
    Case {
        name: "v3-2m-clusters",
        make: |d| with_workload(d, "cluster_size=2M", 2 * MIB, 64 * MIB),
    },
    Case {
        name: "refcount-1",
        make: |d| with_workload(d, "refcount_bits=1", 65536, 32 * MIB),
    },
    Case {
        name: "refcount-8",
        make: |d| with_workload(d, "refcount_bits=8", 65536, 32 * MIB),
    },
    Case {
        name: "refcount-64",
        make: |d| with_workload(d, "refcount_bits=64", 65536, 32 * MIB),
    },
    Case {
        name: "extended-l2-64k",
        make: |d| with_workload(d, "extended_l2=on", 65536, 32 * MIB),
    },
    Case {
        name: "extended-l2-16k",
        make: |d| with_workload(d, "extended_l2=on,cluster_size=16k", 16384, 16 * MIB),
    },
    Case {
        name: "extended-l2-2m",
        make: |d| with_workload(d, "extended_l2=on,cluster_size=2M", 2 * MIB, 64 * MIB),
    },
    Case {
        name: "zstd",
        make: |d| with_workload(d, "compression_type=zstd", 65536, 32 * MIB),
    },
    Case {
        name: "converted-deflate",
        make: |d| {
            pattern_raw(d, "src.raw", 8 * MIB, 1);
            common::qemu::qemu_io_fmt(d, "raw", "src.raw", &["write -z 1M 1M".into()]);
            sh(d, "qemu-img convert -c -O qcow2 src.raw img.qcow2");
            d.join("img.qcow2")
        },
    },
    Case {
        name: "converted-zstd-2m",
        make: |d| {
            pattern_raw(d, "src.raw", 8 * MIB, 2);
            sh(d, "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=2M src.raw img.qcow2");
            d.join("img.qcow2")
        },
    },
    Case {
        name: "backing-chain",
        make: |d| {
            pattern_raw(d, "base.raw", 32 * MIB, 3);
            sh(
                d,
                "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 32M",
            );
            qemu_io(
                d,
                "mid.qcow2",
                &[
                    "write -P 0x71 100k 300k".into(),
                    "write -z 2M 1M".into(),
                    "discard 5M 128k".into(),
                ],
            );
            sh(
                d,
                "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 img.qcow2 32M",
            );
            qemu_io(d, "img.qcow2", &workload(65536, 32 * MIB));
            d.join("img.qcow2")
        },
    },
    Case {
        name: "backing-shorter-than-image",
        make: |d| {
            pattern_raw(d, "base.raw", 3 * MIB + 512 * 5, 4);
            sh(
                d,
                "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 16M",
            );
            qemu_io(d, "img.qcow2", &["write -P 0x12 1M 8k".into()]);
            d.join("img.qcow2")
        },
    },
    Case {
        name: "extended-l2-over-backing",
        make: |d| {
            pattern_raw(d, "base.raw", 16 * MIB, 5);
            sh(
                d,
                "qemu-img create -q -f qcow2 -b base.raw -F raw -o extended_l2=on img.qcow2 16M",
            );
            qemu_io(
                d,
                "img.qcow2",
                &[
                    "write -P 0x21 4k 4k".into(),
                    "write -P 0x22 70000 5000".into(),
                    "write -z 200k 8k".into(),
                    "write -P 0x23 1M 300k".into(),
                ],
            );
            d.join("img.qcow2")
        },
    },
    Case {
        name: "qcow2-backing-with-compression",
        make: |d| {
            pattern_raw(d, "src.raw", 8 * MIB, 6);
            sh(d, "qemu-img convert -c -O qcow2 src.raw base.qcow2");
            sh(
                d,
                "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on img.qcow2 8M",
            );
            qemu_io(d, "img.qcow2", &["write -P 0x31 65536 2048".into()]);
            d.join("img.qcow2")
        },
    },
    Case {
        name: "external-data-file",
        make: |d| {
            let img = create(d, "data_file=img.data", 32 * MIB);
            qemu_io(d, "img.qcow2", &workload(65536, 32 * MIB)[..7]);
            img
        },
    },
    Case {
        name: "external-data-file-raw",
        make: |d| {
            let img = create(d, "data_file=img.data,data_file_raw=on", 32 * MIB);
            qemu_io(d, "img.qcow2", &workload(65536, 32 * MIB)[..7]);
            img
        },
    },
    Case {
        name: "internal-snapshots",
        make: |d| {
            let img = with_workload(d, "", 65536, 32 * MIB);
            sh(d, "qemu-img snapshot -c s1 img.qcow2");
            qemu_io(
                d,
                "img.qcow2",
                &["write -P 0x91 0 128k".into(), "write -z 600k 64k".into()],
            );
            sh(d, "qemu-img snapshot -c s2 img.qcow2");
            qemu_io(d, "img.qcow2", &["write -P 0x92 4k 4k".into()]);
            img
        },
    },
    Case {
        name: "persistent-bitmaps",
        make: |d| {
            let img = with_workload(d, "", 65536, 32 * MIB);
            sh(d, "qemu-img bitmap --add img.qcow2 b0");
            sh(d, "qemu-img bitmap --add -g 128k img.qcow2 b1");
            img
        },
    },
    Case {
        name: "preallocation-metadata",
        make: |d| {
            let img = create(d, "preallocation=metadata", 32 * MIB);
            qemu_io(d, "img.qcow2", &workload(65536, 32 * MIB)[..7]);
            img
        },
    },
    Case {
        name: "preallocation-falloc",
        make: |d| {
            let img = create(d, "preallocation=falloc,extended_l2=on", 16 * MIB);
            qemu_io(d, "img.qcow2", &workload(65536, 16 * MIB)[..7]);
            img
        },
    },
    Case {
        name: "unaligned-size",
        make: |d| with_workload(d, "", 65536, 16 * MIB + 1536),
    },
    Case {
        name: "empty",
        make: |d| create(d, "", 8 * MIB),
    },
];

#[test]
fn every_case_reads_like_qemu() {
    let mut failed = Vec::new();
    let only = std::env::var("QCOW2_CASE").ok();
    for case in CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
    {
        let dir = tempfile::tempdir().unwrap();
        let img = (case.make)(dir.path());
        let r =
            std::panic::catch_unwind(|| check_through_daemon(dir.path(), &img, &["--read-only"]));
        if r.is_err() {
            failed.push(case.name);
        }
        assert_eq!(
            qemu_check(&img),
            0,
            "{}: image changed by a read-only open",
            case.name
        );
    }
    assert!(failed.is_empty(), "cases failed: {failed:?}");
}

#[test]
fn cache_modes_and_tiny_l2_cache_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    pattern_raw(dir.path(), "base.raw", 32 * MIB, 7);
    sh(
        dir.path(),
        "qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=4k img.qcow2 32M",
    );
    qemu_io(dir.path(), "img.qcow2", &workload(4096, 32 * MIB));
    let img = dir.path().join("img.qcow2");
    for extra in [
        &["--read-only", "--cache", "none"][..],
        &["--read-only", "--l2-cache-size", "16k", "--aio", "threads"],
        &["--read-only", "--cache", "none", "--l2-cache-size", "1"],
    ] {
        check_through_daemon(dir.path(), &img, extra);
    }
}

#[test]
fn writable_open_serves_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = with_workload(dir.path(), "", 65536, 32 * MIB);
    sh(dir.path(), "qemu-img bitmap --add img.qcow2 b0");
    // An autoclear bit nobody knows: a writer that does not maintain it must clear it.
    let mut head = std::fs::read(&img).unwrap()[..65536].to_vec();
    head[95] |= 1 << 5;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &head, 0).unwrap();
    let mut expect = qemu_raw(&img);
    check_through_daemon(dir.path(), &img, &[]);
    let d = Daemon::start(dir.path(), &img, &["--format", "qcow2"]);
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    // Allocated clusters are overwritten in place.
    if let Err(e) = c.write(0, 8 * 65536 + 512, &[0xee; 8192]) {
        panic!("in-place write: {e}\n{}", d.log_text());
    }
    expect[8 * 65536 + 512..8 * 65536 + 512 + 8192].fill(0xee);
    // Allocating writes work too.
    c.write(0, 30 * MIB, &[1; 4096]).unwrap();
    expect[30 * MIB as usize..30 * MIB as usize + 4096].fill(1);
    c.flush(0).unwrap();
    drop(c);
    assert!(d.stop().success());
    assert!(qemu_raw(&img) == expect);
    // The bitmaps we do not maintain were removed cleanly: no extension, no leaked clusters.
    assert_eq!(qemu_check(&img), 0);
    let info = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&info.stdout).contains("bitmaps:"));
    // The autoclear bits we do not maintain are clear.
    let after = std::fs::read(&img).unwrap()[..65536].to_vec();
    assert_eq!(
        u64::from_be_bytes(after[88..96].try_into().unwrap()) & (1 | 1 << 5),
        0
    );
    // Fields up to the feature bits are unchanged; the feature name table is still there.
    assert!(after[..72] == head[..72]);
    assert!(
        after.windows(4).any(|w| w == [0x68, 0x03, 0xf8, 0x57]),
        "feature names lost"
    );
}
