//! Parsing tests with virtio-queue's mock split queue.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    m.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

fn parse_chain(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    parse(chain, m, 16)
}

fn seg(addr: u64, len: u32) -> Seg {
    Seg {
        addr: GuestAddress(addr),
        len,
    }
}

#[test]
fn classic_three_descriptor_read() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 77);
    let r = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x11_0000, 4096, W),
            d(0x12_0000, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(r.kind, RequestType::In);
    assert_eq!(r.sector, 77);
    assert_eq!(r.data, vec![seg(0x11_0000, 4096)]);
    assert_eq!(r.status, GuestAddress(0x12_0000));
}

#[test]
fn any_layout_split_header_and_shared_status() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 5);
    // The header is split 8 + 8 bytes across two descriptors that are not adjacent.
    m.write_slice(&[0u8; 8], GuestAddress(0x10_1000)).unwrap();
    let mut tail = [0u8; 8];
    m.read_slice(&mut tail, GuestAddress(0x10_0008)).unwrap();
    m.write_slice(&tail, GuestAddress(0x10_1000)).unwrap();
    let r = parse_chain(
        &m,
        &[d(0x10_0000, 8, 0), d(0x10_1000, 8, 0), d(0x11_0000, 513, W)],
    )
    .unwrap();
    assert_eq!(r.kind, RequestType::In);
    assert_eq!(r.sector, 5);
    assert_eq!(r.data, vec![seg(0x11_0000, 512)]);
    assert_eq!(r.status, GuestAddress(0x11_0000 + 512));
}

#[test]
fn write_with_header_and_data_in_one_descriptor() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 9);
    let r = parse_chain(&m, &[d(0x10_0000, 16 + 1024, 0), d(0x12_0000, 1, W)]).unwrap();
    assert_eq!(r.kind, RequestType::Out);
    assert_eq!(r.data, vec![seg(0x10_0010, 1024)]);
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let r = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x11_0000, 512, W),
            d(0x12_0000, 1, W),
            d(0x13_0000, 0, W),
        ],
    )
    .unwrap();
    assert_eq!(r.status, GuestAddress(0x12_0000));
    assert_eq!(r.data, vec![seg(0x11_0000, 512)]);
}

#[test]
fn no_writable_byte_means_no_status() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        parse_chain(&m, &[d(0x10_0000, 16, 0), d(0x11_0000, 512, 0)]),
        Err(ParseError::NoStatus)
    );
    // A status byte outside guest memory cannot be written either.
    assert_eq!(
        parse_chain(&m, &[d(0x10_0000, 16, 0), d(0x40_0000, 1, W)]),
        Err(ParseError::NoStatus)
    );
}

#[test]
fn short_header_is_malformed_with_status() {
    let m = mem();
    let e = parse_chain(&m, &[d(0x10_0000, 15, 0), d(0x12_0000, 1, W)]).unwrap_err();
    assert!(matches!(e, ParseError::Malformed { status, .. } if status == GuestAddress(0x12_0000)));
    let e = parse_chain(&m, &[d(0x12_0000, 1, W)]).unwrap_err();
    assert!(matches!(e, ParseError::Malformed { .. }));
}

#[test]
fn header_outside_memory_is_malformed() {
    let m = mem();
    let e = parse_chain(&m, &[d(0x1f_fff8, 16, 0), d(0x12_0000, 1, W)]).unwrap_err();
    assert!(matches!(e, ParseError::Malformed { .. }));
}

#[test]
fn readable_after_writable_is_malformed() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x11_0000, 512, W),
            d(0x11_1000, 512, 0),
            d(0x12_0000, 1, W),
        ],
    )
    .unwrap_err();
    assert_eq!(
        e,
        ParseError::Malformed {
            status: GuestAddress(0x12_0000),
            reason: "readable descriptor after a writable one"
        }
    );
}

#[test]
fn chain_longer_than_allowed_is_malformed() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let mut descs = vec![d(0x10_0000, 16, 0)];
    for i in 0..6 {
        descs.push(d(0x11_0000 + i * 0x1000, 512, W));
    }
    descs.push(d(0x12_0000, 1, W));
    let chain = vq.build_desc_chain(&descs).unwrap();
    assert!(matches!(
        parse(chain, &m, 4),
        Err(ParseError::Malformed { .. })
    ));
}

#[test]
fn broken_next_index_is_detected() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let next = VRING_DESC_F_NEXT as u16;
    // Descriptor 1 is writable and says NEXT, but points past the queue.
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(0x11_0000, 512, next | W, 200)),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    let e = parse(chain, &m, 16).unwrap_err();
    assert_eq!(
        e,
        ParseError::Malformed {
            status: GuestAddress(0x11_0000 + 511),
            reason: "broken descriptor chain"
        }
    );
}

#[test]
fn looping_chain_terminates() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(0x11_0000, 512, next | W, 0)),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    assert!(matches!(
        parse(chain, &m, 1024),
        Err(ParseError::Malformed { .. })
    ));
}

#[test]
fn unknown_type_parses_as_unsupported() {
    let m = mem();
    header(&m, 0x10_0000, 0x99, 0);
    let r = parse_chain(&m, &[d(0x10_0000, 16, 0), d(0x12_0000, 1, W)]).unwrap();
    assert_eq!(r.kind, RequestType::Unsupported(0x99));
}

#[test]
fn discard_segments_are_decoded_and_bounded() {
    let m = mem();
    let mut raw = Vec::new();
    for (s, n, f) in [(8u64, 16u32, 0u32), (1024, 8, 1)] {
        raw.extend_from_slice(&s.to_le_bytes());
        raw.extend_from_slice(&n.to_le_bytes());
        raw.extend_from_slice(&f.to_le_bytes());
    }
    m.write_slice(&raw, GuestAddress(0x10_0000)).unwrap();
    let segs = discard_segments(&m, &[seg(0x10_0000, 32)], 4).unwrap();
    assert_eq!(
        segs,
        vec![
            DiscardSegment {
                sector: 8,
                num_sectors: 16,
                flags: 0
            },
            DiscardSegment {
                sector: 1024,
                num_sectors: 8,
                flags: 1
            }
        ]
    );
    assert!(matches!(
        discard_segments(&m, &[seg(0x10_0000, 32)], 1),
        Err(RequestError::TooManySegments(2))
    ));
    assert!(matches!(
        discard_segments(&m, &[seg(0x10_0000, 20)], 4),
        Err(RequestError::Malformed(_))
    ));
    assert!(matches!(
        discard_segments(&m, &[], 4),
        Err(RequestError::Malformed(_))
    ));
}
