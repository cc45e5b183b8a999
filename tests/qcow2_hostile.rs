//! Hostile qcow2 images, crafted from valid ones: refused at open, fast and with a message that
//! names the problem, or served with the damaged area failing with EIO while the rest reads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::{create_options, qemu_io, sh};
use common::{be32, be64, put, Client, Daemon, BIN};

const MIB: u64 = 1 << 20;
const EIO: i32 = -libc::EIO;

fn put32(p: &Path, at: u64, v: u32) {
    put(p, at, &v.to_be_bytes());
}

fn put64(p: &Path, at: u64, v: u64) {
    put(p, at, &v.to_be_bytes());
}

/// File offset of the L2 entry mapping guest offset `guest` (the L2 table must exist).
fn l2_entry_at(p: &Path, guest: u64) -> u64 {
    let cluster_bits = be32(p, 20);
    let extended = be64(p, 72) & (1 << 4) != 0;
    let entry_size = if extended { 16 } else { 8 };
    let l2_entries = (1u64 << cluster_bits) / entry_size;
    let cluster = guest >> cluster_bits;
    let l1 = be64(p, 40);
    let l1e = be64(p, l1 + 8 * (cluster / l2_entries)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l1e, 0, "no L2 table for {guest}");
    l1e + entry_size * (cluster % l2_entries)
}

/// A valid 16 MiB image with data in its first clusters.
fn base(dir: &Path, opts: &str) -> PathBuf {
    let o = create_options(opts);
    sh(
        dir,
        &format!("qemu-img create -q -f qcow2 {o} img.qcow2 16M"),
    );
    qemu_io(
        dir,
        "img.qcow2",
        &["write -P 0x5a 0 256k".into(), "write -P 0x6b 8M 64k".into()],
    );
    dir.join("img.qcow2")
}

/// Starts the daemon expecting a refusal: exit 1, one stderr line containing `what`, quickly.
fn refused(dir: &Path, img: &Path, extra: &[&str], what: &str) {
    let sock = dir.join("refused.sock");
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(img)
        .args(["--format", "qcow2"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if common::wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
        let _ = child.kill();
        panic!("expected a refusal ({what}), but the daemon is serving");
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected refusal ({what}): {stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refusal took {:?}",
        t.elapsed()
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(what), "{what:?} not in {:?}", lines[0]);
}

#[test]
fn malformed_headers_are_refused_by_name() {
    type Patch = fn(&Path);
    let cases: &[(&str, Patch, &str)] = &[
        ("magic", |p| put32(p, 0, 0x1234_5678), "bad magic"),
        ("version 1", |p| put32(p, 4, 1), "version 1"),
        ("version 4", |p| put32(p, 4, 4), "version 4"),
        ("cluster_bits 8", |p| put32(p, 20, 8), "cluster_bits 8"),
        ("cluster_bits 22", |p| put32(p, 20, 22), "cluster_bits 22"),
        ("cluster_bits 63", |p| put32(p, 20, 63), "cluster_bits 63"),
        ("encrypted", |p| put32(p, 32, 1), "encrypted"),
        ("huge l1", |p| put32(p, 36, 0x7fff_ffff), "l1_size"),
        ("tiny l1", |p| put32(p, 36, 0), "virtual size"),
        (
            "unaligned l1",
            |p| put64(p, 40, be64(p, 40) + 8),
            "l1_table_offset",
        ),
        ("l1 past end", |p| put64(p, 40, 1 << 40), "l1_table_offset"),
        (
            "unaligned refcount table",
            |p| put64(p, 48, 4096),
            "refcount_table_offset",
        ),
        (
            "huge refcount table",
            |p| put32(p, 56, 0x00ff_ffff),
            "refcount_table_clusters",
        ),
        ("odd header_length", |p| put32(p, 100, 105), "header_length"),
        (
            "short header_length",
            |p| put32(p, 100, 72),
            "header_length",
        ),
        (
            "huge header_length",
            |p| put32(p, 100, 0xffff_fff8),
            "header_length",
        ),
        (
            "unknown incompatible bit",
            |p| put64(p, 72, 1 << 20),
            "unknown feature bit 20",
        ),
        ("refcount_order 7", |p| put32(p, 96, 7), "refcount_order"),
        (
            "nb_snapshots",
            |p| put32(p, 60, 0xffff_ffff),
            "nb_snapshots",
        ),
        (
            "snapshots past end",
            |p| {
                put32(p, 60, 3);
                put64(p, 64, 1 << 40)
            },
            "snapshots_offset",
        ),
        (
            "extension length",
            |p| put32(p, 104 + 8 + 4, 0xffff_ffff),
            "header extension",
        ),
        (
            "backing name too long",
            |p| {
                put64(p, 8, 512);
                put32(p, 16, 2000)
            },
            "1023",
        ),
        (
            "backing name outside cluster",
            |p| {
                put64(p, 8, 65530);
                put32(p, 16, 100)
            },
            "first cluster",
        ),
        (
            "compression type",
            |p| put(p, 104, &[7]),
            "compression_type",
        ),
    ];
    for (name, patch, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        let img = base(dir.path(), "");
        patch(&img);
        eprintln!("case {name}");
        refused(dir.path(), &img, &["--read-only"], what);
    }
}

#[test]
fn bad_snapshot_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "");
    sh(dir.path(), "qemu-img snapshot -c s1 img.qcow2");
    let table = be64(&img, 64);
    put32(&img, table + 36, 0xffff);
    refused(dir.path(), &img, &["--read-only"], "extra data");
    put32(&img, table + 36, 16);
    put64(&img, table, 12345);
    refused(dir.path(), &img, &["--read-only"], "snapshot L1");
}

