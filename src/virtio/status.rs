//! The one place where request failures become virtio-blk status codes.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use crate::block::BlockError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The descriptor chain breaks the virtio rules.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A buffer is not inside guest memory.
    #[error("request buffer outside guest memory")]
    BadBuffer,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// Unknown or disallowed DISCARD / WRITE_ZEROES flags.
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// More DISCARD / WRITE_ZEROES segments than advertised.
    #[error("{0} segments exceed the advertised maximum")]
    TooManySegments(usize),
    /// A DISCARD / WRITE_ZEROES segment larger than advertised.
    #[error("segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLarge(u32),
    /// Offset or length not a multiple of the logical block size.
    #[error("request at byte {offset} length {len} is not aligned to the logical block size")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Sector arithmetic overflows.
    #[error("sector {0} overflows")]
    Overflow(u64),
    /// A read or write carrying more data than the device accepts in one request.
    #[error("request of {0} bytes exceeds the per-request limit")]
    TooLarge(u64),
    /// A guest write would plant an image header in sector 0 of a probed raw image.
    #[error("refusing to write a {0} header to sector 0 of a probed raw image (use --format raw)")]
    ProtectedHeader(&'static str),
    /// The block layer refused the request.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A host I/O operation failed.
    #[error("host I/O failed: {0}")]
    Host(std::io::Error),
}

impl RequestError {
    /// The virtio-blk status for this failure.
    pub fn status(&self) -> u8 {
        let s = match self {
            RequestError::UnsupportedType(_)
            | RequestError::UnsupportedFlags(_)
            | RequestError::TooManySegments(_) => VIRTIO_BLK_S_UNSUPP,
            RequestError::Malformed(_)
            | RequestError::BadBuffer
            | RequestError::SegmentTooLarge(_)
            | RequestError::Misaligned { .. }
            | RequestError::Overflow(_)
            | RequestError::TooLarge(_)
            | RequestError::ProtectedHeader(_)
            | RequestError::Block(_)
            | RequestError::Host(_) => VIRTIO_BLK_S_IOERR,
        };
        s as u8
    }
}

/// Status byte of a successful request.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_vs_ioerr() {
        assert_eq!(
            RequestError::UnsupportedType(99).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        assert_eq!(
            RequestError::UnsupportedFlags(2).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        assert_eq!(
            RequestError::TooManySegments(99).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        assert_eq!(
            RequestError::Block(BlockError::ReadOnly).status(),
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(
            RequestError::Overflow(u64::MAX).status(),
            VIRTIO_BLK_S_IOERR as u8
        );
    }
}
