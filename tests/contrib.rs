//! contrib/: the cloud-hypervisor script runs end to end with a stand-in VMM (cloud-hypervisor
//! itself is not installable here), and contrib/README.md lists every file.

mod common;

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn cloud_hypervisor_script_starts_and_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::pattern_image(&img, 1 << 20, 5);
    let sock = dir.path().join("ch.sock");
    let log = dir.path().join("daemon.log");
    // `echo` stands in for cloud-hypervisor: prints the command line it got and exits 0.
    let o = Command::new(root().join("contrib/cloud-hypervisor/vhost-user-blk-vm.sh"))
        .args(["--daemon", common::BIN, "--ch", "echo", "--format", "raw"])
        .args(["--queues", "2", "--memory", "512M", "--boot-disk", "os.img"])
        .arg("--socket")
        .arg(&sock)
        .arg("--daemon-log")
        .arg(&log)
        .arg(&img)
        .args(["--", "--kernel", "vmlinux"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        o.status.success(),
        "{}{log}",
        String::from_utf8_lossy(&o.stderr)
    );
    let argv = String::from_utf8_lossy(&o.stdout);
    let want = format!(
        "--memory size=512M,shared=on --disk path=os.img vhost_user=true,socket={},num_queues=2,queue_size=128 --kernel vmlinux",
        sock.display()
    );
    assert_eq!(argv.trim(), want);
    // The daemon ran on that socket and stopped cleanly (SIGTERM), removing it.
    assert!(
        log.contains("ready for a front-end") && log.contains("SIGTERM"),
        "{log}"
    );
    assert!(!sock.exists());
}

#[test]
fn readme_lists_everything_in_contrib() {
    let readme = std::fs::read_to_string(root().join("contrib/README.md")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root().join("contrib")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "README.md" {
            continue;
        }
        // Tools with their own crate are listed as a directory; the rest file by file.
        let own_crate = entry.path().join("Cargo.toml").exists();
        if entry.path().is_dir() && !own_crate {
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = format!("{name}/{}", f.unwrap().file_name().into_string().unwrap());
                if !readme.contains(&format!("`{f}`")) {
                    missing.push(f);
                }
            }
        } else if !readme.contains(&format!("`{name}/`")) && !readme.contains(&format!("`{name}`"))
        {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "contrib/README.md does not list {missing:?}"
    );
}
