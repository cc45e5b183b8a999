//! A real Linux guest on the daemon, booted by contrib/qemu/vhost-user-blk-vm.sh: QEMU (TCG)
//! with vhost-user-blk-pci, two queues. Inside, the guest makes an ext4 file system, writes
//! files, checks it, remounts and verifies checksums, trims; the host then checks the image
//! file with e2fsck and compares file contents.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::guest::GuestKit;
use common::wait_timeout;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "GUEST-RESULT: FAIL $*"; poweroff -f; }
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
echo "GUEST-QUEUES $(ls /sys/block/vda/mq | wc -l)"
echo "GUEST-SERIAL $(cat /sys/block/vda/serial)"
echo "GUEST-SIZE $(cat /sys/block/vda/size)"
mkfs.ext4 -q -F /dev/vda || fail mkfs
mount -t ext4 /dev/vda /mnt || fail mount
dd if=/dev/urandom of=/mnt/big bs=1M count=12 2>/dev/null || fail dd
mkdir /mnt/small
n=0
while [ $n -lt 50 ]; do dd if=/dev/urandom of=/mnt/small/f$n bs=1k count=$((n % 9 + 1)) 2>/dev/null; n=$((n+1)); done
dd if=/dev/urandom of=/mnt/doomed bs=1M count=8 2>/dev/null
sync
rm /mnt/doomed
(cd /mnt && sha256sum big small/*) > /tmp/sums
echo "GUEST-SUM $(sha256sum /mnt/big)"
umount /mnt || fail umount
e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail e2fsck; }
mount -t ext4 /dev/vda /mnt || fail remount
(cd /mnt && sha256sum -c /tmp/sums > /dev/null) || fail checksums
fstrim -v /mnt || fail fstrim
umount /mnt || fail umount2
echo "GUEST-RESULT: PASS"
poweroff -f
"#;

#[test]
fn linux_guest_makes_checks_and_remounts_ext4() {
    run_guest(false);
}

#[test]
fn linux_guest_on_a_qcow2_image_with_subclusters() {
    run_guest(true);
}

fn run_guest(qcow2: bool) {
    if std::env::var_os("VHOST_BLK_SKIP_GUEST").is_some() {
        eprintln!("VHOST_BLK_SKIP_GUEST set: guest test skipped");
        return;
    }
    let kit = GuestKit::find();
    let dir = tempfile::tempdir().unwrap();
    let (img, format) = if qcow2 {
        let img = dir.path().join("disk.qcow2");
        let st = Command::new(common::BIN)
            .args(["create", img.to_str().unwrap(), "128M", "--extended-l2"])
            .args(["--cluster-size", "128K"])
            .status()
            .unwrap();
        assert!(st.success());
        (img, "qcow2")
    } else {
        let img = dir.path().join("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        (img, "raw")
    };
    let initrd = dir.path().join("initrd.cpio");
    kit.initramfs(INIT, &initrd);

    // contrib/qemu/vhost-user-blk-vm.sh is the one QEMU command line: it starts the daemon,
    // QEMU with memfd shared memory and the vhost-user-blk-pci device, and stops the daemon
    // (SIGTERM, clean exit required) when the guest powers off.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/qemu/vhost-user-blk-vm.sh");
    let console = dir.path().join("console.log");
    let daemon_log = dir.path().join("daemon.log");
    let mut vm = Command::new(&script)
        .args(["--daemon", common::BIN, "--format", format, "--queues", "2"])
        .args(["--memory", "512M", "--accel", "tcg"])
        .args(["--daemon-arg", "--serial", "--daemon-arg", "guest-disk-7"])
        .arg("--socket")
        .arg(dir.path().join("vub.sock"))
        .arg("--daemon-log")
        .arg(&daemon_log)
        .arg(&img)
        .arg("--")
        .args(["-smp", "2", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .env("RUST_LOG", "debug")
        .process_group(0)
        .spawn()
        .expect("contrib/qemu/vhost-user-blk-vm.sh");
    let status = wait_timeout(&mut vm, Duration::from_secs(300));
    if status.is_none() {
        // The script, QEMU and the daemon share a process group.
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-(vm.id() as i32), libc::SIGKILL) };
        let _ = vm.wait();
    }
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("guest timed out:\n{out}\n{log}"));
    assert!(
        out.contains("GUEST-RESULT: PASS"),
        "guest failed:\n{out}\n{log}"
    );
    assert!(!out.contains("insmod"), "a module failed to load:\n{out}");
    assert!(out.contains("GUEST-QUEUES 2"), "{out}");
    assert!(out.contains("GUEST-SERIAL guest-disk-7"), "{out}");
    assert!(
        out.contains(&format!("GUEST-SIZE {}", (128 << 20) / 512)),
        "{out}"
    );
    // QEMU exited 0 and the daemon stopped cleanly.
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("front-end connected"), "{log}");

    // The host sees a clean image and file system holding the same data.
    let img = if qcow2 {
        assert_eq!(
            common::qemu::qemu_check(&img),
            0,
            "qemu-img check after the guest"
        );
        let raw = dir.path().join("converted.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        raw
    } else {
        img
    };
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dumped = dir.path().join("big");
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /big {}", dumped.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let sum = Command::new("sha256sum").arg(&dumped).output().unwrap();
    let host_sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let guest_sum = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-SUM "))
        .and_then(|l| l.split_whitespace().next())
        .expect("guest printed no checksum");
    assert_eq!(host_sum, guest_sum);
}
