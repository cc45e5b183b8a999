//! Block backends: an image format maps guest byte ranges to host extents and plans the host
//! operations for flush, discard and write-zeroes. Backends do no data I/O themselves: the queue
//! worker submits it from guest buffers. This layer knows nothing about virtio.

pub mod file;
pub mod lock;
pub mod probe;
pub mod qcow2;
pub mod raw;

use std::fmt;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use log::{info, warn};

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The file's bytes are the disk.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// Host caching of image data (`--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT: bypass the host page cache.
    None,
    /// Use the host page cache; guest flushes become `fdatasync`.
    Writeback,
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Image path.
    pub path: PathBuf,
    /// Format, or `None` to probe (QEMU's rule, see [`probe`]).
    pub format: Option<ImageFormat>,
    /// Open read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// qcow2 L2 table cache size in bytes (`None`: the default).
    pub l2_cache_size: Option<u64>,
    /// qcow2 lazy refcounts.
    pub lazy_refcounts: LazyRefcounts,
    /// QEMU-compatible image locking.
    pub locking: lock::Locking,
}

/// `--lazy-refcounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyRefcounts {
    /// On for version 3 images.
    Auto,
    /// On (version 3 only).
    On,
    /// Refcounts written in order at every flush.
    Off,
}

/// What a backend tells the device about the disk.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The image format.
    pub format: ImageFormat,
    /// The format was probed as raw: a guest must not write a recognizable image header into
    /// the first sector (it would change how the image is probed next time).
    pub probed_raw: bool,
    /// Required alignment of buffer addresses and lengths for data I/O (1 when buffered).
    pub mem_align: usize,
    /// Required alignment of data I/O offsets and lengths (1 when buffered).
    pub offset_align: u64,
    /// Preferred I/O granularity in bytes (0: none).
    pub opt_io_size: u32,
}

/// Where a piece of a guest range lives on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Data at `offset` in the file `fd`.
    Data {
        /// File descriptor (valid while the backend lives).
        fd: RawFd,
        /// Byte offset in that file.
        offset: u64,
    },
    /// Reads as zeroes; nothing to read from the host.
    Zero,
    /// Bytes `skip..skip + len` of a compressed cluster, decoded by
    /// [`BlockBackend::read_compressed`].
    Compressed {
        /// Which image of the backend's chain holds it.
        image: u16,
        /// The image's descriptor of the compressed data.
        descriptor: u64,
        /// Offset of the extent within the decompressed cluster.
        skip: u64,
    },
}

/// Appends `ext` to `out`, merging it with the previous extent when they are contiguous.
pub fn push_extent(out: &mut Vec<Extent>, ext: Extent) {
    if let Some(last) = out.last_mut() {
        let merged = match (&mut last.target, ext.target) {
            (Target::Zero, Target::Zero) => true,
            (Target::Data { fd, offset }, Target::Data { fd: f2, offset: o2 }) => {
                *fd == f2 && *offset + last.len == o2
            }
            _ => false,
        };
        if merged {
            last.len += ext.len;
            return;
        }
    }
    out.push(ext);
}

/// Per-queue buffers for decoding compressed data: bounded by the cluster size.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Compressed bytes read from the image.
    pub input: Vec<u8>,
    /// One decompressed cluster.
    pub output: Vec<u8>,
}

/// A contiguous piece of a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Where it lives.
    pub target: Target,
}

/// A host operation a backend asks for besides data transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostOp {
    /// Make everything written to `fd` durable.
    Sync {
        /// File descriptor.
        fd: RawFd,
    },
    /// Deallocate a range if the file system can; advisory (reads become unspecified-but-stable
    /// to the guest, zeroes in practice).
    Discard {
        /// File descriptor.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read as zeroes, deallocating it if `unmap` is set and the file system can.
    Zero {
        /// File descriptor.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocation is allowed.
        unmap: bool,
    },
}