#[test]
fn backing_chain_problems_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::pattern_image(&d.join("base.raw"), MIB as usize, 1);
    // Missing backing file.
    sh(
        d,
        "qemu-img create -q -f qcow2 -b base.raw -F raw gone.qcow2 1M",
    );
    std::fs::rename(d.join("base.raw"), d.join("moved.raw")).unwrap();
    refused(d, &d.join("gone.qcow2"), &["--read-only"], "base.raw");
    std::fs::rename(d.join("moved.raw"), d.join("base.raw")).unwrap();

    // A loop: a -> b -> a.
    sh(
        d,
        "qemu-img create -q -f qcow2 -b base.raw -F raw b.qcow2 1M",
    );
    sh(
        d,
        "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 a.qcow2 1M",
    );
    sh(d, "qemu-img rebase -u -b a.qcow2 -F qcow2 b.qcow2");
    refused(d, &d.join("a.qcow2"), &["--read-only"], "loops");

    // No recorded backing format: never probed, refused with the fix.
    sh(
        d,
        "qemu-img create -q -f qcow2 -b base.raw -F raw nofmt.qcow2 1M",
    );
    let p = d.join("nofmt.qcow2");
    let head = std::fs::read(&p).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    put32(&p, at as u64, 0x0bad_0bad);
    refused(d, &p, &["--read-only"], "qemu-img rebase -u -F");

    // A backing format we do not serve.
    sh(
        d,
        "qemu-img create -q -u -f qcow2 -b base.raw -F vmdk vmdk.qcow2 1M",
    );
    refused(d, &d.join("vmdk.qcow2"), &["--read-only"], "vmdk");

    // A data file that is missing.
    sh(
        d,
        "qemu-img create -q -f qcow2 -o data_file=img.data df.qcow2 1M",
    );
    std::fs::remove_file(d.join("img.data")).unwrap();
    refused(d, &d.join("df.qcow2"), &["--read-only"], "img.data");
}

#[test]
fn luks_encrypted_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // qemu-img times its key derivation and sometimes fails to on a busy machine: retry.
    let made = (0..10).any(|_| {
        Command::new("qemu-img")
            .current_dir(dir.path())
            .args([
                "create",
                "-q",
                "--object",
                "secret,id=s0,data=pw",
                "-f",
                "qcow2",
            ])
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            ])
            .args(["enc.qcow2", "1M"])
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(made, "qemu-img could not make a LUKS image");
    refused(
        dir.path(),
        &dir.path().join("enc.qcow2"),
        &["--read-only"],
        "encrypted",
    );
}

#[test]
fn corrupt_images_are_read_only_and_dirty_ones_repaired() {
    for (bit, what) in [(1u64, "dirty"), (2, "corrupt")] {
        let dir = tempfile::tempdir().unwrap();
        let img = base(dir.path(), "");
        put64(&img, 72, bit);
        if what == "corrupt" {
            refused(dir.path(), &img, &[], what);
        }
        let d = Daemon::start(dir.path(), &img, &["--format", "qcow2", "--read-only"]);
        let mut c = Client::connect(d.path(), 1, true).unwrap();
        assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x5a; 4096]);
        drop(c);
        assert!(d.stop().success());
        assert_eq!(be64(&img, 72), bit, "a read-only open changed the header");
    }
    // A writable open of a dirty image repairs it first (as `qemu-img check -r all`).
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "");
    put64(&img, 72, 1);
    let d = Daemon::start(dir.path(), &img, &["--format", "qcow2"]);
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    assert_eq!(c.read(0, 8 * MIB, 4096).unwrap(), vec![0x6b; 4096]);
    drop(c);
    let log = d.log_text();
    assert!(d.stop().success());
    assert!(log.contains("not closed cleanly"), "{log}");
    assert_eq!(be64(&img, 72), 0);
    assert_eq!(common::qemu::qemu_check(&img), 0);
}

