//! qcow2 images: open and validate the image and its backing chain, map guest ranges to host
//! extents (data in the image, its data file or a backing file; zeroes; compressed clusters),
//! decompress clusters on request.
//!
//! Writes (see `write.rs`) go in place to clusters the active image owns, or allocate: new
//! clusters from the in-memory refcounts, copy-on-write of what the write does not cover only
//! where it is needed (subcluster-aware with extended L2), metadata made visible after the data
//! is written, written back at flush, with lazy refcounts by default.

pub mod bitmaps;
pub mod cache;
pub mod check;
pub mod compress;
pub mod header;
pub mod l2;
pub mod refcount;
pub mod snapshot;
mod write;

use std::collections::HashSet;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use log::{error, info, warn};

use self::cache::{L2Cache, L2Table};
use self::header::{Header, AUTOCLEAR_KNOWN, OFFSET_AUTOCLEAR};
use self::l2::{L2Mapping, SubState};
use super::file::ImageFile;
use super::lock::{image_perms, Locking, Role};
use super::{
    push_extent, BackendInfo, BlockBackend, BlockError, CacheMode, Extent, HostOp, ImageFormat,
    LazyRefcounts, OpenError, OpenOptions, Scratch, Target, Waker, WritePlan,
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
    l1: RwLock<Vec<u64>>,
    cache: L2Cache,
    backing: Option<Layer>,
    /// Position in the chain (0 = the image the guest sees), to route compressed reads.
    depth: u16,
    corrupt_reported: AtomicBool,
    /// Allocation state of the active image when it is writable.
    writable: Option<write::Writable>,
}

/// How to open a chain.
struct ChainOptions {
    cache: CacheMode,
    l2_cache_bytes: u64,
    lazy: LazyRefcounts,
    locking: Locking,
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
        let header = if !read_only && header.dirty() {
            // Not closed cleanly (lazy refcounts): rebuild refcounts as `check -r all` would.
            let res = check::check(&file, &header, check::Repair::All);
            if res.remaining_corruptions() > 0 || res.check_errors > 0 {
                return Err(OpenError::Refused {
                    path,
                    reason: format!(
                        "the image was not closed cleanly and could not be repaired ({} corruptions left); try qemu-img check -r all",
                        res.remaining_corruptions()
                    ),
                });
            }
            warn!(
                "{}: not closed cleanly; repaired {} leaked clusters and {} corruptions",
                path.display(),
                res.leaks_fixed,
                res.corruptions_fixed
            );
            let head = file.read_at(0, head_len).map_err(read_err)?;
            Header::parse(&head, file.size).map_err(hdr_err)?
        } else {
            header
        };
        snapshot::read_table(&file, &header).map_err(hdr_err)?;
        let l1_bytes = header.l1_size as usize * 8;
        let l1 = file
            .read_at(header.l1_table_offset, l1_bytes)
            .map_err(read_err)?
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect::<Vec<u64>>();
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();

