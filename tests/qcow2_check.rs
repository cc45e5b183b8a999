//! `check`, `info` and `create` against qemu-img: the same verdicts and counters on images QEMU
//! made, with and without injected leaks and corruptions; repairs that qemu-img then finds clean.

mod common;

use std::path::Path;
use std::process::Command;

use common::qemu::{qemu_check, qemu_io, qemu_raw, sh};
use common::{be64, put, BIN};

/// Runs a tool subcommand in `dir`; returns (exit code, stdout).
fn tool(dir: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// A field of a flat JSON object (numbers and booleans).
fn field(json: &str, name: &str) -> Option<u64> {
    let at = json.find(&format!("\"{name}\": "))? + name.len() + 4;
    json[at..]
        .split([',', '\n', '}'])
        .next()?
        .trim()
        .parse()
        .ok()
}

fn qemu_check_json(dir: &Path, img: &str) -> (i32, String) {
    let o = Command::new("qemu-img")
        .current_dir(dir)
        .args(["check", "--output=json", img])
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Our check and qemu-img's agree on the verdict and the counters.
fn agree(dir: &Path, img: &str) -> i32 {
    let (ours, ours_json) = tool(dir, &["check", "--output", "json", img]);
    let (theirs, theirs_json) = qemu_check_json(dir, img);
    assert_eq!(
        ours, theirs,
        "exit codes differ for {img}:\nours {ours_json}\nqemu {theirs_json}"
    );
    for f in [
        "leaks",
        "corruptions",
        "total-clusters",
        "allocated-clusters",
        "compressed-clusters",
    ] {
        assert_eq!(
            field(&ours_json, f).unwrap_or(0),
            field(&theirs_json, f).unwrap_or(0),
            "{f} differs for {img}:\nours {ours_json}\nqemu {theirs_json}"
        );
    }
    ours
}

/// File offset of the 16-bit refcount of `cluster` (refcount block 0 must cover it).
fn refcount_at(p: &Path, cluster: u64) -> u64 {
    let table = be64(p, 48);
    be64(p, table) + 2 * cluster
}

fn workload() -> Vec<String> {
    [
        "write -P 0x11 0 200k",
        "write -P 0x22 1000 3000",
        "write -z 300k 64k",
        "write -P 0x33 1M 512k",
        "discard 1M 128k",
        "write -c -P 0x44 4M 64k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn clean_images_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, opts) in [
        ("plain", ""),
        ("v2", "-o compat=0.10"),
        ("small", "-o cluster_size=512"),
        ("r1", "-o refcount_bits=1"),
        ("r64", "-o refcount_bits=64"),
        ("ext", "-o extended_l2=on"),
        ("zstd", "-o compression_type=zstd"),
        ("datafile", "-o data_file=datafile.data"),
    ] {
        let img = format!("{name}.qcow2");
        sh(d, &format!("qemu-img create -q -f qcow2 {opts} {img} 16M"));
        let mut w = workload();
        if name == "datafile" {
            w.pop();
        }
        qemu_io(d, &img, &w);
        assert_eq!(agree(d, &img), 0, "{name}");
    }
    // Snapshots and bitmaps add references of their own.
    sh(d, "qemu-img snapshot -c s1 plain.qcow2");
    qemu_io(d, "plain.qcow2", &["write -P 0x55 0 64k".into()]);
    sh(d, "qemu-img snapshot -c s2 plain.qcow2");
    sh(d, "qemu-img bitmap --add plain.qcow2 b0");
    assert_eq!(agree(d, "plain.qcow2"), 0);
    // Info agrees on the basics.
    let (code, info) = tool(d, &["info", "--output", "json", "ext.qcow2"]);
    assert_eq!(code, 0);
    assert_eq!(field(&info, "virtual-size"), Some(16 << 20));
    assert_eq!(field(&info, "cluster-size"), Some(65536));
    assert!(info.contains("\"extended-l2\": true"), "{info}");
    // A raw file is not something check works on (qemu-img's exit status 63).
    common::pattern_image(&d.join("r.raw"), 65536, 1);
    assert_eq!(tool(d, &["check", "r.raw"]).0, 63);
}

#[test]
fn leaks_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "qemu-img create -q -f qcow2 img.qcow2 16M");
    qemu_io(d, "img.qcow2", &workload());
    let img = d.join("img.qcow2");
    let before = qemu_raw(&img);
    let end = std::fs::metadata(&img).unwrap().len() / 65536;
    // Three clusters at the end of the file with refcount 1 and nothing pointing at them.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((end + 3) * 65536)
        .unwrap();
    for c in end..end + 3 {
        put(&img, refcount_at(&img, c), &1u16.to_be_bytes());
    }
    assert_eq!(agree(d, "img.qcow2"), 3);
    let (_, json) = tool(d, &["check", "--output", "json", "img.qcow2"]);
    assert_eq!(field(&json, "leaks"), Some(3));
    assert_eq!(tool(d, &["check", "--repair", "leaks", "img.qcow2"]).0, 0);
    assert_eq!(qemu_check(&img), 0);
    assert!(qemu_raw(&img) == before);
}