/// Errors of the block layer, for one request.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The range does not fit in the disk.
    #[error("range {offset}+{len} is beyond the disk size {size}")]
    OutOfRange {
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// Write to a read-only image.
    #[error("the image is read-only")]
    ReadOnly,
    /// The image's metadata is inconsistent in the requested area.
    #[error("image corrupt: {0}")]
    Corrupt(&'static str),
    /// The image format cannot do this (yet).
    #[error("{0}")]
    Unsupported(&'static str),
    /// Another request is changing the same metadata: retry after the waker fires.
    #[error("busy: retry later")]
    Busy,
    /// A host I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Wakes a queue worker (so it retries requests that found the metadata busy).
pub trait Wake: Send + Sync {
    /// Wakes the worker.
    fn wake(&self);
}

/// A shareable [`Wake`].
pub type Waker = Arc<dyn Wake>;

/// Data a write needs besides the guest's: copy-on-write pieces or zeroes.
pub enum ExtraData {
    /// These bytes (aligned for O_DIRECT), once `reads` have filled their parts of them: the
    /// rest is already in place. The reads are left to the caller so that they can run
    /// asynchronously; each is aligned to [`FILL_ALIGN`] in file offset, buffer offset and length.
    Bytes {
        /// The bytes to write.
        buf: crate::util::aligned::AlignedBuf,
        /// Reads that complete `buf` first.
        reads: Vec<FillRead>,
    },
    /// This many zero bytes.
    Zero(u64),
}

/// Alignment of every [`FillRead`]: O_DIRECT-safe on any file system this daemon opens with it.
pub const FILL_ALIGN: u64 = 4096;

/// A read into part of an [`ExtraData::Bytes`] buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillRead {
    /// File to read.
    pub fd: RawFd,
    /// Byte offset in that file.
    pub offset: u64,
    /// Where in the buffer the bytes go.
    pub at: usize,
    /// How many bytes.
    pub len: usize,
}

impl ExtraData {
    /// Carries out the pending reads now, synchronously.
    pub fn fill_now(&mut self) -> std::io::Result<()> {
        if let ExtraData::Bytes { buf, reads } = self {
            for r in reads.drain(..) {
                file::pread_full(r.fd, &mut buf.as_mut_slice()[r.at..r.at + r.len], r.offset)?;
            }
        }
        Ok(())
    }
}

/// A piece of [`ExtraData`] and where it goes.
pub struct ExtraWrite {
    /// File descriptor.
    pub fd: RawFd,
    /// Byte offset in that file.
    pub offset: u64,
    /// What to write.
    pub data: ExtraData,
}

/// How to carry out a guest write.
#[derive(Default)]
pub struct WritePlan {
    /// Where the guest's bytes go, in order (`Data` targets only).
    pub extents: Vec<Extent>,
    /// Other writes that must complete with the guest's.
    pub extra: Vec<ExtraWrite>,
    /// When set, pass it to [`BlockBackend::commit_write`] once every write has completed.
    pub ticket: Option<u64>,
    /// The commit changes metadata: complete the write only after a
    /// [`BlockBackend::write_through`] that follows the commit.
    pub metadata: bool,
}

/// A disk image format. Implementations are shared by all queue threads.
pub trait BlockBackend: Send + Sync {
    /// Size, alignment and capabilities.
    fn info(&self) -> &BackendInfo;

    /// Appends the extents that make up `offset..offset+len` for reading.
    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError>;

    /// Plans a guest write of `offset..offset+len`: where the data goes, what else must be
    /// written, and whether metadata must be committed afterwards. [`BlockError::Busy`] means
    /// another request is allocating the same clusters: `waker` fires when it is done.
    fn begin_write(&self, offset: u64, len: u64, waker: &Waker) -> Result<WritePlan, BlockError>;

    /// Makes a planned write visible (`ok`) or undoes its reservations (a write failed).
    fn commit_write(&self, ticket: u64, ok: bool) -> Result<(), BlockError> {
        let _ = (ticket, ok);
        Ok(())
    }

    /// Writes the metadata changed since the last call (by committed writes, discards and
    /// write-zeroes, on any queue) to the image file, without syncing it: a request that changed
    /// metadata is completed only after a call that follows its change returned `Ok`, so that it
    /// survives a restart of the daemon (not a crash of the host: that takes a flush). Cheap when
    /// nothing changed. On an error the changes stay pending, and the requests must fail.
    fn write_through(&self) -> Result<(), BlockError> {
        Ok(())
    }

    /// Does any metadata work a flush needs, then appends the syncs that make all completed
    /// writes durable.
    fn flush(&self, out: &mut Vec<HostOp>) -> Result<(), BlockError>;

    /// Discards `offset..offset+len` (metadata work done here), appending host operations.
    /// `unmap_host` allows giving space back to the host file system.
    fn discard(
        &self,
        offset: u64,
        len: u64,
        unmap_host: bool,
        waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError>;

    /// Makes `offset..offset+len` read as zeroes (metadata work done here), appending host
    /// operations; `unmap` allows deallocation.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError>;

    /// Decodes the compressed cluster of a [`Target::Compressed`] extent into
    /// `scratch.output` (one whole cluster).
    fn read_compressed(
        &self,
        image: u16,
        descriptor: u64,
        scratch: &mut Scratch,
    ) -> Result<(), BlockError> {
        let _ = (image, descriptor, scratch);
        Err(BlockError::Corrupt(
            "compressed extent from a format without compression",
        ))
    }

    /// Writes back everything and makes it durable, blocking (used at shutdown).
    fn sync(&self) -> Result<(), BlockError>;
}

/// Errors opening an image: each names the problem and how to fix it where we can tell.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file system refuses O_DIRECT.
    #[error("cannot open {path} with O_DIRECT (--cache none): {source}; use --cache writeback")]
    DirectUnsupported {
        /// Image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading the image failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Image path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The qcow2 header or a table it points to is invalid.
    #[error("{path}: {source}")]
    Qcow2 {
        /// Image path.
        path: PathBuf,
        /// What is wrong.
        source: qcow2::header::HeaderError,
    },
    /// The image is valid but cannot be served as asked.
    #[error("{path}: {reason}")]
    Refused {
        /// Image path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Probing found a format we do not serve.
    #[error("{path} looks like a {found} image, which is not supported; pass --format raw to serve its bytes as a raw disk")]
    ForeignFormat {
        /// Image path.
        path: PathBuf,
        /// What the probe found.
        found: &'static str,
    },
    /// Another process uses the image, or it cannot be locked.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// O_DIRECT needs a coarser alignment than the device's logical block size.
    #[error("{path} needs {align}-byte aligned I/O with --cache none, larger than the logical block size {lbs}; use --logical-block-size {align} or --cache writeback")]
    Alignment {
        /// Image path.
        path: PathBuf,
        /// Required offset alignment.
        align: u64,
        /// Configured logical block size.
        lbs: u32,
    },
}

/// Opens an image with the format given or probed.
pub fn open(opts: &OpenOptions) -> Result<Arc<dyn BlockBackend>, OpenError> {
    let file = file::ImageFile::open(&opts.path, opts.read_only, opts.cache)?;
    let (format, probed_raw) = match opts.format {
        Some(f) => (f, false),
        None => {
            let found = probe::probe(&file.read_head().map_err(|source| OpenError::Read {
                path: opts.path.clone(),
                source,
            })?);
            match found {
                probe::Probed::Raw => {
                    warn!(
                        "{}: no --format given, probed as raw; guest writes of an image header to sector 0 will be refused (pass --format raw to allow them)",
                        opts.path.display()
                    );
                    (ImageFormat::Raw, true)
                }
                probe::Probed::Qcow2 => (ImageFormat::Qcow2, false),
                probe::Probed::Other(name) => {
                    return Err(OpenError::ForeignFormat {
                        path: opts.path.clone(),
                        found: name,
                    })
                }
            }
        }
    };
    // Before anything is written (a qcow2 open may repair the image or set its dirty bit).
    let role = match format {
        ImageFormat::Raw => lock::Role::RawImage,
        ImageFormat::Qcow2 => lock::Role::Qcow2Chain,
    };
    file.lock(lock::image_perms(role, !opts.read_only), opts.locking)?;
    if format == ImageFormat::Qcow2 {
        let q = qcow2::Qcow2Backend::open(file, opts)?;
        return Ok(Arc::new(q));
    }
    info!(
        "{}: {} image, {} bytes{}{}",
        opts.path.display(),
        format,
        file.size,
        if opts.read_only { ", read-only" } else { "" },
        if opts.cache == CacheMode::None {
            ", O_DIRECT"
        } else {
            ""
        }
    );
    Ok(Arc::new(raw::RawBackend::new(
        file,
        opts.read_only,
        probed_raw,
    )))
}

/// Checks that a range may be written: the image is writable and the range inside the disk.
pub fn check_writable(info: &BackendInfo, offset: u64, len: u64) -> Result<(), BlockError> {
    if info.read_only {
        return Err(BlockError::ReadOnly);
    }
    check_range(offset, len, info.size)
}

/// Checks a range against a disk size without overflowing.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
