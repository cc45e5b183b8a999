//! The validated, clap-free daemon configuration.

use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use crate::block::lock::Locking;
use crate::block::{CacheMode, ImageFormat, LazyRefcounts, OpenOptions};
use crate::cli::{AioArg, Args, CacheArg, DiscardArg, FormatArg, LazyArg, LockingArg, OnOff};
use crate::io::AioMode;
use crate::virtio::{serial_bytes, DeviceSettings, DiscardMode};

/// Where the vhost-user socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Create and listen on a socket at this path.
    Path(PathBuf),
    /// An inherited listening socket.
    Fd(RawFd),
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket.
    pub listen: Listen,
    /// The image.
    pub image: OpenOptions,
    /// Device settings.
    pub device: DeviceSettings,
    /// I/O engine choice.
    pub aio: AioMode,
    /// vhost-user options.
    pub vhost_user: crate::vhost_user::Options,
}

/// Invalid command lines.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither or both of `--socket-path` and `--fd`.
    #[error("exactly one of --socket-path and --fd is required")]
    Listen,
    /// No image.
    #[error("--blk-file is required")]
    NoImage,
    /// Bad `--fd`.
    #[error("--fd {0} is not a valid file descriptor number (must be 3 or more)")]
    Fd(i32),
    /// Bad `--num-queues`.
    #[error("--num-queues {0} is out of range (1-64)")]
    NumQueues(u16),
    /// Bad `--queue-size`.
    #[error("--queue-size {0} must be a power of two between 4 and 1024")]
    QueueSize(u16),
    /// Bad `--logical-block-size`.
    #[error("--logical-block-size {0} must be 512 or 4096")]
    LogicalBlockSize(u32),
    /// Bad `--serial`.
    #[error("--serial must be at most 20 printable ASCII characters")]
    Serial,
}

/// Most queues: vhost-user-backend's thread masks are 64-bit.
pub const MAX_QUEUES: u16 = 64;
/// Largest queue (QEMU's VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) if fd >= 3 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::Fd(fd)),
            _ => return Err(ConfigError::Listen),
        };
        let path = a.blk_file.ok_or(ConfigError::NoImage)?;
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(a.num_queues));
        }
        if !a.queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&a.queue_size) {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.logical_block_size != 512 && a.logical_block_size != 4096 {
            return Err(ConfigError::LogicalBlockSize(a.logical_block_size));
        }
        let serial = match a.serial {
            Some(s) if s.len() <= 20 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => s,
            Some(_) => return Err(ConfigError::Serial),
            None => default_serial(&path),
        };
        Ok(Config {
            listen,
            image: OpenOptions {
                path,
                format: a.format.map(|f| match f {
                    FormatArg::Raw => ImageFormat::Raw,
                    FormatArg::Qcow2 => ImageFormat::Qcow2,
                }),
                read_only: a.read_only,
                cache: match a.cache {
                    CacheArg::None => CacheMode::None,
                    CacheArg::Writeback => CacheMode::Writeback,
                },
                l2_cache_size: a.l2_cache_size,
                lazy_refcounts: match a.lazy_refcounts {
                    LazyArg::Auto => LazyRefcounts::Auto,
                    LazyArg::On => LazyRefcounts::On,
                    LazyArg::Off => LazyRefcounts::Off,
                },
                locking: match a.locking {
                    LockingArg::Auto => Locking::Auto,
                    LockingArg::On => Locking::On,
                    LockingArg::Off => Locking::Off,
                },
            },
            device: DeviceSettings {
                num_queues: a.num_queues,
                queue_size: a.queue_size,
                logical_block_size: a.logical_block_size,
                serial: serial_bytes(&serial),
                discard: match a.discard {
                    DiscardArg::Unmap => DiscardMode::Unmap,
                    DiscardArg::Ignore => DiscardMode::Ignore,
                },
                read_only: a.read_only,
                mapped_reads: a.mapped_reads == OnOff::On,
            },
            aio: match a.aio {
                AioArg::Auto => AioMode::Auto,
                AioArg::IoUring => AioMode::IoUring,
                AioArg::Threads => AioMode::Threads,
            },
            vhost_user: crate::vhost_user::Options {
                inflight: a.inflight == OnOff::On,
            },
        })
    }
}

