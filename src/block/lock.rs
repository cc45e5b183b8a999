//! Image locking compatible with QEMU's byte-range protocol (`block/file-posix.c`).
//!
//! Every user of an image file announces, with shared open-file-description (OFD) read locks on
//! single bytes of the file:
//! - byte `100 + i` ([`PERM_BASE`]): "I hold permission `i`";
//! - byte `200 + i` ([`SHARED_BASE`]): "I do not let others hold permission `i`".
//!
//! A new user first takes its own bytes, then tests (F_OFD_GETLK with a write lock, which
//! conflicts with any other description's read lock) byte `200 + i` for each permission it
//! wants and byte `100 + i` for each permission it refuses to share. Locks taken through the
//! same description never conflict with each other, and they go away when the last descriptor
//! of the description is closed, so they must live on the descriptor kept for as long as the
//! image is open (an [`super::file::ImageFile`]'s).
//!
//! The daemon takes the permissions a QEMU 7.2 `virtio-blk` device without `share-rw` takes
//! (see [`image_perms`]).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use log::{debug, warn};

/// Byte `PERM_BASE + i` is locked by users holding permission bit `i`.
pub const PERM_BASE: i64 = 100;
/// Byte `SHARED_BASE + i` is locked by users that do not share permission bit `i`.
pub const SHARED_BASE: i64 = 200;

/// `BLK_PERM_CONSISTENT_READ`: reads see a consistent image.
pub const CONSISTENT_READ: u64 = 0x01;
/// `BLK_PERM_WRITE`: writes that change the data.
pub const WRITE: u64 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that do not change what a reader sees.
pub const WRITE_UNCHANGED: u64 = 0x04;
/// `BLK_PERM_RESIZE`: changing the file's size.
pub const RESIZE: u64 = 0x08;
/// `BLK_PERM_ALL` (QEMU 7.2: the four permissions above).
pub const ALL: u64 = 0x0f;

/// `--locking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// Lock; where the kernel or file system cannot, warn and go on without locks.
    Auto,
    /// Lock; fail where the kernel or file system cannot.
    On,
    /// Take no locks and check none.
    Off,
}

/// What a user of an image file takes: permissions held and permissions shared with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions held (`BLK_PERM_*` bits).
    pub perm: u64,
    /// Permissions others may hold at the same time.
    pub shared: u64,
}

/// What a file is to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The file of a raw image served to the guest.
    RawImage,
    /// A file a format driver reads metadata or data from: a qcow2 image (top or backing), its
    /// external data file, or a raw backing file.
    Qcow2Chain,
}

/// The permissions QEMU 7.2 takes on a file for a `virtio-blk` device without `share-rw`:
/// the device holds consistent read (and write unless read-only) and shares consistent read,
/// write-unchanged and resize (`blkconf_apply_backend_options`). A raw format node passes that
/// through; qcow2 (`bdrv_default_perms_for_storage`) adds resize when writable and never
/// shares write or resize on its files; backing files (`bdrv_default_perms_for_cow`) are only
/// read and, since the device does not share write, do not share write or resize either.
pub fn image_perms(role: Role, writable: bool) -> Perms {
    match role {
        Role::RawImage => Perms {
            perm: CONSISTENT_READ | if writable { WRITE } else { 0 },
            shared: CONSISTENT_READ | WRITE_UNCHANGED | RESIZE,
        },
        Role::Qcow2Chain => Perms {
            perm: CONSISTENT_READ | if writable { WRITE | RESIZE } else { 0 },
            shared: CONSISTENT_READ | WRITE_UNCHANGED,
        },
    }
}

/// QEMU's names for permissions (`bdrv_perm_names`).
pub fn perm_name(bit: u64) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        RESIZE => "resize",
        _ => "unknown",
    }
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a permission we do not share, or refuses to share one we need.
    #[error("{path}: {what}: {holder}; is another process (QEMU, qemu-img, qemu-storage-daemon, another vhost-device-blk) using the image? (the daemon's --locking off, or -U for info and check, skips image locking)")]
    Conflict {
        /// The file.
        path: PathBuf,
        /// What failed, in QEMU's words: `Failed to get "write" lock`, `Failed to get shared
        /// "write" lock`, `Failed to lock byte 100`.
        what: String,
        /// Who holds the conflicting lock, as far as /proc/locks tells.
        holder: String,
        /// No process we can see holds it (see [`ORPHAN_WAIT`]).
        orphaned: bool,
    },
    /// The kernel or file system cannot lock the file.
    #[error("{path}: cannot lock byte {byte} (--locking on): {source}; use --locking auto or off on file systems without OFD lock support")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The byte.
        byte: i64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Locking failed for another reason.
    #[error("{path}: cannot lock byte {byte}: {source}")]
    Os {
        /// The file.
        path: PathBuf,
        /// The byte.
        byte: i64,
        /// The OS error.
        source: std::io::Error,
    },
}

