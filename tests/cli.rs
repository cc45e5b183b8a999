//! The command line as users and VMM managers meet it: capabilities, help, errors on one line,
//! format refusals, signals and inherited sockets.

mod common;

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pattern_image, signal, wait_timeout, Client, Daemon, BIN};

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn print_capabilities() {
    let o = run(&["--print-capabilities"]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim_end(),
        r#"{"type":"block","features":["read-only","blk-file"]}"#
    );
    // Other options are ignored, as the vhost-user conventions ask.
    assert!(run(&["--print-capabilities", "--num-queues", "0"])
        .status
        .success());
}

#[test]
fn help_lists_every_flag() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    for flag in [
        "--socket-path",
        "--fd",
        "--blk-file",
        "--format",
        "--read-only",
        "--num-queues",
        "--queue-size",
        "--cache",
        "--aio",
        "--serial",
        "--logical-block-size",
        "--discard",
        "--print-capabilities",
        "--l2-cache-size",
        "--lazy-refcounts",
        "info",
        "check",
        "create",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn bad_arguments_give_one_line_and_exit_2() {
    for args in [
        &["--bogus"][..],
        &["--socket-path", "/tmp/x.sock"],
        &["--blk-file", "/tmp/x.img"],
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--fd",
            "3",
            "--blk-file",
            "x",
        ],
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--blk-file",
            "x",
            "--num-queues",
            "0",
        ],
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--blk-file",
            "x",
            "--cache",
            "unsafe",
        ],
        &[
            "--socket-path",
            "/tmp/x.sock",
            "--blk-file",
            "x",
            "--queue-size",
            "100",
        ],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(lines[0].starts_with("vhost-device-blk: "), "{lines:?}");
    }
}

#[test]
fn image_problems_give_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let o = run(&[
        "--socket-path",
        sock,
        "--blk-file",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("missing.img") && lines[0].contains("No such file"),
        "{lines:?}"
    );

    let o = run(&[
        "--socket-path",
        sock,
        "--blk-file",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));

    // A qcow2 header with nothing valid behind it: refused naming the field, whether the format
    // is given or probed.
    let q = dir.path().join("x.qcow2");
    let mut head = vec![0u8; 65536];
    head[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    std::fs::write(&q, &head).unwrap();
    for args in [&["--format", "qcow2"][..], &[]] {
        let o = Command::new(BIN)
            .args(["--socket-path", sock, "--blk-file", q.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("cluster_bits 0"), "{lines:?}");
    }

    // Another format is refused when probed, served as bytes when --format raw says so.
    let v = dir.path().join("x.vmdk");
    let mut head = vec![0u8; 65536];
    head[..4].copy_from_slice(b"KDMV");
    std::fs::write(&v, &head).unwrap();
    let o = run(&["--socket-path", sock, "--blk-file", v.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_lines(&o)[0].contains("VMDK"));
    let d = Daemon::start(dir.path(), &v, &["--format", "raw"]);
    assert!(d.stop().success());

    // Something that is not a socket at --socket-path is never removed.
    let img = dir.path().join("disk.raw");
    pattern_image(&img, 1 << 20, 1);
    let o = run(&[
        "--socket-path",
        img.to_str().unwrap(),
        "--blk-file",
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(img.exists());
}

#[test]
fn sigterm_and_sigint_exit_promptly_idle_and_connected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    pattern_image(&img, 1 << 20, 2);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // Idle.
        let mut d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
        let t = Instant::now();
        signal(&d.child, sig);
        let status = wait_timeout(&mut d.child, Duration::from_secs(5)).expect("no exit");
        assert!(status.success());
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(!d.socket.exists(), "socket left behind");

        // With a front-end connected and I/O in flight.
        let mut d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
        let mut c = Client::connect(d.path(), 1, false).unwrap();
        if let Err(e) = c.write(0, 0, &[7; 4096]) {
            panic!("write failed ({e}):\n{}", d.log_text());
        }
        let p = c.ptr(0);
        c.queues[0].read(0, p, 1 << 20, 1, blkio::ReqFlags::empty());
        signal(&d.child, sig);
        let status = wait_timeout(&mut d.child, Duration::from_secs(5)).expect("no exit");
        assert!(status.success(), "{}", d.log_text());
        drop(c);
        // The acknowledged write was flushed on the way out.
        assert_eq!(common::file_range(&img, 0, 4096), vec![7; 4096]);
    }
}

/// The daemon command with `fd` passed as descriptor 3 and `--fd 3`.
fn with_fd3(fd: i32, img: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--format", "raw", "--blk-file"])
        .arg(img);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps FD_CLOEXEC: clear it explicitly.
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn inherited_listening_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern_image(&img, 1 << 20, 3);
    let sock = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = with_fd3(listener.as_raw_fd(), &img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let mut c = loop {
        match Client::connect(sock.to_str().unwrap(), 1, false) {
            Ok(c) => break c,
            Err(_) if child.try_wait().unwrap().is_none() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert!(c.read(0, 0, 4096).unwrap() == data[..4096]);
    drop(c);
    signal(&child, libc::SIGTERM);
    assert!(wait_timeout(&mut child, Duration::from_secs(5))
        .unwrap()
        .success());

    // Descriptors that are not listening sockets are refused.
    let o = run(&["--fd", "0", "--blk-file", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let f = std::fs::File::open(&img).unwrap();
    let o = with_fd3(f.as_raw_fd(), &img).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a socket"));
}
