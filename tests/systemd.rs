//! contrib/systemd: the service's own command line runs under systemd-socket-activate (the
//! socket handed over as descriptor 3, as the socket unit does), and the units pass
//! `systemd-analyze verify` and keep a low `systemd-analyze security` exposure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern_image, signal, wait_timeout, Client, BIN};

const INSTALLED_BIN: &str = "/usr/libexec/vhost-device-blk";

fn unit(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The value of the one `key=` line of a unit.
fn key(text: &str, key: &str) -> String {
    let v: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(v.len(), 1, "{key}= lines: {v:?}");
    v[0].to_owned()
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = common::guest::which(name);
    if found.is_none() {
        eprintln!("SKIPPED: {name} not installed (Debian package systemd)");
    }
    found
}

/// The service's ExecStart= with the environment file's variables expanded, as systemd would.
fn exec_start(blk_file: &Path, args: &str) -> Vec<String> {
    let line = key(&unit("vhost-device-blk@.service"), "ExecStart");
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        match word {
            INSTALLED_BIN => argv.push(BIN.to_owned()),
            "${BLK_FILE}" => argv.push(blk_file.to_str().unwrap().to_owned()),
            // `$VAR` (unbraced) splits the value into words.
            "$VHOST_DEVICE_BLK_ARGS" => argv.extend(args.split_whitespace().map(String::from)),
            w => {
                assert!(!w.contains('$'), "unknown variable in ExecStart: {w}");
                argv.push(w.to_owned());
            }
        }
    }
    argv
}

#[test]
fn service_command_line_serves_io_under_socket_activation() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    // The socket unit and the service agree on the socket and the descriptor.
    let socket_unit = unit("vhost-device-blk@.socket");
    assert_eq!(
        key(&socket_unit, "ListenStream"),
        "/run/vhost-device-blk/%i.sock"
    );
    assert_eq!(key(&socket_unit, "Accept"), "no");
    let argv = exec_start(Path::new("IMAGE"), "--format raw");
    assert_eq!(argv[0], BIN);
    assert!(argv.windows(2).any(|w| w == ["--fd", "3"]), "{argv:?}");

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.raw");
    let data = pattern_image(&img, 4 << 20, 11);
    let sock = dir.path().join("disk0.sock");
    let argv = exec_start(&img, "--format raw --num-queues 2");
    // Without --accept it listens, and on the first connection execs the daemon with the
    // listening socket as descriptor 3 and LISTEN_FDS=1, like the socket unit.
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&sock)
        .args(["-E", "RUST_LOG=info", "--"])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "activator exited");
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(sock.to_str().unwrap(), 2, false).unwrap();
    assert!(c.read(1, 4096, 8192).unwrap() == data[4096..4096 + 8192]);
    c.write(0, 0, &[0xa5; 4096]).unwrap();
    c.flush(0).unwrap();
    drop(c);
    // The daemon keeps the socket for the next front-end (a VMM reconnecting).
    let mut c = Client::connect(sock.to_str().unwrap(), 1, false).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0xa5; 4096]);
    drop(c);
    signal(&child, libc::SIGTERM);
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("no exit on SIGTERM");
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("front-end connected"), "{log}");
    assert_eq!(common::file_range(&img, 0, 4096), vec![0xa5; 4096]);
}

/// Copies of the units that point at the freshly built binary (verify insists that ExecStart
/// exists).
fn units_for_verify(dir: &Path) {
    for name in ["vhost-device-blk@.socket", "vhost-device-blk@.service"] {
        let text = unit(name).replace(INSTALLED_BIN, BIN);
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn units_pass_systemd_analyze() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    units_for_verify(dir.path());
    let o = Command::new(&analyze)
        .current_dir(dir.path())
        .args(["verify", "--man=no"])
        .arg(dir.path().join("vhost-device-blk@disk0.socket"))
        .arg(dir.path().join("vhost-device-blk@disk0.service"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    // Unknown keys and bad values are only warnings: any output is a failure.
    assert!(o.status.success() && text.trim().is_empty(), "{text}");

    // The sandbox stays tight: exposure at most 2.0 of 10 ("OK").
    let o = Command::new(&analyze)
        .current_dir(dir.path())
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(dir.path().join("vhost-device-blk@disk0.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("Overall exposure level"),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
