//! Booting a throwaway Linux guest under QEMU (TCG) on a vhost-user-blk socket: an initramfs
//! built from the host's Debian kernel modules, busybox-static and e2fsprogs, with a test script
//! as /init.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Host pieces the guest needs.
pub struct GuestKit {
    pub kernel: PathBuf,
    pub modules: PathBuf,
}

impl GuestKit {
    /// Finds the host kernel; panics with the install hint when the test machine lacks it.
    pub fn find() -> GuestKit {
        let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        kernels.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        });
        kernels.sort();
        let kernel = kernels.pop().expect(
            "no /boot/vmlinuz-*: install linux-image-amd64 (scripts/test.sh does), or set VHOST_BLK_SKIP_GUEST=1",
        );
        let version = kernel.file_name().unwrap().to_str().unwrap()["vmlinuz-".len()..].to_owned();
        for tool in ["qemu-system-x86_64", "busybox"] {
            assert!(
                which(tool).is_some(),
                "{tool} missing: run scripts/test.sh to install it"
            );
        }
        GuestKit {
            kernel,
            modules: Path::new("/lib/modules").join(version),
        }
    }

    /// Modules (paths relative to the module dir) needed for `names`, dependencies first.
    fn module_closure(&self, names: &[&str]) -> Vec<String> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep")).expect("modules.dep");
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in dep.lines() {
            if let Some((m, d)) = line.split_once(':') {
                deps.insert(
                    m.to_owned(),
                    d.split_whitespace().map(str::to_owned).collect(),
                );
            }
        }
        fn visit(m: &str, deps: &BTreeMap<String, Vec<String>>, out: &mut Vec<String>) {
            if out.iter().any(|x| x == m) {
                return;
            }
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, out);
            }
            out.push(m.to_owned());
        }
        let mut out = Vec::new();
        for n in names {
            let key = deps
                .keys()
                .find(|k| {
                    let base = Path::new(k).file_name().unwrap().to_str().unwrap();
                    base == format!("{n}.ko") || base.starts_with(&format!("{n}.ko."))
                })
                .unwrap_or_else(|| panic!("module {n} not found"))
                .clone();
            visit(&key, &deps, &mut out);
        }
        out
    }

    /// Builds an initramfs whose /init is `script` (run by busybox sh), with the block and ext4
    /// modules loaded first and mkfs.ext4/e2fsck available.
    pub fn initramfs(&self, script: &str, out: &Path) {
        let mut cpio = Cpio::default();
        for d in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "mnt", "tmp", "modules", "lib", "lib64",
        ] {
            cpio.dir(d);
        }
        cpio.file(
            "bin/busybox",
            &std::fs::read(which("busybox").unwrap()).unwrap(),
            0o755,
        );
        let mut libs = Vec::new();
        for tool in ["/usr/sbin/mkfs.ext4", "/usr/sbin/e2fsck"] {
            cpio.file(
                &format!(
                    "sbin/{}",
                    Path::new(tool).file_name().unwrap().to_str().unwrap()
                ),
                &std::fs::read(tool).unwrap(),
                0o755,
            );
            let ldd = Command::new("ldd").arg(tool).output().unwrap();
            for line in String::from_utf8_lossy(&ldd.stdout).lines() {
                let path = line
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(str::to_owned);
                if let Some(p) = path {
                    if !libs.contains(&p) {
                        libs.push(p);
                    }
                }
            }
        }
        for lib in &libs {
            let real = std::fs::canonicalize(lib).unwrap();
            let rel = lib.trim_start_matches('/');
            let mut parent = PathBuf::new();
            for c in Path::new(rel).parent().unwrap().components() {
                parent.push(c);
                cpio.dir(parent.to_str().unwrap());
            }
            cpio.file(rel, &std::fs::read(real).unwrap(), 0o755);
        }
        if let Ok(conf) = std::fs::read("/etc/mke2fs.conf") {
            cpio.file("etc/mke2fs.conf", &conf, 0o644);
        }
        let mut order = String::new();
        for m in self.module_closure(&["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]) {
            let name = Path::new(&m)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let data = std::fs::read(self.modules.join(&m)).unwrap();
            let (name, data) = match name.strip_suffix(".xz") {
                Some(plain) => (plain.to_owned(), decompress("xz", &data)),
                None => match name.strip_suffix(".zst") {
                    Some(plain) => (plain.to_owned(), decompress("zstd", &data)),
                    None => (name, data),
                },
            };
            cpio.file(&format!("modules/{name}"), &data, 0o644);
            order.push_str(&name);
            order.push('\n');
        }
        cpio.file("modules/order", order.as_bytes(), 0o644);
        cpio.file("init", script.as_bytes(), 0o755);
        std::fs::write(out, cpio.finish()).unwrap();
    }
}

