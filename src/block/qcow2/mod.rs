//! qcow2 images: open and validate the image and its backing chain, map guest ranges to host
//! extents (data in the image, its data file or a backing file; zeroes; compressed clusters),
//! decompress clusters on request.
//!
//! Writes are limited to clusters that are already allocated and owned by the active image
//! (COPIED, not compressed): they go to the host cluster in place. Allocating writes, discard
//! and write-zeroes come with the write side.

pub mod cache;
pub mod check;
pub mod compress;
pub mod header;
pub mod l2;
pub mod refcount;
pub mod snapshot;

use std::collections::HashSet;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{error, info, warn};

use self::cache::L2Cache;
use self::header::{Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, OFFSET_AUTOCLEAR};
use self::l2::{L2Mapping, SubState};
use super::file::ImageFile;
use super::{
    push_extent, BackendInfo, BlockBackend, BlockError, CacheMode, Extent, HostOp, ImageFormat,
    OpenError, Scratch, Target,
};

/// Longest backing chain we follow.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Default L2 cache: QEMU's Linux default maximum.
pub const DEFAULT_L2_CACHE: u64 = 32 << 20;

/// A layer of a backing chain.
enum Layer {
    Qcow2(Box<Qcow2Image>),
    Raw(ImageFile),
}

impl Layer {
    fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.header.size,
            Layer::Raw(f) => f.size,
        }
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        match self {
            Layer::Qcow2(q) => q.map_read(offset, len, out),
            Layer::Raw(f) => {
                push_extent(
                    out,
                    Extent {
                        len,
                        target: Target::Data {
                            fd: f.file.as_raw_fd(),
                            offset,
                        },
                    },
                );
                Ok(())
            }
        }
    }
}

/// One qcow2 image of a chain.
pub struct Qcow2Image {
    path: PathBuf,
    file: ImageFile,
    data_file: Option<ImageFile>,
    header: Header,
    l1: Vec<u64>,
    cache: L2Cache,
    backing: Option<Layer>,
    /// Position in the chain (0 = the image the guest sees), to route compressed reads.
    depth: u16,
    corrupt_reported: AtomicBool,
}

/// How to open a chain.
struct ChainOptions {
    cache: CacheMode,
    l2_cache_bytes: u64,
}

impl Qcow2Image {
    fn open(
        file: ImageFile,
        read_only: bool,
        depth: u16,
        opts: &ChainOptions,
        seen: &mut HashSet<PathBuf>,
    ) -> Result<Qcow2Image, OpenError> {
        let path = file.path.clone();
        let hdr_err = |source| OpenError::Qcow2 {
            path: path.clone(),
            source,
        };
        let read_err = |source| OpenError::Read {
            path: path.clone(),
            source,
        };
        // The header, its extensions and the backing name all live in the first cluster, at most
        // 2 MiB; read that much (or the whole file if shorter).
        let head_len = file.size.min(1 << header::MAX_CLUSTER_BITS) as usize;
        let head = file.read_at(0, head_len).map_err(read_err)?;
        let header = Header::parse(&head, file.size).map_err(hdr_err)?;
        if !read_only && header.corrupt() {
            return Err(OpenError::Refused {
                path,
                reason: "the image is marked corrupt; it can only be opened with --read-only (repair with qemu-img check -r all)".into(),
            });
        }
        if !read_only && header.dirty() {
            return Err(OpenError::Refused {
                path,
                reason: "the image was not closed cleanly (dirty bit set); open it with --read-only, or repair it with qemu-img check -r all".into(),
            });
        }
        snapshot::read_table(&file, &header).map_err(hdr_err)?;
        let l1_bytes = header.l1_size as usize * 8;
        let l1 = file
            .read_at(header.l1_table_offset, l1_bytes)
            .map_err(read_err)?
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();

        let data_file = match &header.data_file {
            Some(name) if header.has_data_file() => {
                let p = dir.join(name);
                Some(ImageFile::open(&p, read_only, opts.cache)?)
            }
            _ => None,
        };
        let backing = match &header.backing_file {
            None => None,
            Some(name) => {
                if header.data_file_raw() {
                    return Err(OpenError::Refused {
                        path,
                        reason: "a raw external data file cannot have a backing file".into(),
                    });
                }
                Some(open_backing(
                    &path,
                    &dir,
                    name,
                    header.backing_format.as_deref(),
                    depth,
                    opts,
                    seen,
                )?)
            }
        };
        let needed = u64::from(header.l1_size) << header.cluster_bits;
        let cache = L2Cache::new(opts.l2_cache_bytes.min(needed.max(1)), header.cluster_bits);
        let mut img = Qcow2Image {
            path,
            file,
            data_file,
            header,
            l1,
            cache,
            backing,
            depth,
            corrupt_reported: AtomicBool::new(false),
        };
        if !read_only {
            img.clear_autoclear()?;
        }
        Ok(img)
    }