fn flock(l_type: i32, start: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on one byte (`qemu_lock_fd(fd, byte, 1, false)`).
fn lock_byte(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: `file` is an open descriptor and `fl` a valid flock that outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops our lock on one byte (no error if we held none).
fn unlock_byte(file: &File, byte: i64) {
    let fl = flock(libc::F_UNLCK, byte);
    // SAFETY: as in `lock_byte`.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

/// Whether another open file description holds a lock on `byte`
/// (`qemu_lock_fd_test(fd, byte, 1, true)`).
fn byte_taken(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: `file` is an open descriptor and `fl` a valid flock the kernel may overwrite.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Errors meaning "this kernel or file system cannot do OFD locks" rather than a conflict.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

fn bits(mask: u64) -> impl Iterator<Item = (i64, u64)> {
    (0..ALL.count_ones() as i64)
        .map(|i| (i, 1u64 << i))
        .filter(move |(_, b)| mask & b != 0)
}

/// How long a conflicting lock that no process holds is waited for. A daemon that has just
/// exited (killed, or stopped for an upgrade) keeps its locks for some milliseconds: the
/// kernel closes the files of its io_uring instances after the process is gone. A successor
/// started at once would otherwise be refused.
pub const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Locks `file` (the descriptor kept while the image is open) for `perms`, QEMU's way: takes
/// our bytes, then checks nobody else holds what we do not share or refuses what we need. On
/// failure our bytes are released (the file is about to be closed anyway). A conflict with a
/// lock no process holds is retried for [`ORPHAN_WAIT`].
pub fn lock(file: &File, path: &Path, perms: Perms, mode: Locking) -> Result<(), LockError> {
    let deadline = std::time::Instant::now() + ORPHAN_WAIT;
    loop {
        match try_lock(file, path, perms, mode) {
            Err(LockError::Conflict { orphaned: true, .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

fn try_lock(file: &File, path: &Path, perms: Perms, mode: Locking) -> Result<(), LockError> {
    if mode == Locking::Off {
        return Ok(());
    }
    let unshared = ALL & !perms.shared;
    let release = || {
        for (i, _) in bits(ALL) {
            unlock_byte(file, PERM_BASE + i);
            unlock_byte(file, SHARED_BASE + i);
        }
    };
    let os_error = |byte: i64, source: std::io::Error| {
        release();
        if matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            // Someone holds an exclusive lock on one of our bytes.
            let (holder, orphaned) = describe_holder(file, byte);
            return Err(LockError::Conflict {
                path: path.to_owned(),
                what: format!("Failed to lock byte {byte}"),
                holder,
                orphaned,
            });
        }
        if !unsupported(&source) {
            return Err(LockError::Os {
                path: path.to_owned(),
                byte,
                source,
            });
        }
        if mode == Locking::On {
            return Err(LockError::Unsupported {
                path: path.to_owned(),
                byte,
                source,
            });
        }
        warn!(
            "{}: cannot lock the image ({source}); continuing without image locking: QEMU and qemu-img will not see that the daemon uses it",
            path.display()
        );
        Ok(())
    };
    let ours = bits(perms.perm)
        .map(|(i, _)| PERM_BASE + i)
        .chain(bits(unshared).map(|(i, _)| SHARED_BASE + i));
    for byte in ours {
        if let Err(e) = lock_byte(file, byte) {
            return os_error(byte, e);
        }
    }
    // Someone refuses to share a permission we hold, or holds one we refuse to share.
    let checks = bits(perms.perm)
        .map(|(i, b)| {
            let what = format!("Failed to get \"{}\" lock", perm_name(b));
            (SHARED_BASE + i, what)
        })
        .chain(bits(unshared).map(|(i, b)| {
            let what = format!("Failed to get shared \"{}\" lock", perm_name(b));
            (PERM_BASE + i, what)
        }));
    for (byte, what) in checks {
        match byte_taken(file, byte) {
            Ok(false) => {}
            Ok(true) => {
                release();
                let (holder, orphaned) = describe_holder(file, byte);
                return Err(LockError::Conflict {
                    path: path.to_owned(),
                    what,
                    holder,
                    orphaned,
                });
            }
            Err(e) => return os_error(byte, e),
        }
    }
    debug!(
        "{}: locked (permissions {:#x}, shared {:#x})",
        path.display(),
        perms.perm,
        perms.shared
    );
    Ok(())
}

/// Names the processes that hold a lock on `byte` of `file`, other than us. F_OFD_GETLK and
/// /proc/locks report no pid for OFD locks (they belong to open file descriptions), but each
/// process's /proc/PID/fdinfo lists the locks of the description behind each descriptor.
/// Also says whether nobody we can see holds it.
fn describe_holder(file: &File, byte: i64) -> (String, bool) {
    let holders = lock_holders(file, byte);
    if holders.is_empty() {
        return ("another process holds a conflicting lock".into(), true);
    }
    let names: Vec<String> = holders
        .iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            format!("process {pid} ({comm})")
        })
        .collect();
    (
        format!("the image is in use by {}", names.join(", ")),
        false,
    )
}

/// Pids of the processes (that we may inspect) with a descriptor of `file`'s inode whose
/// description holds a lock covering `byte`.
pub fn lock_holders(file: &File, byte: i64) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            let same = std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
            same && std::fs::read_to_string(entry.path().join("fdinfo").join(fd.file_name()))
                .is_ok_and(|info| {
                    info.lines()
                        .filter_map(|l| l.strip_prefix("lock:"))
                        .any(|l| lock_line_covers(l, meta.ino(), byte))
                })
        });
        if holds {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// A /proc/locks-format line (`1: OFDLCK ADVISORY  READ -1 fd:01:5678 100 101`): whether it
/// is about inode `ino` and covers `byte`. Device numbers are not compared (the caller
/// already matched the file).
fn lock_line_covers(line: &str, ino: u64, byte: i64) -> bool {
    let f: Vec<&str> = line.split_whitespace().collect();
    // Blocked waiters are shown as "1: -> OFDLCK ..." with an extra field.
    let f = if f.get(1) == Some(&"->") {
        &f[1..]
    } else {
        &f[..]
    };
    if f.len() < 8 {
        return false;
    }
    let file_ino = f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok());
    let start = f[6].parse::<i64>().ok();
    let end = if f[7] == "EOF" {
        Some(i64::MAX)
    } else {
        f[7].parse::<i64>().ok()
    };
    match (file_ino, start, end) {
        (Some(i), Some(s), Some(e)) => i == ino && s <= byte && byte <= e,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_permissions() {
        // What /proc/locks shows for QEMU 7.2 virtio-blk devices (bytes 100+, 200+).
        let bytes = |p: Perms| {
            let mut v: Vec<i64> = bits(p.perm).map(|(i, _)| PERM_BASE + i).collect();
            v.extend(bits(ALL & !p.shared).map(|(i, _)| SHARED_BASE + i));
            v
        };
        assert_eq!(bytes(image_perms(Role::RawImage, true)), [100, 101, 201]);
        assert_eq!(bytes(image_perms(Role::RawImage, false)), [100, 201]);
        assert_eq!(
            bytes(image_perms(Role::Qcow2Chain, true)),
            [100, 101, 103, 201, 203]
        );
        assert_eq!(bytes(image_perms(Role::Qcow2Chain, false)), [100, 201, 203]);
    }

    #[test]
    fn proc_locks_lines() {
        let l = "\t3: OFDLCK  ADVISORY  READ  -1 fd:01:77 100 101";
        assert!(lock_line_covers(l, 77, 101));
        assert!(!lock_line_covers(l, 77, 102));
        assert!(!lock_line_covers(l, 78, 100));
        let w = "3: -> POSIX ADVISORY WRITE 9 08:02:77 0 EOF";
        assert!(lock_line_covers(w, 77, 201));
        assert!(!lock_line_covers("garbage", 77, 100));
    }

    #[test]
    fn two_descriptions_conflict_and_off_skips() {
        let dir = std::env::temp_dir().join(format!("vdb-lock-{}", std::process::id()));
        std::fs::write(&dir, [0u8; 512]).unwrap();
        let a = File::options().read(true).write(true).open(&dir).unwrap();
        let b = File::options().read(true).write(true).open(&dir).unwrap();
        let w = image_perms(Role::RawImage, true);
        lock(&a, &dir, w, Locking::On).unwrap();
        // Same description: no conflict with ourselves.
        lock(&a, &dir, w, Locking::On).unwrap();
        let err = lock(&b, &dir, w, Locking::On).unwrap_err();
        assert!(
            err.to_string().contains("Failed to get \"write\" lock"),
            "{err}"
        );
        let ro = image_perms(Role::RawImage, false);
        let err = lock(&b, &dir, ro, Locking::Auto).unwrap_err();
        assert!(
            err.to_string()
                .contains("Failed to get shared \"write\" lock"),
            "{err}"
        );
        lock(&b, &dir, w, Locking::Off).unwrap();
        drop(a);
        lock(&b, &dir, w, Locking::On).unwrap();
        // An exclusive lock on one of our bytes (not QEMU's way, but possible).
        drop(b);
        let c = File::options().read(true).write(true).open(&dir).unwrap();
        let fl = flock(libc::F_WRLCK, 100);
        // SAFETY: a valid flock on an open descriptor.
        let rc = unsafe { libc::fcntl(c.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(rc, 0);
        let a = File::options().read(true).open(&dir).unwrap();
        let t = std::time::Instant::now();
        let err = lock(&a, &dir, ro, Locking::Auto).unwrap_err();
        // Held by no other process (our own other description): waited for, then refused.
        assert!(t.elapsed() >= ORPHAN_WAIT);
        let me = std::process::id();
        assert!(err.to_string().contains("Failed to lock byte 100"), "{err}");
        // Only other processes are named (here: nobody else).
        assert!(!err.to_string().contains(&format!("process {me}")), "{err}");
        // Released while waited for (a daemon that just exited): taken.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(c);
        });
        lock(&a, &dir, ro, Locking::Auto).unwrap();
        releaser.join().unwrap();
        let _ = std::fs::remove_file(&dir);
    }
}