/// A serial that stays the same as long as the image path does: "vdb-" and 16 hex digits of a
/// FNV-1a hash of the absolute path (20 characters, the GET_ID maximum).
pub fn default_serial(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let hash = abs
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("vdb-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vhost-device-blk"];
        v.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--socket-path", "/tmp/s", "--blk-file", "/tmp/i"]).unwrap();
        assert_eq!(c.listen, Listen::Path("/tmp/s".into()));
        assert_eq!(c.image.cache, CacheMode::Writeback);
        assert_eq!(c.image.format, None);
        assert_eq!(c.device.num_queues, 1);
        assert_eq!(c.device.queue_size, 1024);
        assert_eq!(c.device.logical_block_size, 512);
        assert_eq!(c.device.discard, DiscardMode::Unmap);
        assert_eq!(c.aio, AioMode::Auto);
        assert_eq!(c.image.locking, Locking::Auto);
        assert!(c.device.serial.starts_with(b"vdb-"));
        assert_eq!(
            c.device.serial,
            serial_bytes(&default_serial(Path::new("/tmp/i")))
        );
    }

    #[test]
    fn every_flag() {
        let c = parse(&[
            "--fd",
            "3",
            "--blk-file",
            "i",
            "--format",
            "qcow2",
            "--read-only",
            "--num-queues",
            "4",
            "--queue-size",
            "256",
            "--cache",
            "none",
            "--aio",
            "threads",
            "--serial",
            "disk-1",
            "--logical-block-size",
            "4096",
            "--discard",
            "ignore",
            "--l2-cache-size",
            "4M",
            "--locking",
            "off",
        ])
        .unwrap();
        assert_eq!(c.listen, Listen::Fd(3));
        assert_eq!(c.image.format, Some(ImageFormat::Qcow2));
        assert!(c.image.read_only && c.device.read_only);
        assert_eq!(c.device.num_queues, 4);
        assert_eq!(c.device.queue_size, 256);
        assert_eq!(c.image.cache, CacheMode::None);
        assert_eq!(c.aio, AioMode::Threads);
        assert_eq!(&c.device.serial[..7], b"disk-1\0");
        assert_eq!(c.device.logical_block_size, 4096);
        assert_eq!(c.device.discard, DiscardMode::Ignore);
        assert_eq!(c.image.l2_cache_size, Some(4 << 20));
        assert_eq!(c.image.locking, Locking::Off);
    }

    #[test]
    fn invalid_combinations() {
        assert_eq!(
            parse(&["--blk-file", "i"]).unwrap_err(),
            ConfigError::Listen
        );
        assert_eq!(
            parse(&["--socket-path", "s"]).unwrap_err(),
            ConfigError::NoImage
        );
        assert_eq!(
            parse(&["--fd", "1", "--blk-file", "i"]).unwrap_err(),
            ConfigError::Fd(1)
        );
        let base = ["--socket-path", "s", "--blk-file", "i"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert_eq!(
            with(&["--num-queues", "0"]).unwrap_err(),
            ConfigError::NumQueues(0)
        );
        assert_eq!(
            with(&["--num-queues", "65"]).unwrap_err(),
            ConfigError::NumQueues(65)
        );
        assert_eq!(
            with(&["--queue-size", "100"]).unwrap_err(),
            ConfigError::QueueSize(100)
        );
        assert_eq!(
            with(&["--queue-size", "2048"]).unwrap_err(),
            ConfigError::QueueSize(2048)
        );
        assert_eq!(
            with(&["--logical-block-size", "1024"]).unwrap_err(),
            ConfigError::LogicalBlockSize(1024)
        );
        assert_eq!(
            with(&["--serial", "012345678901234567890"]).unwrap_err(),
            ConfigError::Serial
        );
        assert_eq!(
            with(&["--serial", "tab\there"]).unwrap_err(),
            ConfigError::Serial
        );
        assert!(Args::try_parse_from(["x", "--socket-path", "s", "--fd", "3"]).is_err());
    }
}