        let data_file = match &header.data_file {
            Some(name) if header.has_data_file() => {
                let p = dir.join(name);
                let f = ImageFile::open(&p, read_only, opts.cache)?;
                f.lock(image_perms(Role::Qcow2Chain, !read_only), opts.locking)?;
                Some(f)
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
        let cache = L2Cache::new(
            opts.l2_cache_bytes.min(needed.max(1)),
            header.cluster_bits,
            write_block(&file, header.cluster_size()),
            opts.l2_cache_bytes >= needed,
        );
        let mut img = Qcow2Image {
            path,
            file,
            data_file,
            header,
            l1: RwLock::new(l1),
            cache,
            backing,
            depth,
            corrupt_reported: AtomicBool::new(false),
            writable: None,
        };
        if !read_only {
            img.clear_autoclear()?;
            img.make_writable(opts.lazy)?;
        }
        Ok(img)
    }

    /// On a writable open, clears the autoclear bits we do not know (spec rule).
    fn clear_autoclear(&mut self) -> Result<(), OpenError> {
        let h = &self.header;
        let clear = h.autoclear & !AUTOCLEAR_KNOWN;
        if h.version < 3 || clear == 0 {
            return Ok(());
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

    fn make_writable(&mut self, lazy: LazyRefcounts) -> Result<(), OpenError> {
        let v3 = self.header.version >= 3;
        let lazy = match lazy {
            LazyRefcounts::Auto => v3,
            LazyRefcounts::On if !v3 => {
                return Err(OpenError::Refused {
                    path: self.path.clone(),
                    reason: "lazy refcounts need a version 3 image".into(),
                })
            }
            LazyRefcounts::On => true,
            LazyRefcounts::Off => false,
        };
        let refcounts = refcount::Refcounts::load(&self.file, &self.header).map_err(|e| {
            OpenError::Refused {
                path: self.path.clone(),
                reason: format!("{e}; repair it with `vhost-device-blk check --repair all`"),
            }
        })?;
        // Allocation trusts the refcounts: a metadata cluster counted as free would be handed
        // to guest data and overwritten (QEMU's overlap checks guard the same case).
        if let Some(c) = self.unreferenced_metadata(&refcounts) {
            return Err(OpenError::Refused {
                path: self.path.clone(),
                reason: format!(
                    "metadata cluster {c} has refcount 0; repair it with `vhost-device-blk check --repair all`"
                ),
            });
        }
        let regular = self.file.file.metadata().is_ok_and(|m| m.is_file());
        self.writable = Some(write::Writable::new(
            refcounts,
            lazy,
            self.header.cluster_bits,
            match (regular && self.data_file.is_none(), self.file.direct) {
                (false, _) => write::Grow::No,
                (true, false) => write::Grow::Hole,
                (true, true) => write::Grow::Reserve,
            },
            &self.file,
        ));
        if self.header.bitmaps.is_some() {
            self.drop_bitmaps()?;
        }
        Ok(())
    }

    /// The first cluster of the header, refcount table, refcount blocks, L1 table or an L2
    /// table inside the file whose refcount is 0 (references past the end of the file are
    /// reported as corruption when used).
    fn unreferenced_metadata(&self, refcounts: &refcount::Refcounts) -> Option<u64> {
        let h = &self.header;
        let cb = h.cluster_bits;
        let file_clusters = self.file.size.div_ceil(h.cluster_size());
        let span = |offset: u64, bytes: u64| {
            let first = offset >> cb;
            first..first + bytes.div_ceil(h.cluster_size())
        };
        let tables = span(0, 1)
            .chain(span(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) << cb,
            ))
            .chain(span(h.l1_table_offset, u64::from(h.l1_size) * 8));
        let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
        let blocks = refcounts
            .table
            .iter()
            .map(|&e| (e & l2::OFFSET_MASK) >> cb)
            .filter(|&c| c != 0);
        let l2 = l1
            .iter()
            .map(|&e| e & l2::OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o >> cb);
        tables
            .chain(blocks)
            .chain(l2)
            .find(|&c| c < file_clusters && refcounts.get(c) == 0)
    }

    /// Removes persistent bitmaps we cannot keep up to date: header extension, autoclear bit
    /// and clusters.
    fn drop_bitmaps(&mut self) -> Result<(), OpenError> {
        let io = |source| OpenError::Read {
            path: self.path.clone(),
            source,
        };
        let clusters = bitmaps::clusters(&self.file, &self.header).map_err(io)?;
        let cs = self.cluster_size();
        let head = self.file.read_at(0, cs as usize).map_err(io)?;
        let new_head = bitmaps::header_without_bitmaps(&head, &self.header);
        // A crash after this is repaired like any other (lazy refcounts): leaked clusters.
        self.mark_dirty_for_open().map_err(|e| OpenError::Refused {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.file.write_durable(0, &new_head).map_err(io)?;
        let dirty = self.header.incompatible;
        self.header =
            Header::parse(&new_head, self.file.size).map_err(|source| OpenError::Qcow2 {
                path: self.path.clone(),
                source,
            })?;
        // The new header carries the on-disk incompatible bits (the dirty bit just set); keep
        // the clean value to restore at close.
        self.header.incompatible = dirty;
        self.free_clusters(&clusters);
        warn!(
            "{}: persistent dirty bitmaps are not supported; removed them ({} clusters freed)",
            self.path.display(),
            clusters.iter().map(|c| c.1).sum::<u64>()
        );
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

    fn data_file_end(&self) -> u64 {
        match &self.data_file {
            // A data file is addressed by guest offset: any offset inside the disk is valid.
            Some(d) => d.size.max(self.header.size),
            None => self.file_end(),
        }
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
    fn l2_table(&self, offset: u64) -> Result<Arc<L2Table>, BlockError> {
        if let Some(t) = self.cache.get(offset) {
            return Ok(t);
        }
        let cs = self.cluster_size();
        if offset.checked_add(cs).is_none_or(|e| e > self.file_end()) {
            return Err(self.corrupt("L2 table past the end of the file"));
        }
        let raw = self.file.read_at(offset, cs as usize)?;
        let entries: Box<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(self.cache.insert(self.cache.table(offset, entries, false)))
    }

    /// End of the image file as far as metadata may point (it grows as clusters are allocated).
    fn file_end(&self) -> u64 {
        match &self.writable {
            Some(w) => w.end_bytes(),
            None => self.file.size,
        }
    }

    /// The L1 entry at `index` (0 past the table).
    fn l1_entry(&self, index: usize) -> u64 {
        self.l1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index)
            .copied()
            .unwrap_or(0)
    }

    /// The mapping of the cluster containing guest offset `offset`.
    fn lookup(&self, offset: u64) -> Result<L2Mapping, BlockError> {
        let h = &self.header;
        let cs = self.cluster_size();
        let cluster = offset >> h.cluster_bits;
        let l2_entries = h.l2_entries();
        let l1e = self.l1_entry((cluster / l2_entries) as usize);
        let table_offset = l2::l1_table_offset(l1e, cs).map_err(|e| self.corrupt(e))?;
        if table_offset == 0 {
            return Ok(L2Mapping::UNALLOCATED);
        }
        let table = self.l2_table(table_offset)?;
        let index = (cluster % l2_entries) as usize;
        let data_file = self.data_file.is_some();
        let mapping = {
            let t = table.read();
            if h.extended_l2() {
                l2::decode_extended(t[2 * index], t[2 * index + 1], cs, data_file)
            } else {
                l2::decode_standard(t[index], cs, data_file)
            }
        }
        .map_err(|e| self.corrupt(e))?;
        if let L2Mapping::Standard { host, alloc, .. } = mapping {
            if alloc != 0 && host >= self.data_file_end() {
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

/// The unit in which changed metadata is written: a page with the page cache (a whole page is
/// written without reading it first), the O_DIRECT alignment otherwise; at most a cluster.
fn write_block(file: &ImageFile, cluster_size: u64) -> u64 {
    let block = if file.direct {
        file.offset_align.max(file.mem_align as u64).max(512)
    } else {
        4096
    };
    block.min(cluster_size)
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
    file.lock(image_perms(Role::Qcow2Chain, false), opts.locking)?;
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
    pub fn open(file: ImageFile, o: &OpenOptions) -> Result<Self, OpenError> {
        let opts = ChainOptions {
            cache: o.cache,
            l2_cache_bytes: o.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE),
            lazy: o.lazy_refcounts,
            locking: o.locking,
        };
        let read_only = o.read_only;
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
            "{}: qcow2 v{}, {} KiB clusters{}, {}-bit refcounts, {} compression{}{}{}{}",
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
            match &top.writable {
                Some(w) if w.lazy() => ", lazy refcounts",
                Some(_) => ", eager refcounts",
                None => "",
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

    /// Writes zeroes to `offset..offset+len` as data (parts of write-zeroes that do not cover
    /// whole (sub)clusters), synchronously; skips what already reads as zeroes.
    fn zero_data(&self, offset: u64, len: u64, waker: &Waker) -> Result<(), BlockError> {
        let mut ext = Vec::new();
        self.top.map_read(offset, len, &mut ext)?;
        if ext.iter().all(|e| e.target == Target::Zero) {
            return Ok(());
        }
        let plan = self.top.begin_write(offset, len, waker)?;
        let mut result = Ok(());
        let zero = |fd, offset, len| super::ExtraWrite {
            fd,
            offset,
            data: super::ExtraData::Zero(len),
        };
        let writes = plan
            .extents
            .iter()
            .filter_map(|e| match e.target {
                Target::Data { fd, offset } => Some(zero(fd, offset, e.len)),
                _ => None,
            })
            .chain(plan.extra);
        for mut w in writes {
            if let Err(e) = w
                .data
                .fill_now()
                .map_err(BlockError::from)
                .and_then(|()| write_extra(&w))
            {
                result = Err(e);
                break;
            }
        }
        if let Some(t) = plan.ticket {
            self.top.commit_write(t, result.is_ok())?;
        }
        result
    }
}

/// Writes an [`super::ExtraWrite`] synchronously.
fn write_extra(w: &super::ExtraWrite) -> Result<(), BlockError> {
    use crate::util::aligned::{zero_block, ZERO_BLOCK_LEN};
    let iov: Vec<libc::iovec> = match &w.data {
        super::ExtraData::Bytes { buf: b, .. } => vec![libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }],
        super::ExtraData::Zero(len) => (0..len.div_ceil(ZERO_BLOCK_LEN as u64))
            .map(|i| libc::iovec {
                iov_base: zero_block().as_ptr() as *mut libc::c_void,
                iov_len: (len - i * ZERO_BLOCK_LEN as u64).min(ZERO_BLOCK_LEN as u64) as usize,
            })
            .collect(),
    };
    for chunk in iov.chunks(crate::io::MAX_IOVECS).scan(w.offset, |at, c| {
        let start = *at;
        *at += c.iter().map(|v| v.iov_len as u64).sum::<u64>();
        Some((start, c.to_vec()))
    }) {
        let mut op = crate::io::IoOp {
            fd: w.fd,
            offset: chunk.0,
            kind: crate::io::OpKind::Write,
            iov: chunk.1,
            tag: 0,
        };
        let r = crate::io::sys::execute(&mut op);
        if r < 0 {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(-r)));
        }
    }
    Ok(())
}

impl BlockBackend for Qcow2Backend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        super::check_range(offset, len, self.info.size)?;
        self.top.map_read(offset, len, out)
    }

    fn begin_write(&self, offset: u64, len: u64, waker: &Waker) -> Result<WritePlan, BlockError> {
        super::check_writable(&self.info, offset, len)?;
        if len == 0 {
            return Ok(WritePlan::default());
        }
        self.top.begin_write(offset, len, waker)
    }

    fn commit_write(&self, ticket: u64, ok: bool) -> Result<(), BlockError> {
        self.top.commit_write(ticket, ok)
    }

    fn write_through(&self) -> Result<(), BlockError> {
        self.top.write_through()
    }

    fn flush(&self, out: &mut Vec<HostOp>) -> Result<(), BlockError> {
        if !self.info.read_only {
            self.top.write_back(false)?;
            self.syncs(out);
        }
        Ok(())
    }

    fn discard(
        &self,
        offset: u64,
        len: u64,
        unmap_host: bool,
        waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        super::check_writable(&self.info, offset, len)?;
        let mut partial = Vec::new();
        self.top
            .discard_range(offset, len, false, unmap_host, waker, &mut partial, out)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        waker: &Waker,
        out: &mut Vec<HostOp>,
    ) -> Result<(), BlockError> {
        super::check_writable(&self.info, offset, len)?;
        let mut partial = Vec::new();
        self.top
            .discard_range(offset, len, true, unmap, waker, &mut partial, out)?;
        for (o, l) in partial {
            self.zero_data(o, l, waker)?;
        }
        Ok(())
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
            self.top.write_back(true)?;
        }
        Ok(())
    }
}
