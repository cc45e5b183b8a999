//! The virtio-blk configuration space (virtio 1.2, 5.2.4), little-endian as the spec lays it out.

use vm_memory::{ByteValued, Le16, Le32, Le64};

use super::{DeviceSettings, DiscardMode, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};

/// Largest config space a vhost-user GET_CONFIG may ask for (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: usize = 256;

/// `struct virtio_blk_config` up to `unused1` (60 bytes). Offsets are in the field docs.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed)]
pub struct VirtioBlkConfig {
    /// 0: capacity in 512-byte sectors.
    pub capacity: Le64,
    /// 8: largest segment (SIZE_MAX; not offered).
    pub size_max: Le32,
    /// 12: most data segments per request (SEG_MAX).
    pub seg_max: Le32,
    /// 16: geometry.cylinders (GEOMETRY; not offered).
    pub cylinders: Le16,
    /// 18: geometry.heads.
    pub heads: u8,
    /// 19: geometry.sectors.
    pub sectors: u8,
    /// 20: logical block size (BLK_SIZE).
    pub blk_size: Le32,
    /// 24: log2(physical block / logical block) (TOPOLOGY).
    pub physical_block_exp: u8,
    /// 25: offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// 26: suggested minimum I/O size in logical blocks.
    pub min_io_size: Le16,
    /// 28: optimal I/O size in logical blocks.
    pub opt_io_size: Le32,
    /// 32: write cache mode (CONFIG_WCE; not offered).
    pub writeback: u8,
    /// 33: reserved, zero.
    pub unused0: u8,
    /// 34: number of request queues (MQ).
    pub num_queues: Le16,
    /// 36: largest discard segment in sectors (DISCARD).
    pub max_discard_sectors: Le32,
    /// 40: most discard segments per request.
    pub max_discard_seg: Le32,
    /// 44: discard alignment in sectors.
    pub discard_sector_alignment: Le32,
    /// 48: largest write-zeroes segment in sectors (WRITE_ZEROES).
    pub max_write_zeroes_sectors: Le32,
    /// 52: most write-zeroes segments per request.
    pub max_write_zeroes_seg: Le32,
    /// 56: write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// 57: reserved, zero.
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<VirtioBlkConfig>() == 60);

// SAFETY: `repr(C, packed)` of integers and little-endian integer wrappers: no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

impl VirtioBlkConfig {
    /// Fills the config space for a disk of `size` bytes.
    pub fn new(settings: &DeviceSettings, size: u64, opt_io_bytes: u32) -> Self {
        let lbs = settings.logical_block_size;
        let sectors_per_block = lbs / SECTOR_SIZE as u32;
        VirtioBlkConfig {
            capacity: (size / SECTOR_SIZE).into(),
            seg_max: (u32::from(settings.queue_size).saturating_sub(2).max(1)).into(),
            blk_size: lbs.into(),
            min_io_size: 1.into(),
            opt_io_size: (opt_io_bytes / lbs).into(),
            num_queues: settings.num_queues.into(),
            max_discard_sectors: MAX_DISCARD_SECTORS.into(),
            max_discard_seg: MAX_DISCARD_SEGMENTS.into(),
            discard_sector_alignment: sectors_per_block.into(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.into(),
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS.into(),
            write_zeroes_may_unmap: u8::from(settings.discard == DiscardMode::Unmap),
            ..Default::default()
        }
    }

    /// The bytes a GET_CONFIG for `offset..offset+size` returns: exactly `size` bytes (zeroes past
    /// the fields we define), or `None` if the range exceeds the vhost-user config space.
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        if end > MAX_CONFIG_SIZE {
            return None;
        }
        let mut space = [0u8; MAX_CONFIG_SIZE];
        space[..std::mem::size_of::<Self>()].copy_from_slice(self.as_slice());
        Some(space[start..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::serial_bytes;

    fn settings() -> DeviceSettings {
        DeviceSettings {
            num_queues: 4,
            queue_size: 128,
            logical_block_size: 4096,
            serial: serial_bytes("x"),
            discard: DiscardMode::Unmap,
            read_only: false,
            mapped_reads: true,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let c = VirtioBlkConfig::new(&settings(), 1 << 30, 65536);
        let b = c.read(0, 60).unwrap();
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(le32(12), 126);
        assert_eq!(le32(20), 4096);
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 1);
        assert_eq!(le32(28), 16);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(le32(36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(40), MAX_DISCARD_SEGMENTS);
        assert_eq!(le32(44), 8);
        assert_eq!(le32(48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(52), MAX_DISCARD_SEGMENTS);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_return_exactly_the_size_asked() {
        let c = VirtioBlkConfig::new(&settings(), 4096, 0);
        assert_eq!(c.read(0, 256).unwrap().len(), 256);
        assert_eq!(c.read(34, 2).unwrap(), vec![4, 0]);
        assert_eq!(c.read(60, 36).unwrap(), vec![0; 36]);
        assert_eq!(c.read(0, 0).unwrap(), Vec::<u8>::new());
        assert!(c.read(200, 57).is_none());
        assert!(c.read(u32::MAX, 2).is_none());
    }
}
