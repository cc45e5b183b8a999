//! qemu-img and qemu-io as image makers and oracles.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `-o` argument of `qemu-img create` for comma-separated `opts` (nothing when empty).
pub fn create_options(opts: &str) -> String {
    if opts.is_empty() {
        String::new()
    } else {
        format!("-o {opts}")
    }
}

/// Runs a command line (split on whitespace) in `dir`; panics with its output on failure.
pub fn sh(dir: &Path, cmdline: &str) {
    let mut parts = cmdline.split_whitespace();
    let prog = parts.next().unwrap();
    let out = Command::new(prog)
        .args(parts)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (scripts/test.sh installs qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmdline}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io(dir: &Path, image: &str, cmds: &[String]) {
    qemu_io_fmt(dir, "qcow2", image, cmds)
}

/// Runs qemu-io commands on an image of the given format.
pub fn qemu_io_fmt(dir: &Path, format: &str, image: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", format]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(image).output().expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

/// The guest-visible contents of an image, by `qemu-img convert -O raw`. QEMU 7.2 resolves a
/// relative data file name against its working directory: run it in the image's directory.
pub fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    let st = Command::new("qemu-img")
        .current_dir(image.parent().unwrap())
        .arg("convert")
        .arg("-O")
        .arg("raw")
        .arg(image)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    data
}

/// `qemu-img check` exit status.
pub fn qemu_check(image: &Path) -> i32 {
    Command::new("qemu-img")
        .current_dir(image.parent().unwrap())
        .args(["check", "-q"])
        .arg(image)
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

/// A path in `dir`.
pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
