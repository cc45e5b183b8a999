//! Logging: at the default level (info) one line per host-side event, in order; RUST_LOG
//! chooses the level.

mod common;

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern_image, signal, wait_timeout, Client, BIN};

/// Runs the daemon with `rust_log` (None: unset) through one connection and SIGTERM; returns
/// its stderr.
fn session(rust_log: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    pattern_image(&img, 1 << 20, 8);
    let sock = dir.path().join("log.sock");
    let log = dir.path().join("log.txt");
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .args(["--format", "raw"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(sock.to_str().unwrap(), 1, false).unwrap();
    c.read(0, 0, 4096).unwrap();
    drop(c);
    // The disconnect is logged before the next front-end is awaited; a second connection
    // orders it before the signal.
    let c = Client::connect(sock.to_str().unwrap(), 1, false).unwrap();
    drop(c);
    signal(&child, libc::SIGTERM);
    assert!(wait_timeout(&mut child, Duration::from_secs(10))
        .unwrap()
        .success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn default_level_logs_each_host_event_once_in_order() {
    let log = session(None);
    let events = [
        "raw image, 1048576 bytes",
        "ready for a front-end on ",
        "front-end connected",
        "front-end disconnected",
        "SIGTERM",
        "image written back; stopped",
    ];
    let mut at = 0;
    for e in events {
        let found = log[at..]
            .find(e)
            .unwrap_or_else(|| panic!("{e:?} missing or out of order:\n{log}"));
        at += found + e.len();
    }
    // The connection's session thread may log the features before "front-end connected"
    // (which is logged once the session has started): only require them inside the session.
    let ready = log.find("ready for a front-end").unwrap();
    let features = log.find("front-end features ").expect("no features line");
    let gone = log.find("front-end disconnected").unwrap();
    assert!(ready < features && features < gone, "{log}");
    assert!(log.contains(" INFO "), "{log}");
    assert!(!log.contains(" DEBUG "), "{log}");
    // The features line names what was negotiated, once per change.
    let features: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("front-end features"))
        .collect();
    assert!(features.iter().any(|l| l.contains("VERSION_1")), "{log}");
    assert!(features.len() <= 4, "{log}");
}

#[test]
fn rust_log_chooses_the_level() {
    assert_eq!(session(Some("warn")), "");
    let debug = session(Some("debug"));
    assert!(debug.contains(" DEBUG "), "{debug}");
}