    /// On a writable open, clears autoclear bits we do not maintain: unknown ones (spec rule)
    /// and the bitmaps bit (we do not update persistent bitmaps, so they become inconsistent).
    fn clear_autoclear(&mut self) -> Result<(), OpenError> {
        let h = &self.header;
        let clear = h.autoclear & (!AUTOCLEAR_KNOWN | AUTOCLEAR_BITMAPS);
        if h.version < 3 || clear == 0 {
            return Ok(());
        }
        if clear & AUTOCLEAR_BITMAPS != 0 {
            warn!(
                "{}: persistent dirty bitmaps are not maintained; marking them inconsistent",
                self.path.display()
            );
        }
        let value = h.autoclear & !clear;
        self.file
            .write_durable(OFFSET_AUTOCLEAR, &value.to_be_bytes())
            .map_err(|source| OpenError::Read {
                path: self.path.clone(),
                source,
            })?;
        info!(
            "{}: cleared autoclear feature bits {clear:#x}",
            self.path.display()
        );
        self.header.autoclear = value;
        Ok(())
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn data_fd(&self) -> RawFd {
        self.data_file
            .as_ref()
            .unwrap_or(&self.file)
            .file
            .as_raw_fd()
    }

    fn data_file_size(&self) -> u64 {
        self.data_file.as_ref().unwrap_or(&self.file).size
    }

    /// Logs an image corruption once and returns the request error.
    fn corrupt(&self, what: &'static str) -> BlockError {
        if !self.corrupt_reported.swap(true, Ordering::Relaxed) {
            error!(
                "{}: image corrupt: {what}; requests touching damaged areas fail with I/O errors",
                self.path.display()
            );
        }
        BlockError::Corrupt(what)
    }

    /// The L2 table at `offset`, from the cache or the file.
    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>, BlockError> {
        if let Some(t) = self.cache.get(offset) {
            return Ok(t);
        }
        let cs = self.cluster_size();
        if offset.checked_add(cs).is_none_or(|e| e > self.file.size) {
            return Err(self.corrupt("L2 table past the end of the file"));
        }
        let raw = self.file.read_at(offset, cs as usize)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(self.cache.insert(offset, table))
    }

    /// The mapping of the cluster containing guest offset `offset`.
    fn lookup(&self, offset: u64) -> Result<L2Mapping, BlockError> {
        let h = &self.header;
        let cs = self.cluster_size();
        let cluster = offset >> h.cluster_bits;
        let l2_entries = h.l2_entries();
        let l1_index = (cluster / l2_entries) as usize;
        let Some(&l1e) = self.l1.get(l1_index) else {
            return Ok(L2Mapping::UNALLOCATED);
        };
        let table_offset = l2::l1_table_offset(l1e, cs).map_err(|e| self.corrupt(e))?;
        if table_offset == 0 {
            return Ok(L2Mapping::UNALLOCATED);
        }
        let table = self.l2_table(table_offset)?;
        let index = (cluster % l2_entries) as usize;
        let data_file = self.data_file.is_some();
        let mapping = if h.extended_l2() {
            l2::decode_extended(table[2 * index], table[2 * index + 1], cs, data_file)
        } else {
            l2::decode_standard(table[index], cs, data_file)
        }
        .map_err(|e| self.corrupt(e))?;
        if let L2Mapping::Standard { host, alloc, .. } = mapping {
            if alloc != 0 && host >= self.data_file_size() {
                return Err(self.corrupt("data cluster past the end of the file"));
            }
        }
        Ok(mapping)
    }

    /// Subclusters per cluster (1 without extended L2).
    fn subclusters(&self) -> u32 {
        if self.header.extended_l2() {
            32
        } else {
            1
        }
    }

    fn map_read(
        &self,
        mut offset: u64,
        mut len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let n_sub = self.subclusters();
        let sub_size = cs / u64::from(n_sub);
        while len > 0 {
            let in_cluster = offset % cs;
            let n = len.min(cs - in_cluster);
            let cluster_start = offset - in_cluster;
            match self.lookup(offset)? {
                L2Mapping::Compressed(descriptor) => push_extent(
                    out,
                    Extent {
                        len: n,
                        target: Target::Compressed {
                            image: self.depth,
                            descriptor,
                            skip: in_cluster,
                        },
                    },
                ),
                m @ L2Mapping::Standard { host, .. } => {
                    // Runs of subclusters in the same state.
                    let mut at = in_cluster;
                    let end = in_cluster + n;
                    while at < end {
                        let state = m.sub((at / sub_size) as u32);
                        let mut run_end = (at / sub_size + 1) * sub_size;
                        while run_end < end && m.sub((run_end / sub_size) as u32) == state {
                            run_end += sub_size;
                        }
                        let run_end = run_end.min(end);
                        let run = run_end - at;
                        match state {
                            SubState::Data => push_extent(
                                out,
                                Extent {
                                    len: run,
                                    target: Target::Data {
                                        fd: self.data_fd(),
                                        offset: host + at,
                                    },
                                },
                            ),
                            SubState::Zero => push_extent(
                                out,
                                Extent {
                                    len: run,
                                    target: Target::Zero,
                                },
                            ),
                            SubState::Unallocated => {
                                self.read_backing(cluster_start + at, run, out)?
                            }
                        }
                        at = run_end;
                    }
                }
            }
            offset += n;
            len -= n;
        }
        Ok(())
    }

    /// Maps a range the image does not allocate: the backing file's data, zeroes past its end or
    /// without one.
    fn read_backing(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        let zero = |len| Extent {
            len,
            target: Target::Zero,
        };
        let Some(b) = &self.backing else {
            push_extent(out, zero(len));
            return Ok(());
        };
        let available = b.size().saturating_sub(offset).min(len);
        if available > 0 {
            b.map_read(offset, available, out)?;
        }
        if available < len {
            push_extent(out, zero(len - available));
        }
        Ok(())
    }

    /// Maps an in-place write: every touched cluster must be allocated here, owned by the
    /// active image only, and (with subclusters) allocated in every touched subcluster.
    fn map_write(
        &self,
        mut offset: u64,
        mut len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let sub_size = cs / u64::from(self.subclusters());
        while len > 0 {
            let in_cluster = offset % cs;
            let n = len.min(cs - in_cluster);
            let first = (in_cluster / sub_size) as u32;
            let last = ((in_cluster + n - 1) / sub_size) as u32;
            match self.lookup(offset)? {
                m @ L2Mapping::Standard {
                    host, copied: true, ..
                } if (first..=last).all(|i| m.sub(i) == SubState::Data) => {
                    push_extent(
                        out,
                        Extent {
                            len: n,
                            target: Target::Data {
                                fd: self.data_fd(),
                                offset: host + in_cluster,
                            },
                        },
                    );
                }
                _ => {
                    return Err(BlockError::Unsupported(
                        "writes that allocate qcow2 clusters are not supported yet",
                    ))
                }
            }
            offset += n;
            len -= n;
        }
        Ok(())
    }

    /// The image at chain position `depth`.
    fn at_depth(&self, depth: u16) -> Option<&Qcow2Image> {
        let mut img = self;
        while img.depth != depth {
            match &img.backing {
                Some(Layer::Qcow2(b)) => img = b,
                _ => return None,
            }
        }
        Some(img)
    }

    fn read_compressed(&self, descriptor: u64, scratch: &mut Scratch) -> Result<(), BlockError> {
        let cs = self.cluster_size() as usize;
        let (offset, len) = l2::compressed_range(descriptor, self.header.cluster_bits);
        if offset >= self.file.size || offset == 0 {
            return Err(self.corrupt("compressed cluster outside the file"));
        }
        // Bounded by the descriptor format: at most twice the cluster size.
        let len = len.min(self.file.size - offset) as usize;
        scratch.input.resize(len, 0);
        self.file.read_into(offset, &mut scratch.input)?;
        scratch.output.resize(cs, 0);
        compress::decompress_cluster(self.header.compression, &scratch.input, &mut scratch.output)
            .map_err(|e| self.corrupt(e))
    }

    fn files(&self) -> Vec<&ImageFile> {
        let mut v = vec![&self.file];
        v.extend(self.data_file.as_ref());
        match &self.backing {
            Some(Layer::Qcow2(b)) => v.extend(b.files()),
            Some(Layer::Raw(f)) => v.push(f),
            None => {}
        }
        v
    }
}

fn open_backing(
    image: &Path,
    dir: &Path,
    name: &str,
    format: Option<&str>,
    depth: u16,
    opts: &ChainOptions,
    seen: &mut HashSet<PathBuf>,
) -> Result<Layer, OpenError> {
    let refuse = |reason: String| OpenError::Refused {
        path: image.to_owned(),
        reason,
    };
    let Some(format) = format else {
        return Err(refuse(format!(
            "backing file {name} has no recorded format, and formats are never probed; record it with: qemu-img rebase -u -F <raw|qcow2> -b {name} {}",
            image.display()
        )));
    };
    if usize::from(depth) + 1 >= MAX_CHAIN_DEPTH {
        return Err(refuse(format!(
            "backing chain deeper than {MAX_CHAIN_DEPTH}"
        )));
    }
    let path = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        dir.join(name)
    };
    let canonical = std::fs::canonicalize(&path).map_err(|source| OpenError::Open {
        path: path.clone(),
        source,
    })?;
    if !seen.insert(canonical) {
        return Err(refuse(format!(
            "backing chain loops back to {}",
            path.display()
        )));
    }
    let file = ImageFile::open(&path, true, opts.cache)?;
    match format {
        "raw" => Ok(Layer::Raw(file)),
        "qcow2" => Ok(Layer::Qcow2(Box::new(Qcow2Image::open(
            file,
            true,
            depth + 1,
            opts,
            seen,
        )?))),
        other => Err(refuse(format!(
            "backing file format {other:?} is not supported (raw, qcow2)"
        ))),
    }
}

