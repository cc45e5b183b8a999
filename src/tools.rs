//! The image tools of the same binary: `info`, `check` and `create`, with qemu-img's semantics
//! and exit codes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::block::file::ImageFile;
use crate::block::lock::{self, Locking, Perms, Role};
use crate::block::qcow2::check::{self, CheckResult, Repair};
use crate::block::qcow2::header::{
    Header, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, INCOMPAT_EXTL2,
    QCOW2_MAGIC,
};
use crate::block::qcow2::refcount::Refcounts;
use crate::block::{probe, CacheMode};

/// Errors of the tools (one line each).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The image cannot be opened or read.
    #[error(transparent)]
    Open(#[from] crate::block::OpenError),
    /// An invalid qcow2 header.
    #[error("{path}: {source}")]
    Header {
        /// Image path.
        path: PathBuf,
        /// What is wrong.
        source: crate::block::qcow2::header::HeaderError,
    },
    /// Invalid creation options.
    #[error("{0}")]
    Options(String),
    /// Writing the new image failed.
    #[error("{path}: {source}")]
    Io {
        /// Image path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON, with qemu-img's field names.
    Json,
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Opens an image for a tool; qcow2 images get `perms` locked (qemu-img's locks) unless
/// `locking` is off.
fn open_qcow2(
    path: &Path,
    read_only: bool,
    perms: Perms,
    locking: Locking,
) -> Result<(ImageFile, Option<Header>), ToolError> {
    let file = ImageFile::open(path, read_only, CacheMode::Writeback)?;
    let head = file
        .read_at(0, file.size.min(2 << 20) as usize)
        .map_err(|source| ToolError::Io {
            path: path.to_owned(),
            source,
        })?;
    if probe::probe(&head) != probe::Probed::Qcow2 {
        return Ok((file, None));
    }
    file.lock(perms, locking)?;
    let h = Header::parse(&head, file.size).map_err(|source| ToolError::Header {
        path: path.to_owned(),
        source,
    })?;
    Ok((file, Some(h)))
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The locks of a tool: `qemu-img info` reads no data but, like every qcow2 user, lets nobody
/// write or resize the file under it; `check` reads (and with a repair writes) like a
/// read-only (writable) qcow2 user. `force_share` (qemu-img's `-U`) takes none.
fn tool_locking(force_share: bool) -> Locking {
    if force_share {
        Locking::Off
    } else {
        Locking::Auto
    }
}

/// `info`: prints what the image is.
pub fn info(path: &Path, output: Output, force_share: bool) -> Result<String, ToolError> {
    let perms = Perms {
        perm: 0,
        shared: lock::CONSISTENT_READ | lock::WRITE_UNCHANGED,
    };
    let (file, header) = open_qcow2(path, true, perms, tool_locking(force_share))?;
    let name = path.display().to_string();
    let disk = allocated_bytes(path);
    let Some(h) = header else {
        return Ok(match output {
            Output::Json => format!(
                "{{\n    \"virtual-size\": {},\n    \"filename\": {},\n    \"format\": \"raw\",\n    \"actual-size\": {disk},\n    \"dirty-flag\": false\n}}\n",
                file.size,
                json_str(&name)
            ),
            Output::Human => format!(
                "image: {name}\nfile format: raw\nvirtual size: {} bytes\ndisk size: {disk} bytes\n",
                file.size
            ),
        });
    };
    let compat = if h.version == 2 { "0.10" } else { "1.1" };
    let lazy = h.compatible & COMPAT_LAZY_REFCOUNTS != 0;
    let compression = match h.compression {
        crate::block::qcow2::header::CompressionType::Deflate => "zlib",
        crate::block::qcow2::header::CompressionType::Zstd => "zstd",
    };
    Ok(match output {
        Output::Json => {
            let mut s = String::from("{\n");
            let _ = writeln!(s, "    \"virtual-size\": {},", h.size);
            let _ = writeln!(s, "    \"filename\": {},", json_str(&name));
            let _ = writeln!(s, "    \"cluster-size\": {},", h.cluster_size());
            let _ = writeln!(s, "    \"format\": \"qcow2\",");
            let _ = writeln!(s, "    \"actual-size\": {disk},");
            if let Some(b) = &h.backing_file {
                let _ = writeln!(s, "    \"backing-filename\": {},", json_str(b));
                if let Some(f) = &h.backing_format {
                    let _ = writeln!(s, "    \"backing-filename-format\": {},", json_str(f));
                }
            }
            let _ = writeln!(s, "    \"snapshots\": {},", h.nb_snapshots);
            let _ = writeln!(
                s,
                "    \"format-specific\": {{\n        \"type\": \"qcow2\",\n        \"data\": {{\n            \"compat\": \"{compat}\",\n            \"compression-type\": \"{compression}\",\n            \"lazy-refcounts\": {lazy},\n            \"refcount-bits\": {},\n            \"corrupt\": {},\n            \"extended-l2\": {}{}\n        }}\n    }},",
                h.refcount_bits(),
                h.corrupt(),
                h.extended_l2(),
                h.data_file
                    .as_ref()
                    .map(|d| format!(",\n            \"data-file\": {},\n            \"data-file-raw\": {}", json_str(d), h.data_file_raw()))
                    .unwrap_or_default()
            );
            let _ = writeln!(s, "    \"dirty-flag\": {}", h.dirty());
            s.push_str("}\n");
            s
        }
        Output::Human => {
            let mut s = String::new();
            let _ = writeln!(s, "image: {name}");
            let _ = writeln!(s, "file format: qcow2");
            let _ = writeln!(s, "virtual size: {} bytes", h.size);
            let _ = writeln!(s, "disk size: {disk} bytes");
            let _ = writeln!(s, "cluster_size: {}", h.cluster_size());
            if let Some(b) = &h.backing_file {
                let _ = writeln!(s, "backing file: {b}");
                if let Some(f) = &h.backing_format {
                    let _ = writeln!(s, "backing file format: {f}");
                }
            }
            if h.nb_snapshots > 0 {
                let _ = writeln!(s, "snapshots: {}", h.nb_snapshots);
            }
            let _ = writeln!(s, "Format specific information:");
            let _ = writeln!(s, "    compat: {compat}");
            let _ = writeln!(s, "    compression type: {compression}");
            let _ = writeln!(s, "    lazy refcounts: {lazy}");
            let _ = writeln!(s, "    refcount bits: {}", h.refcount_bits());
            let _ = writeln!(s, "    corrupt: {}", h.corrupt());
            let _ = writeln!(s, "    extended l2: {}", h.extended_l2());
            if let Some(d) = &h.data_file {
                let _ = writeln!(s, "    data file: {d}");
                let _ = writeln!(s, "    data file raw: {}", h.data_file_raw());
            }
            let _ = writeln!(
                s,
                "cleanly shut down: {}",
                if h.dirty() { "no" } else { "yes" }
            );
            s
        }
    })
}

/// `check`: the report to print and the exit status (qemu-img's: 0 clean, 1 check failed,
/// 2 corruptions, 3 leaks only, 63 format without checks).
pub fn check(
    path: &Path,
    repair: Repair,
    output: Output,
    force_share: bool,
) -> Result<(String, u8), ToolError> {
    let read_only = repair == Repair::None;
    let perms = lock::image_perms(Role::Qcow2Chain, !read_only);
    let (file, header) = open_qcow2(path, read_only, perms, tool_locking(force_share))?;
    let Some(h) = header else {
        return Ok(("This image format does not support checks\n".into(), 63));
    };
    let res = check::check(&file, &h, repair);
    let text = match output {
        Output::Human => check::report(&res),
        Output::Json => check_json(&res, &path.display().to_string()),
    };
    Ok((text, res.exit_code()))
}

fn check_json(r: &CheckResult, name: &str) -> String {
    format!(
        "{{\n    \"image-end-offset\": {},\n    \"total-clusters\": {},\n    \"check-errors\": {},\n    \"leaks\": {},\n    \"leaks-fixed\": {},\n    \"corruptions\": {},\n    \"corruptions-fixed\": {},\n    \"allocated-clusters\": {},\n    \"fragmented-clusters\": {},\n    \"compressed-clusters\": {},\n    \"filename\": {},\n    \"format\": \"qcow2\"\n}}\n",
        r.image_end_offset,
        r.total_clusters,
        r.check_errors,
        r.remaining_leaks(),
        r.leaks_fixed,
        r.remaining_corruptions(),
        r.corruptions_fixed,
        r.allocated_clusters,
        r.fragmented_clusters,
        r.compressed_clusters,
        json_str(name)
    )
}

/// What `create` makes.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Set the lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Backing file name as stored in the image.
    pub backing: Option<String>,
    /// Its format.
    pub backing_format: Option<String>,
}

const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// `create`: a new, empty qcow2 v3 image laid out as QEMU lays it out.
pub fn create(path: &Path, o: &CreateOptions) -> Result<(), ToolError> {
    let bad = |m: String| ToolError::Options(m);
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(bad(format!(
            "cluster size {cs} must be a power of two between 512 and 2M"
        )));
    }
    if o.extended_l2 && cs < 16384 {
        return Err(bad(
            "extended L2 entries need a cluster size of at least 16k".into(),
        ));
    }
    if o.size % 512 != 0 {
        return Err(bad(format!("size {} is not a multiple of 512", o.size)));
    }
    let backing_format = match (&o.backing, &o.backing_format) {
        (Some(_), Some(f)) if f == "raw" || f == "qcow2" => Some(f.clone()),
        (Some(_), Some(f)) => {
            return Err(bad(format!(
                "backing format {f} is not supported (raw, qcow2)"
            )))
        }
        (Some(_), None) => {
            return Err(bad(
                "--backing needs --backing-format (formats are never probed)".into(),
            ))
        }
        (None, Some(_)) => return Err(bad("--backing-format needs --backing".into())),
        (None, None) => None,
    };
    if let Some(b) = &o.backing {
        let dir = path.parent().unwrap_or(Path::new("."));
        let p = if Path::new(b).is_absolute() {
            PathBuf::from(b)
        } else {
            dir.join(b)
        };
        if !p.exists() {
            return Err(bad(format!("backing file {} does not exist", p.display())));
        }
        if b.len() > 1023 {
            return Err(bad("backing file name longer than 1023 bytes".into()));
        }
    }
    let cluster_bits = cs.trailing_zeros();
    let entry_size = if o.extended_l2 { 16 } else { 8 };
    let l1_size = o.size.div_ceil(cs * (cs / entry_size));
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);

    // Header fields, extensions, backing name.
    let mut head = vec![0u8; 112];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut head, 0, QCOW2_MAGIC);
    put32(&mut head, 4, 3);
    put32(&mut head, 20, cluster_bits);
    put64(&mut head, 24, o.size);
    put32(&mut head, 36, l1_size as u32);
    put64(
        &mut head,
        72,
        if o.extended_l2 { INCOMPAT_EXTL2 } else { 0 },
    );
    put64(
        &mut head,
        80,
        if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
    );
    put32(&mut head, 96, 4);
    put32(&mut head, 100, 112);
    let ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(8), 0);
    };
    if let Some(f) = &backing_format {
        ext(&mut head, EXT_BACKING_FORMAT, f.as_bytes());
    }
    let mut names = Vec::new();
    for &(kind, bit, name) in FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        names.extend_from_slice(&e);
    }
    ext(&mut head, EXT_FEATURE_NAMES, &names);
    head.extend_from_slice(&[0u8; 8]);
    if let Some(b) = &o.backing {
        let at = head.len() as u64;
        put64(&mut head, 8, at);
        put32(&mut head, 16, b.len() as u32);
        head.extend_from_slice(b.as_bytes());
    }
    if head.len() as u64 > cs {
        return Err(bad(
            "the header does not fit in one cluster; use a larger cluster size".into(),
        ));
    }

    // Layout: header, refcount table and block, L1 table; refcounts from the allocator.
    let io = |source| ToolError::Io {
        path: path.to_owned(),
        source,
    };
    let proto = Header::parse(
        &{
            let mut h = head.clone();
            h.resize(cs as usize, 0);
            // A provisional layout so the header validates: refcount table at cluster 1.
            put64(&mut h, 48, cs);
            put32(&mut h, 56, 1);
            put64(&mut h, 40, 3 * cs);
            h
        },
        (4 + l1_clusters) * cs,
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut r = Refcounts::empty(&proto, 1);
    r.set(0, 1).map_err(|e| bad(e.to_string()))?;
    let l1 = r.alloc(l1_clusters).map_err(|e| bad(e.to_string()))?;
    put64(&mut head, 40, l1 * cs);
    put64(&mut head, 48, r.table_offset);
    put32(&mut head, 56, r.table_clusters);
    head.resize(cs as usize, 0);

    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    f.set_len(r.end * cs).map_err(io)?;
    drop(f);
    let file = ImageFile::open(path, false, CacheMode::Writeback)?;
    file.write_at(0, &head).map_err(io)?;
    check::write_back(&file, &mut r).map_err(io)?;
    Ok(())
}
