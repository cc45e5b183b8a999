//! virtio-blk: feature bits, configuration space, request parsing and the per-queue worker.
//! Knows nothing about vhost-user sockets or image formats (it talks to [`crate::block`] and
//! [`crate::io`] through their traits).

pub mod chain;
pub mod config;
pub mod guest;
pub mod request;
pub mod status;
pub mod worker;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes in a virtio-blk sector, the unit of request and config-space addresses.
pub const SECTOR_SIZE: u64 = 512;

/// Segments accepted in one DISCARD or WRITE_ZEROES request (advertised in config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 16;

/// Largest DISCARD / WRITE_ZEROES segment, in sectors (advertised): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// What to do with guest discards (`--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardMode {
    /// Pass discards down (punch holes) and let WRITE_ZEROES with UNMAP deallocate.
    Unmap,
    /// Complete discards without doing anything; WRITE_ZEROES never deallocates.
    Ignore,
}

/// Device settings fixed for the life of the daemon.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest queue size the front-end may configure.
    pub queue_size: u16,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// GET_ID answer: up to 20 bytes, NUL padded.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Discard handling.
    pub discard: DiscardMode,
    /// Refuse every write (also when the driver ignores VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Copy page-cache reads from a mapping of the image (see [`crate::io::mapped`]).
    pub mapped_reads: bool,
}

impl DeviceSettings {
    /// The virtio feature bits we offer (without the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | 1 << b);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// Most descriptors one request may use: `seg_max` data segments plus header and status.
    pub fn max_descriptors(&self) -> usize {
        usize::from(self.queue_size)
    }
}

/// Builds the 20-byte GET_ID answer from a serial string (already validated to fit).
pub fn serial_bytes(serial: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut out = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = serial.len().min(out.len());
    out[..n].copy_from_slice(&serial.as_bytes()[..n]);
    out
}