/// A qcow2 image with its chain, as a block backend.
pub struct Qcow2Backend {
    top: Qcow2Image,
    info: BackendInfo,
}

impl Qcow2Backend {
    /// Opens a qcow2 image and everything it references.
    pub fn open(
        file: ImageFile,
        read_only: bool,
        cache: CacheMode,
        l2_cache: Option<u64>,
    ) -> Result<Self, OpenError> {
        let opts = ChainOptions {
            cache,
            l2_cache_bytes: l2_cache.unwrap_or(DEFAULT_L2_CACHE),
        };
        let mut seen = HashSet::new();
        if let Ok(c) = std::fs::canonicalize(&file.path) {
            seen.insert(c);
        }
        let top = Qcow2Image::open(file, read_only, 0, &opts, &mut seen)?;
        let files = top.files();
        let info = BackendInfo {
            size: top.header.size,
            read_only,
            format: ImageFormat::Qcow2,
            probed_raw: false,
            mem_align: files.iter().map(|f| f.mem_align).max().unwrap_or(1),
            offset_align: files.iter().map(|f| f.offset_align).max().unwrap_or(1),
            opt_io_size: 0,
        };
        let h = &top.header;
        info!(
            "{}: qcow2 v{}, {} KiB clusters{}, {}-bit refcounts, {} compression{}{}{}",
            top.path.display(),
            h.version,
            h.cluster_size() / 1024,
            if h.extended_l2() { ", extended L2" } else { "" },
            h.refcount_bits(),
            h.compression,
            h.backing_file
                .as_ref()
                .map(|b| format!(", backing {b}"))
                .unwrap_or_default(),
            h.data_file
                .as_ref()
                .map(|d| format!(", data file {d}"))
                .unwrap_or_default(),
            if h.nb_snapshots > 0 {
                format!(", {} snapshots", h.nb_snapshots)
            } else {
                String::new()
            },
        );
        Ok(Qcow2Backend { top, info })
    }

