//! L1 and L2 entries: decoding a cluster's mapping, standard or extended (subclusters), and
//! checking it against the spec. Pure functions over the raw entries.

/// Offset bits of L1 and standard L2 entries (9-55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster is used exactly once (refcount 1): writable in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entries: the cluster reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;

/// What a subcluster (or, without extended L2, the whole cluster) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    /// Not allocated here: read from the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Data at this offset in the cluster's host cluster.
    Data,
}

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// A compressed cluster: the descriptor (bits 0-61).
    Compressed(u64),
    /// A normal, zero or unallocated cluster.
    Standard {
        /// Host cluster offset (0: none).
        host: u64,
        /// Subclusters allocated in the host cluster (bit i: subcluster i).
        alloc: u32,
        /// Subclusters reading as zeroes.
        zero: u32,
        /// COPIED flag: refcount is exactly one.
        copied: bool,
    },
}

impl L2Mapping {
    /// An unallocated cluster.
    pub const UNALLOCATED: L2Mapping = L2Mapping::Standard {
        host: 0,
        alloc: 0,
        zero: 0,
        copied: false,
    };

    /// State of subcluster `i` (always 0 without extended L2, where the masks use bit 0 only).
    pub fn sub(&self, i: u32) -> SubState {
        match *self {
            L2Mapping::Compressed(_) => SubState::Data,
            L2Mapping::Standard { alloc, zero, .. } => {
                if alloc & (1 << i) != 0 {
                    SubState::Data
                } else if zero & (1 << i) != 0 {
                    SubState::Zero
                } else {
                    SubState::Unallocated
                }
            }
        }
    }
}

/// Decodes the L2 table offset from an L1 entry (0: no table).
pub fn l1_table_offset(entry: u64, cluster_size: u64) -> Result<u64, &'static str> {
    let off = entry & OFFSET_MASK;
    if off % cluster_size != 0 {
        return Err("L1 entry is not cluster aligned");
    }
    Ok(off)
}

/// Decodes a standard (64-bit) L2 entry. With an external data file, host offset 0 is a real
/// cluster when COPIED is set.
pub fn decode_standard(
    entry: u64,
    cluster_size: u64,
    data_file: bool,
) -> Result<L2Mapping, &'static str> {
    if entry & OFLAG_COMPRESSED != 0 {
        return Ok(L2Mapping::Compressed(
            entry & !(OFLAG_COPIED | OFLAG_COMPRESSED),
        ));
    }
    let host = entry & OFFSET_MASK;
    if host % cluster_size != 0 {
        return Err("L2 entry is not cluster aligned");
    }
    let copied = entry & OFLAG_COPIED != 0;
    Ok(if entry & OFLAG_ZERO != 0 {
        L2Mapping::Standard {
            host,
            alloc: 0,
            zero: 1,
            copied,
        }
    } else if host == 0 && !(data_file && copied) {
        L2Mapping::UNALLOCATED
    } else {
        L2Mapping::Standard {
            host,
            alloc: 1,
            zero: 0,
            copied,
        }
    })
}

/// Decodes an extended (128-bit) L2 entry: the standard half and the subcluster bitmap.
pub fn decode_extended(
    entry: u64,
    bitmap: u64,
    cluster_size: u64,
    data_file: bool,
) -> Result<L2Mapping, &'static str> {
    if entry & OFLAG_COMPRESSED != 0 {
        if bitmap != 0 {
            return Err("compressed cluster with a subcluster bitmap");
        }
        return Ok(L2Mapping::Compressed(
            entry & !(OFLAG_COPIED | OFLAG_COMPRESSED),
        ));
    }
    if entry & OFLAG_ZERO != 0 {
        return Err("zero flag set in an extended L2 entry");
    }
    let host = entry & OFFSET_MASK;
    if host % cluster_size != 0 {
        return Err("L2 entry is not cluster aligned");
    }
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err("subcluster both allocated and zero");
    }
    let copied = entry & OFLAG_COPIED != 0;
    if host == 0 && alloc != 0 && !(data_file && copied) {
        return Err("allocated subclusters without a host cluster");
    }
    Ok(L2Mapping::Standard {
        host,
        alloc,
        zero,
        copied,
    })
}

/// Where the compressed data of a descriptor lies: (host offset, bytes to read).
pub fn compressed_range(descriptor: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset = descriptor & ((1 << x) - 1);
    let extra_sectors = (descriptor >> x) & ((1 << (cluster_bits - 8)) - 1);
    let len = (extra_sectors + 1) * 512 - (offset & 511);
    (offset, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    #[test]
    fn standard_entries() {
        assert_eq!(decode_standard(0, CS, false), Ok(L2Mapping::UNALLOCATED));
        let m = decode_standard(OFLAG_COPIED | 0x50000, CS, false).unwrap();
        assert_eq!(
            m,
            L2Mapping::Standard {
                host: 0x50000,
                alloc: 1,
                zero: 0,
                copied: true
            }
        );
        assert_eq!(m.sub(0), SubState::Data);
        let z = decode_standard(OFLAG_ZERO, CS, false).unwrap();
        assert_eq!(z.sub(0), SubState::Zero);
        let za = decode_standard(0x70000 | OFLAG_ZERO, CS, false).unwrap();
        assert_eq!(za.sub(0), SubState::Zero);
        assert!(decode_standard(0x50200, CS, false).is_err());
        assert_eq!(
            decode_standard(OFLAG_COMPRESSED | 123, CS, false),
            Ok(L2Mapping::Compressed(123))
        );
        // Host offset 0 is a real cluster only in an external data file, with COPIED.
        assert_eq!(
            decode_standard(OFLAG_COPIED, CS, false),
            Ok(L2Mapping::UNALLOCATED)
        );
        assert_eq!(
            decode_standard(OFLAG_COPIED, CS, true).unwrap().sub(0),
            SubState::Data
        );
    }

    #[test]
    fn extended_entries() {
        let m = decode_extended(0x50000, 0b0101 | (0b1000u64 << 32), CS, false).unwrap();
        assert_eq!(m.sub(0), SubState::Data);
        assert_eq!(m.sub(1), SubState::Unallocated);
        assert_eq!(m.sub(2), SubState::Data);
        assert_eq!(m.sub(3), SubState::Zero);
        assert_eq!(
            decode_extended(0, 0xffff_ffff << 32, CS, false)
                .unwrap()
                .sub(31),
            SubState::Zero
        );
        assert!(decode_extended(0x50000, 1 | 1 << 32, CS, false).is_err());
        assert!(decode_extended(0, 1, CS, false).is_err());
        assert!(decode_extended(OFLAG_COMPRESSED | 5, 1, CS, false).is_err());
        assert!(decode_extended(0x50000 | OFLAG_ZERO, 0, CS, false).is_err());
    }

    #[test]
    fn compressed_descriptor_ranges() {
        // cluster_bits 16: x = 54; offset in bits 0-53, extra sectors in bits 54-61.
        let d = (3u64 << 54) | 0x12345;
        assert_eq!(compressed_range(d, 16), (0x12345, 4 * 512 - 0x145));
        assert_eq!(compressed_range(0x200, 9), (0x200, 512));
    }

    #[test]
    fn l1_entries() {
        assert_eq!(l1_table_offset(OFLAG_COPIED | 0x30000, CS), Ok(0x30000));
        assert!(l1_table_offset(0x30200, CS).is_err());
    }
}
