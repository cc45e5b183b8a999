//! Image locking against real QEMU 7.2 peers: qemu-img, qemu-io, qemu-storage-daemon and
//! qemu-system-x86_64 see the daemon's locks exactly as they see a running QEMU's, and the
//! daemon refuses images they hold.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::qemu::sh;
use common::{Client, Daemon, BIN};

/// Lock bytes `pid` holds on `path`, sorted, from /proc/PID/fdinfo (OFD locks have no pid in
/// /proc/locks).
fn lock_bytes(path: &Path, pid: u32) -> Vec<u64> {
    let want = std::fs::metadata(path).unwrap();
    let mut v = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return v;
    };
    for fd in fds.flatten() {
        let Ok(m) = std::fs::metadata(fd.path()) else {
            continue;
        };
        if m.dev() != want.dev() || m.ino() != want.ino() {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_str().unwrap()
        ))
        .unwrap_or_default();
        for line in info.lines().filter_map(|l| l.strip_prefix("lock:")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f[1], "OFDLCK", "not an OFD lock: {line}");
            assert_eq!(f[3], "READ", "not a shared lock: {line}");
            let (s, e): (u64, u64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
            v.extend(s..=e);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Polls until `child` holds exactly `expected` on `path` (a peer that locks while starting).
fn wait_for_locks(path: &Path, child: &mut Child, expected: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = lock_bytes(path, child.id());
        if v == expected {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("peer exited ({st}) before locking {}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {v:?} on {}, expected {expected:?}",
            child.id(),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until QEMU's main loop runs (QMP commands are dispatched from it): machine and
/// devices are set up, permissions taken.
fn wait_for_qmp(sock: &Path, child: &mut Child) {
    use std::io::{BufRead, BufReader, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            break s;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("qemu exited ({st})");
        }
        assert!(Instant::now() < deadline, "no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    stream
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut returns = 0;
    while returns < 2 {
        let line = lines.next().expect("QMP closed").unwrap();
        if line.contains("\"return\"") {
            returns += 1;
        }
    }
}

fn run(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Asserts that a qemu tool failed with QEMU's lock message.
fn refused(o: &Output, what: &str) {
    let t = text(o);
    assert!(
        !o.status.success() && t.contains(what) && t.contains("Is another process using the image"),
        "expected a lock refusal ({what}), got {}: {t}",
        o.status
    );
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

/// Our daemon with `args` on `image`, expected to refuse it: exit status and message.
fn daemon_refuses(dir: &Path, image: &Path, args: &[&str]) -> String {
    let o = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.join("refused.sock"))
        .arg("--blk-file")
        .arg(image)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "daemon should refuse: {t}");
    assert!(!dir.join("refused.sock").exists());
    assert!(t.contains(image.to_str().unwrap()), "no image path: {t}");
    t
}

/// `qemu-io` kept alive (its stdin stays open) on an image: holds it as QEMU does.
struct QemuIo(Child);

impl QemuIo {
    fn hold(dir: &Path, args: &[&str], image: &Path, expected: &[u64]) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .current_dir(dir)
            .args(args)
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        wait_for_locks(image, &mut child, expected);
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn writable_raw_is_locked_like_a_qemu_guest() {
    // The O_DIRECT descriptor carries the locks as well as the buffered one.
    for cache in ["writeback", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let img = p.join("disk.raw");
        sh(p, "qemu-img create -f raw disk.raw 4M");
        let d = Daemon::start(p, &img, &["--format", "raw", "--cache", cache]);
        assert_eq!(lock_bytes(&img, d.child.id()), [100, 101, 201], "{cache}");
        // Writers are refused; raw images stay readable for qemu-img info, as with QEMU.
        let write = ["-f", "raw", "-c", "write 0 4k", "disk.raw"];
        refused(&run(p, "qemu-io", &write), "Failed to get \"write\" lock");
        ok(&run(p, "qemu-img", &["info", "disk.raw"]));
        // The guest still writes, and reconnects keep the locks.
        for _ in 0..2 {
            let mut c = Client::connect(d.path(), 1, false).unwrap();
            c.write(0, 0, &[0x5a; 4096]).unwrap();
            c.flush(0).unwrap();
        }
        assert_eq!(lock_bytes(&img, d.child.id()), [100, 101, 201], "{cache}");
        assert!(d.stop().success());
        // Locks go with the daemon.
        ok(&run(p, "qemu-io", &write));
    }
}

#[test]
fn writable_qcow2_and_its_backing_file_are_locked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f raw base.raw 4M");
    sh(p, "qemu-img create -f qcow2 -b base.raw -F raw top.qcow2");
    let top = p.join("top.qcow2");
    let base = p.join("base.raw");
    let d = Daemon::start(p, &top, &["--format", "qcow2"]);
    assert_eq!(lock_bytes(&top, d.child.id()), [100, 101, 103, 201, 203]);
    assert_eq!(lock_bytes(&base, d.child.id()), [100, 201, 203]);

    refused(
        &run(p, "qemu-img", &["info", "top.qcow2"]),
        "Failed to get shared \"write\" lock",
    );
    refused(
        &run(p, "qemu-img", &["check", "top.qcow2"]),
        "Failed to get shared \"write\" lock",
    );
    refused(
        &run(p, "qemu-io", &["-c", "write 0 4k", "top.qcow2"]),
        "lock",
    );
    let info = run(p, "qemu-img", &["info", "-U", "top.qcow2"]);
    ok(&info);
    assert!(text(&info).contains("file format: qcow2"));
    // The backing file may be read but not written.
    ok(&run(p, "qemu-img", &["info", "base.raw"]));
    refused(
        &run(p, "qemu-io", &["-f", "raw", "-c", "write 0 4k", "base.raw"]),
        "Failed to get \"write\" lock",
    );
    // Another overlay on the same base: both VMs run (QEMU's rule for shared bases).
    sh(p, "qemu-img create -f qcow2 -b base.raw -F raw top2.qcow2");
    let dir2 = tempfile::tempdir().unwrap();
    let d2 = Daemon::start(dir2.path(), &p.join("top2.qcow2"), &["--format", "qcow2"]);
    assert!(d2.stop().success());
    assert!(d.stop().success());
    ok(&run(p, "qemu-img", &["check", "top.qcow2"]));
}

#[test]
fn read_only_daemon_lets_readers_in_and_keeps_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f qcow2 ro.qcow2 4M");
    let img = p.join("ro.qcow2");
    let d = Daemon::start(p, &img, &["--format", "qcow2", "--read-only"]);
    assert_eq!(lock_bytes(&img, d.child.id()), [100, 201, 203]);
    ok(&run(p, "qemu-img", &["info", "ro.qcow2"]));
    ok(&run(p, "qemu-img", &["check", "ro.qcow2"]));
    ok(&run(p, "qemu-io", &["-r", "-c", "read 0 4k", "ro.qcow2"]));
    // A read-only QEMU device without share-rw does not share "write" either.
    refused(
        &run(p, "qemu-io", &["-c", "write 0 4k", "ro.qcow2"]),
        "Failed to get \"write\" lock",
    );
    // Two read-only daemons on one image.
    let dir2 = tempfile::tempdir().unwrap();
    let d2 = Daemon::start(dir2.path(), &img, &["--format", "qcow2", "--read-only"]);
    let mut c = Client::connect(d2.path(), 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0; 4096]);
    drop(c);
    assert!(d2.stop().success());
    assert!(d.stop().success());
}

#[test]
fn daemon_refuses_an_image_qemu_io_holds_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f qcow2 held.qcow2 4M");
    let img = p.join("held.qcow2");
    let peer = QemuIo::hold(p, &["-f", "qcow2"], &img, &[100, 101, 103, 201, 203]);
    let pid = peer.0.id();
    // qemu-io refuses to share "write" (which a writable daemon needs) and holds it (which
    // any daemon refuses to share); QEMU checks the first first.
    for (args, what) in [
        (&["--format", "qcow2"][..], "Failed to get \"write\" lock"),
        (
            &["--format", "qcow2", "--read-only"],
            "Failed to get shared \"write\" lock",
        ),
    ] {
        let t = daemon_refuses(p, &img, args);
        assert!(
            t.contains(what) && t.contains(&format!("process {pid} (qemu-io)")),
            "{args:?}: {t}"
        );
    }
    // Not even an explicit --locking on helps; --locking off serves it anyway.
    daemon_refuses(p, &img, &["--format", "qcow2", "--locking", "on"]);
    let d = Daemon::start(
        p,
        &img,
        &["--format", "qcow2", "--read-only", "--locking", "off"],
    );
    assert_eq!(lock_bytes(&img, d.child.id()), Vec::<u64>::new());
    assert!(d.stop().success());
    drop(peer);
    let d = Daemon::start(p, &img, &["--format", "qcow2"]);
    assert!(d.stop().success());
}

#[test]
fn daemon_refuses_an_image_qemu_storage_daemon_exports_writable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f raw exp.raw 4M");
    let img = p.join("exp.raw");
    let mut qsd = Command::new("qemu-storage-daemon")
        .current_dir(p)
        .args([
            "--blockdev",
            "driver=file,filename=exp.raw,node-name=file0",
            "--blockdev",
            "driver=raw,file=file0,node-name=disk0",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path=qsd.sock",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    // An export shares every permission but holds "write".
    wait_for_locks(&img, &mut qsd, &[100, 101]);
    let t = daemon_refuses(p, &img, &["--format", "raw"]);
    assert!(
        t.contains("Failed to get shared \"write\" lock")
            && t.contains(&format!("process {} (qemu-storage-d", qsd.id())),
        "{t}"
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
    let d = Daemon::start(p, &img, &["--format", "raw"]);
    assert!(d.stop().success());
}

#[test]
fn locking_off_takes_no_locks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f qcow2 off.qcow2 4M");
    let img = p.join("off.qcow2");
    let d = Daemon::start(p, &img, &["--format", "qcow2", "--locking", "off"]);
    assert_eq!(lock_bytes(&img, d.child.id()), Vec::<u64>::new());
    ok(&run(p, "qemu-img", &["info", "off.qcow2"]));
    assert!(d.stop().success());
}

/// The same bytes as a paused QEMU with a virtio-blk device on the same images.
#[test]
fn same_lock_bytes_as_qemu_system() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f qcow2 base.qcow2 4M");
    sh(
        p,
        "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
    );
    sh(p, "qemu-img create -f raw plain.raw 4M");
    let cases = [
        ("top.qcow2", "qcow2", false),
        ("top.qcow2", "qcow2", true),
        ("plain.raw", "raw", false),
        ("plain.raw", "raw", true),
    ];
    for (name, fmt, ro) in cases {
        let img = p.join(name);
        let files = [img.clone(), p.join("base.qcow2")];
        let files = if fmt == "qcow2" {
            &files[..]
        } else {
            &files[..1]
        };
        let ro_opt = if ro { "on" } else { "off" };
        let qmp = p.join(format!("qmp-{fmt}-{ro}.sock"));
        let mut qemu = Command::new("qemu-system-x86_64")
            .current_dir(p)
            .args(["-S", "-display", "none", "-accel", "tcg", "-nodefaults"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={name},node-name=f0,read-only={ro_opt}"
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver={fmt},file=f0,node-name=d0,read-only={ro_opt}"
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        wait_for_qmp(&qmp, &mut qemu);
        let theirs: Vec<Vec<u64>> = files.iter().map(|f| lock_bytes(f, qemu.id())).collect();
        let _ = qemu.kill();
        let _ = qemu.wait();

        let mut args = vec!["--format", fmt];
        if ro {
            args.push("--read-only");
        }
        let d = Daemon::start(p, &img, &args);
        let ours: Vec<Vec<u64>> = files.iter().map(|f| lock_bytes(f, d.child.id())).collect();
        assert!(d.stop().success());
        assert_eq!(ours, theirs, "{name} read-only={ro}");
    }
}

/// The image tools take qemu-img's locks: no `check --repair` behind a running daemon's back.
#[test]
fn tools_respect_locks_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    sh(p, "qemu-img create -f qcow2 t.qcow2 4M");
    let img = p.join("t.qcow2");
    let tool = |args: &[&str]| run(p, BIN, args);
    let d = Daemon::start(p, &img, &["--format", "qcow2"]);
    for args in [
        &["info", "t.qcow2"][..],
        &["check", "t.qcow2"],
        &["check", "--repair", "all", "t.qcow2"],
    ] {
        let o = tool(args);
        let t = text(&o);
        assert!(
            o.status.code() == Some(1)
                && t.contains("\"write\" lock")
                && t.contains(&format!("process {} (vhost-device-b", d.child.id())),
            "{args:?}: {t}"
        );
    }
    ok(&tool(&["info", "-U", "t.qcow2"]));
    ok(&tool(&["check", "--force-share", "t.qcow2"]));
    assert!(d.stop().success());
    ok(&tool(&["check", "--repair", "all", "t.qcow2"]));
    // And a writable daemon cannot start while our check holds the image: qemu-io stands in
    // for a long check here, our tools being too quick to catch.
    let peer = QemuIo::hold(p, &["-r", "-f", "qcow2"], &img, &[100, 201, 203]);
    ok(&tool(&["info", "t.qcow2"]));
    daemon_refuses(p, &img, &["--format", "qcow2"]);
    drop(peer);
}