    fn syncs(&self, out: &mut Vec<HostOp>) {
        out.push(HostOp::Sync {
            fd: self.top.file.file.as_raw_fd(),
        });
        if let Some(d) = &self.top.data_file {
            out.push(HostOp::Sync {
                fd: d.file.as_raw_fd(),
            });
        }
    }
}

impl BlockBackend for Qcow2Backend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        super::check_range(offset, len, self.info.size)?;
        self.top.map_read(offset, len, out)
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        super::check_range(offset, len, self.info.size)?;
        self.top.map_write(offset, len, out)
    }

    fn flush(&self, out: &mut Vec<HostOp>) -> Result<(), BlockError> {
        if !self.info.read_only {
            self.syncs(out);
        }
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64, _out: &mut Vec<HostOp>) -> Result<(), BlockError> {
        Err(BlockError::Unsupported(
            "discard on qcow2 images is not supported yet",
        ))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _unmap: bool,
        _out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        Err(BlockError::Unsupported(
            "write-zeroes on qcow2 images is not supported yet",
        ))
    }

    fn read_compressed(
        &self,
        image: u16,
        descriptor: u64,
        scratch: &mut Scratch,
    ) -> Result<(), BlockError> {
        self.top
            .at_depth(image)
            .ok_or(BlockError::Corrupt("compressed extent of an unknown image"))?
            .read_compressed(descriptor, scratch)
    }

    fn sync(&self) -> Result<(), BlockError> {
        if !self.info.read_only {
            self.top.file.file.sync_data()?;
            if let Some(d) = &self.top.data_file {
                d.file.sync_data()?;
            }
        }
        Ok(())
    }
}
