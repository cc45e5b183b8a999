//! Request parsing from an arbitrary descriptor table and guest memory.
//!
//! Input: 256 bytes of descriptor table (16 descriptors), one byte naming the head, then guest
//! memory contents from 0x1000 on (headers, buffers, indirect tables, discard segments).
//! Guest memory is two adjacent regions (0..0x8000, 0x8000..0x10000) and a third after a hole
//! (0x20000..0x21000).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::virtio::guest::{self, IovCursor};
use crate::virtio::request::{self, ParseError, RequestType};

const QSIZE: u16 = 16;
const TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const PAYLOAD: u64 = 0x1000;

/// Parses the chain the input describes and checks what the parser hands on. Returns whether
/// the chain parsed into a request.
pub fn request_parse(data: &[u8]) -> bool {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
        (GuestAddress(0x20000), 0x1000),
    ])
    .expect("test memory");
    let table = &data[..data.len().min(16 * usize::from(QSIZE))];
    mem.write_slice(table, GuestAddress(TABLE)).expect("table");
    let head = data.get(table.len()).copied().unwrap_or(0);
    let payload = data.get(table.len() + 1..).unwrap_or(&[]);
    let payload = &payload[..payload.len().min((0x10000 - PAYLOAD) as usize)];
    mem.write_slice(payload, GuestAddress(PAYLOAD))
        .expect("payload");
    // One chain available: avail.idx = 1, ring[0] = head.
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2))
        .expect("avail");
    mem.write_obj(u16::from(head).to_le(), GuestAddress(AVAIL + 4))
        .expect("avail");

    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let Some(chain) = q.iter(&mem).ok().and_then(|mut it| it.next()) else {
        return false;
    };

    match request::parse(chain, &mem, usize::from(QSIZE)) {
        Err(ParseError::NoStatus) => false,
        Err(ParseError::Malformed { status, .. }) => {
            assert!(mem.address_in_range(status), "status outside memory");
            false
        }
        Ok(req) => {
            assert!(mem.address_in_range(req.status), "status outside memory");
            let total = guest::total(&req.data);
            assert!(total < 1 << 32, "a chain carries less than 4 GiB");
            assert!(req.data.len() <= usize::from(QSIZE));
            match req.kind {
                RequestType::In | RequestType::Out | RequestType::GetId => {
                    let mut iov = Vec::new();
                    if guest::host_iovecs(&mem, &req.data, 64, &mut iov).is_ok() {
                        let sum: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
                        assert_eq!(sum, total, "iovecs cover the data exactly");
                        // Walk the iovecs in pieces the way the worker splits extents.
                        let mut cursor = IovCursor::new(&iov);
                        let mut out = Vec::new();
                        let mut taken = 0;
                        let step = u64::from(head % 7) * 100 + 1;
                        loop {
                            out.clear();
                            let n = cursor.take(step, 3, &mut out);
                            assert!(out.len() <= 3);
                            assert_eq!(n, out.iter().map(|v| v.iov_len as u64).sum::<u64>());
                            if n == 0 {
                                break;
                            }
                            taken += n;
                        }
                        assert_eq!(taken, total);
                    }
                    if req.kind == RequestType::GetId {
                        let _ = guest::write_bytes(&mem, &req.data, b"fuzz-serial-20-bytes");
                    }
                }
                RequestType::Discard | RequestType::WriteZeroes => {
                    if let Ok(segs) = request::discard_segments(&mem, &req.data, 16) {
                        assert!(!segs.is_empty() && segs.len() <= 16);
                        assert_eq!(segs.len() as u64 * request::DISCARD_SEGMENT_LEN, total);
                    }
                }
                RequestType::Flush | RequestType::Unsupported(_) => {}
            }
            true
        }
    }
}
