//! Parsing a descriptor chain into a virtio-blk request, for any descriptor layout: the 16-byte
//! header is the first 16 readable bytes (it may span descriptors), the status is the last byte
//! of the writable part, and everything in between is data.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::guest::{self, Seg};
use super::status::RequestError;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u64 = 16;

/// Request types we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// Device ID.
    GetId,
    /// Discard segments.
    Discard,
    /// Write-zeroes segments.
    WriteZeroes,
    /// Anything else (answered UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// Start sector (512-byte units).
    pub sector: u64,
    /// Data buffers: writable ones for IN and GET_ID, readable ones after the header otherwise.
    pub data: Vec<Seg>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A chain that cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No writable byte for a status: complete with used length 0.
    NoStatus,
    /// The status byte can be written (IOERR), the rest of the chain is malformed.
    Malformed {
        /// Status byte address.
        status: GuestAddress,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Parses the descriptors of one chain. At most `max_descriptors` are accepted.
pub fn parse<M, I>(descriptors: I, mem: &M, max_descriptors: usize) -> Result<Request, ParseError>
where
    M: GuestMemoryBackend,
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable = Vec::new();
    let mut writable: Vec<Seg> = Vec::new();
    let mut problem = None;
    let mut count = 0;
    let mut last_has_next = false;
    for d in descriptors {
        count += 1;
        if count > max_descriptors {
            problem = Some("chain longer than the device allows");
            break;
        }
        last_has_next = d.has_next();
        let seg = Seg {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            problem.get_or_insert("readable descriptor after a writable one");
        }
    }
    if count == 0 || last_has_next {
        // virtio-queue ends the iteration silently on a bad index, a loop or a bad indirect table.
        problem.get_or_insert("broken descriptor chain");
    }

    writable.retain(|s| s.len > 0);
    let status = match writable.last() {
        Some(last) => last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .filter(|a| mem.address_in_range(*a))
            .ok_or(ParseError::NoStatus)?,
        None => return Err(ParseError::NoStatus),
    };
    guest::truncate_back(&mut writable, 1);
    let malformed = |reason| ParseError::Malformed { status, reason };
    if let Some(reason) = problem {
        return Err(malformed(reason));
    }

    let mut header = [0u8; HEADER_LEN as usize];
    if guest::total(&readable) < HEADER_LEN {
        return Err(malformed("request header shorter than 16 bytes"));
    }
    guest::read_bytes(mem, &readable, &mut header)
        .map_err(|_| malformed("request header outside guest memory"))?;
    let kind = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));

    let data = match kind {
        RequestType::In | RequestType::GetId => writable,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            guest::skip_front(&mut readable, HEADER_LEN);
            readable
        }
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// One DISCARD / WRITE_ZEROES segment (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    /// Start sector.
    pub sector: u64,
    /// Length in sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: unmap).
    pub flags: u32,
}

/// Size of one [`DiscardSegment`] on the wire.
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Reads the segments of a DISCARD / WRITE_ZEROES request, refusing more than `max`.
pub fn discard_segments<M: GuestMemoryBackend>(
    mem: &M,
    data: &[Seg],
    max: usize,
) -> Result<Vec<DiscardSegment>, RequestError> {
    let len = guest::total(data);
    if len == 0 || len % DISCARD_SEGMENT_LEN != 0 {
        return Err(RequestError::Malformed(
            "discard/write-zeroes payload is not a whole number of segments",
        ));
    }
    let n = len / DISCARD_SEGMENT_LEN;
    if n > max as u64 {
        return Err(RequestError::TooManySegments(n as usize));
    }
    let mut raw = vec![0u8; len as usize];
    guest::read_bytes(mem, data, &mut raw)?;
    Ok(raw
        .chunks_exact(DISCARD_SEGMENT_LEN as usize)
        .map(|c| DiscardSegment {
            sector: u64::from_le_bytes(c[0..8].try_into().unwrap_or([0; 8])),
            num_sectors: u32::from_le_bytes(c[8..12].try_into().unwrap_or([0; 4])),
            flags: u32::from_le_bytes(c[12..16].try_into().unwrap_or([0; 4])),
        })
        .collect())
}

#[cfg(test)]
mod tests;