/// A QEMU (TCG) guest with shared memfd memory, booting `kernel` and `initrd` with a
/// vhost-user-blk-pci device of `queues` queues on `socket` (QEMU reconnects every second when
/// the back-end goes away), its serial console (ttyS0) written to `console` and ttyS1 on a
/// Unix socket server at `control` (the host's way to talk to the guest). In its own process
/// group, killed with everything in it when dropped.
pub struct Qemu {
    pub child: Child,
    pub console: PathBuf,
}

/// What a [`Qemu`] boots.
pub struct QemuConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub socket: &'a Path,
    pub queues: u32,
    pub cpus: u32,
    pub memory: &'a str,
    pub console: &'a Path,
    pub control: &'a Path,
}

impl Qemu {
    pub fn spawn(c: &QemuConfig) -> Qemu {
        let mem = format!("memory-backend-memfd,id=mem,size={},share=on", c.memory);
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", c.memory, "-object", &mem])
            .args(["-numa", "node,memdev=mem"])
            .arg("-smp")
            .arg(c.cpus.to_string())
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-monitor", "none"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vub,path={},reconnect=1",
                c.socket.display()
            ))
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=vub,num-queues={}",
                c.queues
            ))
            .arg("-kernel")
            .arg(c.kernel)
            .arg("-initrd")
            .arg(c.initrd)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
            .arg("-serial")
            .arg(format!("file:{}", c.console.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                c.control.display()
            ))
            .args(["-serial", "chardev:ctl"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(c.console.with_extension("qemu.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("qemu-system-x86_64");
        Qemu {
            child,
            console: c.console.to_owned(),
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(&self.console).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// QEMU's own messages (stderr).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.console.with_extension("qemu.log")).unwrap_or_default()
    }

    /// The exit status, if QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits (polling the console) until `f` finds something in it; `Err` with the reason when
    /// QEMU exits first or `t` passes.
    pub fn wait_console<T>(
        &mut self,
        t: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + t;
        loop {
            if let Some(v) = f(&self.console()) {
                return Ok(v);
            }
            if let Some(status) = self.exited() {
                // The last words may have landed between the two looks.
                return f(&self.console()).ok_or(format!("QEMU exited ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!("nothing after {t:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops QEMU (SIGSTOP): the guest sends nothing more.
    pub fn pause(&self) {
        // SAFETY: signalling our own, unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused QEMU go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: signalling our own, unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// Waits at most `t` for QEMU to exit.
    pub fn wait(&mut self, t: Duration) -> Option<ExitStatus> {
        super::wait_timeout(&mut self.child, t)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Once reaped, the group id may belong to someone else.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling the process group of our own, unreaped child.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn decompress(tool: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(tool)
        .args(["-dc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap().stdout
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// A minimal `newc` cpio archive writer.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: Vec<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        if !self.dirs.iter().any(|d| d == name) {
            self.dirs.push(name.to_owned());
            self.entry(name, 0o040755, &[]);
        }
    }

    pub fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}
