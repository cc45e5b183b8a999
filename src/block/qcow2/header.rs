//! The qcow2 header and its extensions (docs/interop/qcow2.rst), decoded from big-endian bytes and
//! validated against the spec and QEMU's limits before anything else is read.

use std::fmt;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Smallest and largest cluster_bits QEMU accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// 2 MiB clusters (QEMU's `MAX_CLUSTER_BITS`).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest L1 table (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Non-default compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit we understand.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature: persistent bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Autoclear bits we understand.
pub const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Byte offset of the incompatible features field (v3).
pub const OFFSET_INCOMPATIBLE: u64 = 72;
/// Byte offset of the autoclear features field (v3).
pub const OFFSET_AUTOCLEAR: u64 = 88;

/// Compression algorithms (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, 4 KiB window.
    Deflate,
    /// zstd frames.
    Zstd,
}

/// Why a header is refused; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than a v2 header.
    #[error("file too short for a qcow2 header")]
    TooShort,
    /// Wrong magic.
    #[error("not a qcow2 image (bad magic)")]
    Magic,
    /// Unsupported version.
    #[error("unsupported qcow2 version {0} (2 and 3 are supported)")]
    Version(u32),
    /// cluster_bits out of range.
    #[error("cluster_bits {0} is out of range (9-21)")]
    ClusterBits(u32),
    /// header_length invalid.
    #[error(
        "header_length {0} is invalid (a multiple of 8, at least 104, within the first cluster)"
    )]
    HeaderLength(u32),
    /// Encrypted image.
    #[error(
        "encrypted images are not supported (crypt_method {0}); decrypt with qemu-img convert"
    )]
    Encrypted(u32),
    /// L1 table too large or misplaced.
    #[error("L1 table invalid: {0}")]
    L1(&'static str),
    /// Refcount table too large or misplaced.
    #[error("refcount table invalid: {0}")]
    RefcountTable(&'static str),
    /// refcount_order out of range.
    #[error("refcount_order {0} is out of range (0-6)")]
    RefcountOrder(u32),
    /// Snapshot table header fields invalid.
    #[error("snapshot table invalid: {0}")]
    Snapshots(&'static str),
    /// Backing file name invalid.
    #[error("backing file name invalid: {0}")]
    BackingName(&'static str),
    /// Unknown incompatible features.
    #[error("unsupported incompatible qcow2 feature(s): {0}")]
    IncompatibleFeatures(String),
    /// Compression type invalid or inconsistent with the feature bit.
    #[error("compression_type {0} is invalid or does not match the incompatible feature bit")]
    CompressionType(u8),
    /// Extended L2 entries with too small clusters.
    #[error("extended L2 entries need clusters of at least 16 KiB (cluster_bits {0})")]
    ExtendedL2ClusterBits(u32),
    /// A header extension is malformed.
    #[error("header extension {kind:#010x} invalid: {reason}")]
    Extension {
        /// Extension type.
        kind: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The virtual size does not fit the L1 table.
    #[error("virtual size {0} needs a larger L1 table than the image has")]
    Size(u64),
    /// External data file flags inconsistent.
    #[error("external data file: {0}")]
    DataFile(&'static str),
}

/// One feature name table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Bitmap directory size.
    pub directory_size: u64,
    /// Bitmap directory offset.
    pub directory_offset: u64,
}

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Backing file name offset (0: none).
    pub backing_file_offset: u64,
    /// Backing file name length.
    pub backing_file_size: u32,
    /// log2(cluster size).
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table clusters.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible features.
    pub incompatible: u64,
    /// Compatible features.
    pub compatible: u64,
    /// Autoclear features.
    pub autoclear: u64,
    /// log2(refcount bits).
    pub refcount_order: u32,
    /// Header length.
    pub header_length: u32,
    /// Compression algorithm.
    pub compression: CompressionType,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format from its extension.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Feature names.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions we do not know, kept as (type, data).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The image has the dirty bit (lazy refcounts not written back).
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// The image is marked corrupt.
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// The data lives in an external file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// The external data file is a valid raw image of the disk.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Names the features in `bits` of kind `kind` from the feature name table.
    pub fn feature_list(&self, kind: u8, bits: u64) -> String {
        (0..64)
            .filter(|b| bits & (1 << b) != 0)
            .map(|b| {
                self.feature_names
                    .iter()
                    .find(|f| f.kind == kind && u32::from(f.bit) == b)
                    .map(|f| format!("{} (bit {b})", f.name))
                    .unwrap_or_else(|| format!("unknown feature bit {b}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Decodes and validates a header from the image's first cluster (or its first bytes, at least
    /// the whole first cluster when the file is that long). `file_size` bounds every offset.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header, HeaderError> {
        if buf.len() < 72 {
            return Err(HeaderError::TooShort);
        }
        if be32(buf, 0) != QCOW2_MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt = be32(buf, 32);
        if crypt != 0 {
            return Err(HeaderError::Encrypted(crypt));
        }
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if buf.len() < 104 {
                return Err(HeaderError::TooShort);
            }
            let len = be32(buf, 100);
            if len < 104
                || len % 8 != 0
                || u64::from(len) > cluster_size
                || len as usize > buf.len()
            {
                return Err(HeaderError::HeaderLength(len));
            }
            (
                be64(buf, 72),
                be64(buf, 80),
                be64(buf, 88),
                be32(buf, 96),
                len,
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(refcount_order));
        }
        let compression = if header_length > 104 {
            match (buf[104], incompatible & INCOMPAT_COMPRESSION != 0) {
                (0, false) => CompressionType::Deflate,
                (1, true) => CompressionType::Zstd,
                (t, _) => return Err(HeaderError::CompressionType(t)),
            }
        } else if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(HeaderError::CompressionType(0));
        } else {
            CompressionType::Deflate
        };

        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_extensions: Vec::new(),
        };
        h.parse_extensions(buf)?;
        if h.incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(HeaderError::IncompatibleFeatures(
                h.feature_list(0, h.incompatible & !INCOMPAT_KNOWN),
            ));
        }
        h.validate_tables(file_size)?;
        h.parse_backing_name(buf, file_size)?;
        if h.extended_l2() && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(HeaderError::ExtendedL2ClusterBits(cluster_bits));
        }
        if h.has_data_file() != h.data_file.is_some() && h.has_data_file() {
            return Err(HeaderError::DataFile(
                "the image needs a data file but names none",
            ));
        }
        if h.data_file_raw() && !h.has_data_file() {
            return Err(HeaderError::DataFile(
                "data_file_raw is set without a data file",
            ));
        }
        Ok(h)
    }

    fn validate_tables(&self, file_size: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        let in_file =
            |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= file_size);

        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(HeaderError::L1("l1_size exceeds the 32 MiB limit"));
        }
        let per_l2 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l2);
        if needed > u64::from(self.l1_size) {
            return Err(HeaderError::Size(self.size));
        }
        if self.l1_size > 0 {
            if self.l1_table_offset % cs != 0 {
                return Err(HeaderError::L1("l1_table_offset is not cluster aligned"));
            }
            if !in_file(self.l1_table_offset, l1_bytes) {
                return Err(HeaderError::L1(
                    "l1_table_offset points past the end of the file",
                ));
            }
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 {
            return Err(HeaderError::RefcountTable("refcount_table_clusters is 0"));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(HeaderError::RefcountTable(
                "refcount_table_clusters exceeds the 8 MiB limit",
            ));
        }
        if self.refcount_table_offset % cs != 0 {
            return Err(HeaderError::RefcountTable(
                "refcount_table_offset is not cluster aligned",
            ));
        }
        if !in_file(self.refcount_table_offset, rt_bytes) {
            return Err(HeaderError::RefcountTable(
                "refcount table extends past the end of the file",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::Snapshots("nb_snapshots exceeds 65536"));
        }
        if self.nb_snapshots > 0 {
            if self.snapshots_offset % cs != 0 {
                return Err(HeaderError::Snapshots(
                    "snapshots_offset is not cluster aligned",
                ));
            }
            if !in_file(self.snapshots_offset, 40) {
                return Err(HeaderError::Snapshots(
                    "snapshots_offset points past the end of the file",
                ));
            }
        }
        if let Some(b) = &self.bitmaps {
            if b.directory_offset % cs != 0 || !in_file(b.directory_offset, b.directory_size) {
                return Err(HeaderError::Extension {
                    kind: EXT_BITMAPS,
                    reason: "bitmap directory outside the file or unaligned",
                });
            }
            if b.nb_bitmaps == 0 || b.nb_bitmaps > 65535 || b.directory_size > 64 << 20 {
                return Err(HeaderError::Extension {
                    kind: EXT_BITMAPS,
                    reason: "bitmap count or directory size out of range",
                });
            }
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8], file_size: u64) -> Result<(), HeaderError> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(HeaderError::BackingName("longer than 1023 bytes"));
        }
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size))
            .ok_or(HeaderError::BackingName("offset overflows"))?;
        if end > self.cluster_size() || end > file_size || end as usize > buf.len() {
            return Err(HeaderError::BackingName("not inside the first cluster"));
        }
        if self.backing_file_size == 0 {
            return Ok(());
        }
        let name = &buf[self.backing_file_offset as usize..end as usize];
        let name =
            std::str::from_utf8(name).map_err(|_| HeaderError::BackingName("not valid UTF-8"))?;
        self.backing_file = Some(name.to_owned());
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), HeaderError> {
        let limit = (self.cluster_size() as usize).min(buf.len());
        let mut at = self.header_length as usize;
        let err = |kind, reason| HeaderError::Extension { kind, reason };
        loop {
            if at + 8 > limit {
                return Err(err(0, "extension area runs past the first cluster"));
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            let end = at
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or(err(kind, "length runs past the first cluster"))?;
            let data = &buf[at..end];
            let text = |d: &[u8]| {
                std::str::from_utf8(d)
                    .map(str::to_owned)
                    .map_err(|_| err(kind, "name is not valid UTF-8"))
            };
            match kind {
                EXT_BACKING_FORMAT => self.backing_format = Some(text(data)?),
                EXT_DATA_FILE => self.data_file = Some(text(data)?),
                EXT_FEATURE_NAMES => {
                    if len % 48 != 0 {
                        return Err(err(kind, "length is not a multiple of 48"));
                    }
                    for e in data.chunks_exact(48) {
                        let name = &e[2..];
                        let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(err(kind, "shorter than 24 bytes"));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_CRYPTO => return Err(HeaderError::Encrypted(0)),
                _ => self.unknown_extensions.push((kind, data.to_vec())),
            }
            at = end.next_multiple_of(8);
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CompressionType::Deflate => "deflate",
            CompressionType::Zstd => "zstd",
        })
    }
}

#[cfg(test)]
mod tests;