/// Serves `img` read-only and checks that `bad` reads fail while `good` reads still work.
fn bad_area(dir: &Path, img: &Path, bad: u64, good: &[(u64, u8)]) {
    let d = Daemon::start(dir, img, &["--format", "qcow2", "--read-only"]);
    let mut c = Client::connect(d.path(), 1, true).unwrap();
    for _ in 0..3 {
        assert_eq!(c.read(0, bad, 4096), Err(EIO), "{}", d.log_text());
        for &(off, byte) in good {
            assert_eq!(c.read(0, off, 4096).unwrap(), vec![byte; 4096]);
        }
    }
    drop(c);
    let log = d.log_text();
    assert!(d.stop().success());
    assert_eq!(
        log.matches("requests touching damaged areas").count(),
        1,
        "corruption reported once:\n{log}"
    );
}

#[test]
fn corrupt_entries_fail_only_their_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = [(0, 0x5a), (8 * MIB, 0x6b)];

    // An L2 entry pointing past the end of the file.
    let img = base(d, "");
    put64(&img, l2_entry_at(&img, 64 * 1024), (1 << 63) | (1 << 40));
    bad_area(d, &img, 64 * 1024, &good);

    // An unaligned L2 entry.
    let img = base(d, "");
    let at = l2_entry_at(&img, 128 * 1024);
    put64(&img, at, be64(&img, at) | 0x200);
    bad_area(d, &img, 128 * 1024, &good);

    // Extended L2: a subcluster both allocated and zero.
    let img = base(d, "extended_l2=on");
    let at = l2_entry_at(&img, 192 * 1024) + 8;
    put64(&img, at, be64(&img, at) | 1 << 32);
    bad_area(d, &img, 192 * 1024, &good);

    // An L1 entry pointing at an L2 table past the end of the file (second L1 entry of an
    // image with 512 KiB clusters... here: small clusters so 8 MiB needs another table).
    sh(
        d,
        "qemu-img create -q -f qcow2 -o cluster_size=4k l1.qcow2 16M",
    );
    qemu_io(
        d,
        "l1.qcow2",
        &["write -P 0x5a 0 256k".into(), "write -P 0x6b 8M 64k".into()],
    );
    let img = d.join("l1.qcow2");
    // 4 KiB clusters: one L2 table covers 2 MiB; point the table of 4-6 MiB past the end.
    qemu_io(d, "l1.qcow2", &["write -P 0x7c 4M 4k".into()]);
    put64(&img, be64(&img, 40) + 16, (1 << 63) | (1 << 40));
    bad_area(d, &img, 4 * MIB, &good);
}

#[test]
fn garbage_compressed_data_fails_that_cluster_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for opts in ["", "-o compression_type=zstd"] {
        common::pattern_image(&d.join("src.raw"), 4 * MIB as usize, 3);
        qemu_io_raw(
            d,
            "src.raw",
            &[
                "write -P 0x5a 0 64k",
                "write -P 0x6b 1M 64k",
                "write -P 0x7c 2M 64k",
            ],
        );
        sh(
            d,
            &format!("qemu-img convert -c -O qcow2 {opts} src.raw c.qcow2"),
        );
        let img = d.join("c.qcow2");
        let desc = be64(&img, l2_entry_at(&img, 2 * MIB));
        assert_ne!(desc & (1 << 62), 0, "cluster not compressed");
        let offset = desc & ((1 << 54) - 1);
        put(&img, offset, &[0xa5; 700]);
        bad_area(d, &img, 2 * MIB, &[(0, 0x5a), (MIB, 0x6b)]);
    }
}

fn qemu_io_raw(dir: &Path, image: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    common::qemu::qemu_io_fmt(dir, "raw", image, &cmds);
}

#[test]
fn metadata_counted_as_free_is_refused_for_writing() {
    // The L1 table's cluster with refcount 0: a writable open would hand it to guest data.
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "");
    let cluster_bits = be32(&img, 20);
    let l1_cluster = be64(&img, 40) >> cluster_bits;
    let block = be64(&img, be64(&img, 48)); // refcount table entry 0
    let refcount_bits = 1u64 << be32(&img, 96);
    assert_eq!(refcount_bits, 16);
    put(&img, block + 2 * l1_cluster, &[0, 0]);
    refused(
        dir.path(),
        &img,
        &[],
        &format!("metadata cluster {l1_cluster} has refcount 0"),
    );
    // Reading is still fine.
    let d = Daemon::start(dir.path(), &img, &["--format", "qcow2", "--read-only"]);
    let mut c = Client::connect(d.path(), 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x5a; 4096]);
}
