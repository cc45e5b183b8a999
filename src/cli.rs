//! Command-line arguments (clap). Validation into a [`crate::Config`] lives in `config.rs`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Serve a disk image to virtual machines over vhost-user-blk.
///
/// A VMM (QEMU `-device vhost-user-blk-pci`, cloud-hypervisor `--disk vhost_user=true`) connects
/// to the socket and the daemon serves the guest's virtqueues itself. After a front-end
/// disconnects the daemon waits for the next one; SIGTERM or SIGINT stop it cleanly.
#[derive(Debug, Parser)]
#[command(name = "vhost-device-blk", version, about, long_about)]
pub struct Args {
    /// An image tool instead of the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Listen on a new Unix socket at PATH (a stale socket there is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Use the inherited listening Unix socket FD (systemd socket activation, libvirt).
    #[arg(long, value_name = "FD")]
    pub fd: Option<i32>,

    /// The disk image (regular file or block device).
    #[arg(long, value_name = "IMAGE")]
    pub blk_file: Option<PathBuf>,

    /// Image format. Without it the format is probed as QEMU does, and a probed raw image
    /// refuses guest writes that would put an image header into its first sector.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,

    /// Serve the image read-only (VIRTIO_BLK_F_RO; every write is refused).
    #[arg(long)]
    pub read_only: bool,

    /// Number of request queues, each served by its own thread (1-64).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Largest virtqueue size the front-end may configure (power of two, 4-1024).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,

    /// Host cache mode: `none` opens the image with O_DIRECT, `writeback` uses the page cache.
    /// Guest flushes are honoured (fdatasync) in both.
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    pub cache: CacheArg,

    /// I/O engine: io_uring per queue, a thread pool, or io_uring where available.
    #[arg(long, value_enum, default_value_t = AioArg::Auto)]
    pub aio: AioArg,

    /// With `--cache writeback`: copy cached image data into guest buffers from a read-only
    /// mapping of the image instead of a system call per read (reads not in the page cache still
    /// go to the I/O engine). About 1.7x the 4 KiB read rate of `off`; the mapped page cache
    /// counts in the daemon's resident size (RssFile).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub mapped_reads: OnOff,

    /// Track requests in flight in memory the front-end keeps (vhost-user INFLIGHT_SHMFD), so
    /// that the daemon can be killed or restarted under a running guest: the next daemon
    /// resubmits what was taken and not completed. `off` does not offer it (QEMU then restarts
    /// the rings from the used index, which loses requests completed out of order).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub inflight: OnOff,

    /// Serial number returned to the guest (GET_ID, /dev/disk/by-id/virtio-ID), up to 20
    /// printable ASCII characters. Default: derived from the image path.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Logical block size reported to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub logical_block_size: u32,

    /// Guest discards: `unmap` punches holes in the image, `ignore` completes them doing nothing.
    #[arg(long, value_enum, default_value_t = DiscardArg::Unmap)]
    pub discard: DiscardArg,

    /// qcow2 L2 table cache size, shared by all queues (suffixes K, M, G). Default: 32M, or
    /// less when the image's L2 tables all fit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub l2_cache_size: Option<u64>,

    /// qcow2 lazy refcounts: refcount updates stay in memory (the image is marked dirty and
    /// repaired on the next open after a crash) and are written at a clean stop. `auto`: on for
    /// version 3 images. `off`: refcounts reach the file ahead of the mappings that need them
    /// and at every flush (no repair after a crash; at worst leaked clusters).
    #[arg(long, value_enum, default_value_t = LazyArg::Auto)]
    pub lazy_refcounts: LazyArg,

    /// QEMU-compatible image locking (byte-range OFD locks, as QEMU's `locking=` option): while
    /// the daemon has the image, QEMU and qemu-img cannot open it for writing (nor qcow2 images
    /// at all without -U), and the daemon refuses an image another process is writing. `auto`
    /// goes on without locks (with a warning) where the kernel or file system cannot lock;
    /// `on` fails there; `off` neither takes nor checks locks.
    #[arg(long, value_enum, default_value_t = LockingArg::Auto)]
    pub locking: LockingArg,

    /// Print the vhost-user back-end capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// Image tools (qemu-img's semantics and exit codes).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what an image is: format, sizes, qcow2 features, backing file.
    Info {
        /// The image.
        image: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputArg::Human)]
        output: OutputArg,
        /// Open a qcow2 image even while QEMU or a daemon writes it (no image locks; what is
        /// shown may be inconsistent), as qemu-img's -U.
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Check a qcow2 image's metadata. Exit status: 0 consistent, 1 check failed, 2 corrupted,
    /// 3 leaked clusters only, 63 not a qcow2 image.
    Check {
        /// The image.
        image: PathBuf,
        /// Repair leaks only, or everything that can be repaired.
        #[arg(long, value_enum)]
        repair: Option<RepairArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputArg::Human)]
        output: OutputArg,
        /// Check even while QEMU or a daemon writes the image (no image locks; the result may
        /// report errors that are not there), as qemu-img's -U. Not with --repair.
        #[arg(short = 'U', long, conflicts_with = "repair")]
        force_share: bool,
    },
    /// Create an empty qcow2 (v3) image.
    Create {
        /// The new image (must not exist).
        image: PathBuf,
        /// Virtual size (suffixes K, M, G).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Cluster size, a power of two from 512 to 2M.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Extended L2 entries (32 subclusters per cluster; clusters of at least 16K).
        #[arg(long)]
        extended_l2: bool,
        /// Set the lazy refcounts feature bit.
        #[arg(long)]
        lazy_refcounts: bool,
        /// Backing file, stored as given (relative names are relative to the image).
        #[arg(long, value_name = "FILE", requires = "backing_format")]
        backing: Option<String>,
        /// Format of the backing file (recorded in the image; never probed).
        #[arg(long, value_name = "raw|qcow2")]
        backing_format: Option<String>,
    },
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    /// Text.
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// `check --repair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Only lower refcounts that are too high.
    Leaks,
    /// Everything that can be repaired.
    All,
}

/// Parses a byte count with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.strip_suffix(['k', 'K']) {
        Some(n) => (n, 10),
        None => match s.strip_suffix(['m', 'M']) {
            Some(n) => (n, 20),
            None => match s.strip_suffix(['g', 'G']) {
                Some(n) => (n, 30),
                None => (s, 0),
            },
        },
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

/// `--cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// O_DIRECT.
    None,
    /// Host page cache.
    Writeback,
}

/// `--aio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AioArg {
    /// io_uring if the kernel allows it, threads otherwise.
    Auto,
    /// io_uring only.
    IoUring,
    /// Thread pool.
    Threads,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// `--lazy-refcounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LazyArg {
    /// On for version 3 images.
    Auto,
    /// On (version 3 images only).
    On,
    /// Off.
    Off,
}

/// `--locking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LockingArg {
    /// Lock where the kernel and file system can, warn and go on elsewhere.
    Auto,
    /// Lock, or fail.
    On,
    /// No locks.
    Off,
}

/// `--discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscardArg {
    /// Pass discards to the image.
    Unmap,
    /// Ignore discards.
    Ignore,
}

/// What `--print-capabilities` prints (QEMU's vhost-user.json `VHostUserBackendCapabilities`).
pub const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;