#[test]
fn corruptions_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "qemu-img create -q -f qcow2 img.qcow2 16M");
    qemu_io(d, "img.qcow2", &workload());
    let img = d.join("img.qcow2");
    let before = qemu_raw(&img);
    // A data cluster whose refcount is zero, one whose refcount is 2 (COPIED now wrong), and an
    // L2 entry whose COPIED flag was cleared.
    let l2 = be64(&img, be64(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    let e0 = be64(&img, l2);
    let e1 = be64(&img, l2 + 8);
    let e2 = be64(&img, l2 + 16);
    put(
        &img,
        refcount_at(&img, (e0 & 0x00ff_ffff_ffff_fe00) / 65536),
        &0u16.to_be_bytes(),
    );
    put(
        &img,
        refcount_at(&img, (e1 & 0x00ff_ffff_ffff_fe00) / 65536),
        &2u16.to_be_bytes(),
    );
    put(&img, l2 + 16, &(e2 & !(1 << 63)).to_be_bytes());
    assert_eq!(agree(d, "img.qcow2"), 2);
    // Leak repair alone leaves the corruption.
    assert_eq!(tool(d, &["check", "--repair", "leaks", "img.qcow2"]).0, 2);
    let (code, out) = tool(d, &["check", "--repair", "all", "img.qcow2"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(qemu_check(&img), 0);
    assert!(qemu_raw(&img) == before);
}

#[test]
fn broken_refcount_table_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "qemu-img create -q -f qcow2 img.qcow2 16M");
    qemu_io(d, "img.qcow2", &workload());
    let img = d.join("img.qcow2");
    let before = qemu_raw(&img);
    let table = be64(&img, 48);
    put(&img, table, &(be64(&img, table) + 512).to_be_bytes());
    // Both say the check could not complete (exit 1).
    assert_eq!(tool(d, &["check", "img.qcow2"]).0, 1);
    assert_eq!(qemu_check(&img), 1);
    let (code, out) = tool(d, &["check", "--repair", "all", "img.qcow2"]);
    assert_eq!(code, 0, "{out}");
    // The old structures are no longer referenced: qemu-img sees at most leaks, and a leak
    // repair by us leaves it clean.
    let q = qemu_check(&img);
    assert!(q == 0 || q == 3, "qemu-img check {q}");
    assert_eq!(tool(d, &["check", "--repair", "leaks", "img.qcow2"]).0, 0);
    assert_eq!(qemu_check(&img), 0);
    assert!(qemu_raw(&img) == before);
}

#[test]
fn created_images_pass_qemu_check_and_open_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::pattern_image(&d.join("base.raw"), 4 << 20, 9);
    for (name, args) in [
        ("a.qcow2", vec!["1G"]),
        (
            "b.qcow2",
            vec![
                "100M",
                "--extended-l2",
                "--cluster-size",
                "16K",
                "--lazy-refcounts",
            ],
        ),
        ("c.qcow2", vec!["3G", "--cluster-size", "512"]),
        (
            "d.qcow2",
            vec!["8M", "--backing", "base.raw", "--backing-format", "raw"],
        ),
        ("e.qcow2", vec!["64M", "--cluster-size", "2M"]),
    ] {
        let mut a = vec!["create", name];
        a.extend(args);
        let (code, out) = tool(d, &a);
        assert_eq!(code, 0, "{name}: {out}");
        assert_eq!(qemu_check(&d.join(name)), 0, "{name}");
        // QEMU writes to it and still finds it clean.
        qemu_io(
            d,
            name,
            &["write -P 0x66 100k 300k".into(), "write -z 1M 64k".into()],
        );
        assert_eq!(
            qemu_check(&d.join(name)),
            0,
            "{name} after QEMU wrote to it"
        );
    }
    let raw = qemu_raw(&d.join("d.qcow2"));
    let base = std::fs::read(d.join("base.raw")).unwrap();
    assert!(raw[..100 << 10] == base[..100 << 10]);
    assert!(raw[4 << 20..].iter().all(|&b| b == 0));
    // Bad options are refused.
    assert_eq!(
        tool(d, &["create", "x.qcow2", "1G", "--cluster-size", "1000"]).0,
        1
    );
    assert_eq!(
        tool(
            d,
            &[
                "create",
                "x.qcow2",
                "1G",
                "--extended-l2",
                "--cluster-size",
                "4K"
            ]
        )
        .0,
        1
    );
    assert_eq!(
        tool(d, &["create", "a.qcow2", "1G"]).0,
        1,
        "overwrote an existing file"
    );
    assert_eq!(
        tool(
            d,
            &[
                "create",
                "x.qcow2",
                "1G",
                "--backing",
                "missing.raw",
                "--backing-format",
                "raw"
            ]
        )
        .0,
        1
    );
}
