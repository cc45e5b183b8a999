//! Test harness: run the daemon binary on a temporary socket and drive it with a real
//! vhost-user-blk front-end (libblkio's Rust core).

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub mod frontend;
pub mod guest;
pub mod qemu;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk");

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Creates a raw image of `size` bytes filled with a pattern from `seed`; returns its contents.
pub fn pattern_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    Rng::new(seed).fill(&mut data);
    File::create(path).unwrap().write_all(&data).unwrap();
    data
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `image` with extra arguments, listening in `dir`; waits for the socket.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join(format!("vub-{}.sock", std::process::id()));
        Daemon::spawn(&socket, &dir.join("daemon.log"), image, extra)
    }

    /// Starts the daemon on `image` listening on `socket` (replacing what a killed daemon left
    /// there), logging at debug level to `log`; waits for the socket.
    pub fn spawn(socket: &Path, log: &Path, image: &Path, extra: &[&str]) -> Daemon {
        Daemon::try_spawn(socket, log, image, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `spawn`, with `Err` (and the log) when the daemon exits before it listens.
    pub fn try_spawn(
        socket: &Path,
        log: &Path,
        image: &Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        // A daemon killed before may have left its socket behind.
        let _ = std::fs::remove_file(socket);
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(socket)
            .arg("--blk-file")
            .arg(image)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        d.wait_for_socket()?;
        Ok(d)
    }

    fn wait_for_socket(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "daemon exited early ({status}): {}",
                    self.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err("daemon did not create its socket".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it contains `needle`: queue threads log on their own time. Panics with the
    /// log after 10 s.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like `wait_for_log`, with a deadline of `t`; `None` when it passed (or the daemon exited
    /// without logging `needle`).
    pub fn wait_for_log_within(&mut self, needle: &str, t: Duration) -> Option<String> {
        let deadline = Instant::now() + t;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return Some(log);
            }
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) -> ExitStatus {
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    pub fn path(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        signal(&self.child, libc::SIGTERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("daemon ignored SIGTERM: {}", self.log_text()));
        std::mem::forget(self);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits at most `t` until no process holds a lock on `path` (as /proc/locks lists them);
/// returns how long that took, `None` when `t` passed. A daemon's image locks outlive the
/// process for some milliseconds (after SIGKILL or a clean exit): its io_uring rings, torn down
/// asynchronously, keep the open file referenced.
pub fn wait_unlocked(path: &Path, t: Duration) -> Option<Duration> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let start = Instant::now();
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if !locks
            .lines()
            .any(|l| l.split_whitespace().nth(5) == Some(&id))
        {
            return Some(start.elapsed());
        }
        if start.elapsed() > t {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether one of `pid`'s io_uring workers (`iou-wrk-*` threads, which run the requests io_uring
/// cannot complete inline, such as fdatasync) is blocked (state D): a FLUSH, or a write waiting
/// for the disk, is in flight.
pub fn io_worker_blocked(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).any(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) if a < b => {
                stat[a + 1..b].starts_with("iou-wrk") && stat[b + 1..].trim_start().starts_with('D')
            }
            _ => false,
        }
    })
}

/// Whether every thread of `pid` sleeps (state S): nothing being processed, no io_uring worker
/// busy.
pub fn all_threads_sleep(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        stat.rfind(')')
            .is_some_and(|b| stat[b + 1..].trim_start().starts_with('S'))
    })
}

/// A connected vhost-user-blk front-end with one shared I/O buffer.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

pub const REGION_LEN: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &str, num_queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket)?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let queues = b.start()?.queues;
        let align = b.get_u64("mem-region-alignment")? as usize;
        let region = b.alloc_mem_region(REGION_LEN.next_multiple_of(align))?;
        b.map_mem_region(&region)?;
        Ok(Client {
            blkio: b,
            queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The shared buffer (`REGION_LEN` bytes).
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for our lifetime and no request is in flight while the
        // caller holds this borrow.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REGION_LEN) }
    }

    pub fn ptr(&self, at: usize) -> *mut u8 {
        assert!(at < REGION_LEN);
        (self.region.addr + at) as *mut u8
    }

    /// Waits for one completion on queue `q` and returns its `ret` (0 or -errno).
    pub fn complete(q: &mut Blkioq) -> (usize, i32) {
        let mut c = [const { MaybeUninit::<Completion>::uninit() }];
        let mut t = Duration::from_secs(30);
        let n = q.do_io(&mut c, 1, Some(&mut t), None).unwrap();
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised one completion.
        let c = unsafe { c[0].assume_init_read() };
        (c.user_data, c.ret)
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let p = self.ptr(0);
        self.queues[q].read(offset, p, len, 1, ReqFlags::empty());
        match Self::complete(&mut self.queues[q]).1 {
            0 => Ok(self.buf()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.ptr(0);
        self.queues[q].write(offset, p, data.len(), 2, ReqFlags::empty());
        Self::ret(Self::complete(&mut self.queues[q]).1)
    }

    pub fn flush(&mut self, q: usize) -> Result<(), i32> {
        self.queues[q].flush(3, ReqFlags::empty());
        Self::ret(Self::complete(&mut self.queues[q]).1)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> Result<(), i32> {
        self.queues[q].discard(offset, len, 4, ReqFlags::empty());
        Self::ret(Self::complete(&mut self.queues[q]).1)
    }

    pub fn write_zeroes(
        &mut self,
        q: usize,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), i32> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 5, flags);
        Self::ret(Self::complete(&mut self.queues[q]).1)
    }

    fn ret(r: i32) -> Result<(), i32> {
        if r == 0 {
            Ok(())
        } else {
            Err(r)
        }
    }
}

/// Allocated bytes of a file (to see holes).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Reads `len` bytes at `offset` of a host file.
pub fn file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut v, offset)
        .unwrap();
    v
}

/// Big-endian u32 at `at` in a file (for patching images).
pub fn be32(p: &Path, at: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(p).unwrap().read_exact_at(&mut b, at).unwrap();
    u32::from_be_bytes(b)
}

/// Big-endian u64 at `at` in a file.
pub fn be64(p: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(p).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// Overwrites bytes at `at` in a file.
pub fn put(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// CPU time (user + system, in clock ticks) a process has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
