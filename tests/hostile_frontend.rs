//! Hostile descriptor chains through a real vhost-user connection: each case fills guest memory
//! with a canary pattern, sends one chain no driver would send, and checks the status the virtio
//! spec asks for, the used length, that nothing outside the chain's writable buffers changed,
//! and then that the daemon is alive and both queues still serve a well-formed read.

mod common;

use std::time::Duration;

use common::frontend::*;
use common::{cpu_ticks, pattern_image, Daemon};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const IMAGE: usize = 1 << 20;
const SECTORS: u64 = (IMAGE / 512) as u64;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    image: Vec<u8>,
    h: HostileFrontend,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let image = pattern_image(&path, IMAGE, 6);
    let mut args = vec!["--num-queues", "2", "--queue-size", "16"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(dir.path(), &path, &args);
    let h = HostileFrontend::connect(
        daemon.path(),
        Options {
            queues: 2,
            ..Default::default()
        },
    );
    Setup {
        _dir: dir,
        daemon,
        image,
        h,
    }
}

impl Setup {
    /// Fills every buffer byte with the canary and returns the snapshot to compare with.
    fn arm(&self) -> Vec<u8> {
        self.h.mem.fill(BUF, (MEM_END - BUF) as usize, CANARY);
        self.h.mem.snapshot()
    }

    /// The daemon is alive and both queues serve a well-formed read with the image's data.
    fn healthy(&mut self) {
        assert!(
            self.daemon.child.try_wait().unwrap().is_none(),
            "daemon died: {}",
            self.daemon.log_text()
        );
        for q in 0..2 {
            let got = self.h.read_ok_at(q, 3, 1024, HEALTH);
            assert_eq!(got, self.image[3 * 512..3 * 512 + 1024], "queue {q}");
        }
    }

    /// Sends `bufs` on queue 0 after writing `hdr` at HDR; expects (status at `status_at`,
    /// used length) and only `allowed` (plus the status byte) changed.
    fn case(
        &mut self,
        hdr: &[u8],
        bufs: &[Buf],
        status_at: Option<u64>,
        allowed: Allowed,
    ) -> (u8, u32) {
        let mut before = self.arm();
        self.h.mem.write(HDR, hdr);
        before[HDR as usize..HDR as usize + hdr.len()].copy_from_slice(hdr);
        self.h.submit(0, bufs);
        let (id, len) = self.h.wait_used(0);
        assert_eq!(id, 0);
        let mut ok = allowed.to_vec();
        let status = status_at.map(|s| {
            ok.push((s, 1));
            self.h.mem.read(s, 1)[0]
        });
        assert_canaries(&self.h.mem, &before, &ok, 2);
        let got = match status {
            Some(s) => (s, len),
            None => (CANARY, len),
        };
        self.healthy();
        got
    }
}

fn hdr(kind: u32, sector: u64) -> [u8; 16] {
    header(kind, sector)
}

/// The data buffer of a request of `kind`: device-writable for a read, readable for a write.
fn data_buf(kind: u32, at: u64, len: u32) -> Buf {
    if kind == VIRTIO_BLK_T_IN {
        Buf::W(at, len)
    } else {
        Buf::R(at, len)
    }
}

#[test]
fn header_shorter_than_16_bytes_is_ioerr() {
    let mut s = setup(&[]);
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 8), Buf::W(STATUS, 1)],
        Some(STATUS),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    s.healthy();
}

#[test]
fn header_split_across_descriptors_is_served() {
    let mut s = setup(&[]);
    // Header in three pieces (4 + 5 + 7 bytes), data in two, status alone.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 2),
        &[
            Buf::R(HDR, 4),
            Buf::R(HDR + 4, 5),
            Buf::R(HDR + 9, 7),
            Buf::W(DATA, 100),
            Buf::W(DATA + 0x400, 412),
            Buf::W(STATUS, 1),
        ],
        Some(STATUS),
        &[(DATA, 100), (DATA + 0x400, 412)],
    );
    assert_eq!(st, (OK, 513));
    let mut got = s.h.mem.read(DATA, 100);
    got.extend(s.h.mem.read(DATA + 0x400, 412));
    assert_eq!(got, s.image[1024..1536]);
    s.healthy();
}

#[test]
fn no_writable_byte_is_returned_with_used_length_zero() {
    let mut s = setup(&[]);
    // The "status" sits in a readable descriptor: nothing may be written anywhere.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::R(DATA, 512), Buf::R(STATUS, 1)],
        None,
        &[],
    );
    assert_eq!(st.1, 0);
    // Only zero-length writable descriptors.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::W(DATA, 0), Buf::W(STATUS, 0)],
        None,
        &[],
    );
    assert_eq!(st.1, 0);
    s.healthy();
}

#[test]
fn status_in_readable_descriptor_after_writable_is_ioerr_in_last_writable_byte() {
    let mut s = setup(&[]);
    // The last writable byte (end of the data buffer) gets the status; nothing else changes.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::W(DATA, 512), Buf::R(STATUS, 1)],
        Some(DATA + 511),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    s.healthy();
}

#[test]
fn readable_after_writable_is_ioerr() {
    let mut s = setup(&[]);
    let st = s.case(
        &hdr(VIRTIO_BLK_T_OUT, 0),
        &[
            Buf::R(HDR, 16),
            Buf::W(DATA, 512),
            Buf::R(DATA + 0x1000, 512),
            Buf::W(STATUS, 1),
        ],
        Some(STATUS),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    s.healthy();
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let mut s = setup(&[]);
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 4),
        &[
            Buf::R(HDR, 16),
            Buf::R(HDR + 0x100, 0),
            Buf::W(DATA, 0),
            Buf::W(DATA, 512),
            Buf::W(DATA + 0x800, 0),
            Buf::W(STATUS, 1),
            Buf::W(STATUS + 1, 0),
        ],
        Some(STATUS),
        &[(DATA, 512)],
    );
    assert_eq!(st, (OK, 513));
    assert_eq!(s.h.mem.read(DATA, 512), s.image[2048..2560]);
    s.healthy();
}

#[test]
fn buffers_outside_guest_memory_are_ioerr() {
    let mut s = setup(&[]);
    let far = MEM_END + 0x1000;
    // Data outside memory, for a read and for a write.
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let data = data_buf(kind, far, 512);
        let st = s.case(
            &hdr(kind, 0),
            &[Buf::R(HDR, 16), data, Buf::W(STATUS, 1)],
            Some(STATUS),
            &[],
        );
        assert_eq!(st, (IOERR, 1), "kind {kind}");
    }
    // Data starting inside memory and running off its end.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[
            Buf::R(HDR, 16),
            Buf::W(MEM_END - 512, 1024),
            Buf::W(STATUS, 1),
        ],
        Some(STATUS),
        &[(MEM_END - 512, 512)],
    );
    assert_eq!(st, (IOERR, 1));
    // Header outside memory.
    let st = s.case(
        &[],
        &[Buf::R(far, 16), Buf::W(STATUS, 1)],
        Some(STATUS),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    // Status outside memory: nothing can be answered.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::W(DATA, 512), Buf::W(far, 1)],
        None,
        &[(DATA, 512)],
    );
    assert_eq!(st.1, 0);
    // Addresses that overflow u64.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[
            Buf::R(HDR, 16),
            Buf::W(u64::MAX - 10, 512),
            Buf::W(STATUS, 1),
        ],
        Some(STATUS),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::W(u64::MAX - 10, 512)],
        None,
        &[],
    );
    assert_eq!(st.1, 0);
    s.healthy();
}

#[test]
fn buffer_spanning_two_regions_is_served() {
    let mut s = setup(&[]);
    let at = REGION - 700;
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 8),
        &[Buf::R(HDR, 16), Buf::W(at, 2048), Buf::W(STATUS, 1)],
        Some(STATUS),
        &[(at, 2048)],
    );
    assert_eq!(st, (OK, 2049));
    assert_eq!(s.h.mem.read(at, 700), s.image[4096..4796]);
    assert_eq!(s.h.mem.read(REGION, 1348), s.image[4796..6144]);
    s.healthy();
}

#[test]
fn lengths_near_4_gib_are_refused() {
    let mut s = setup(&[]);
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let data = data_buf(kind, DATA, 0xffff_fe00);
        let st = s.case(
            &hdr(kind, 0),
            &[Buf::R(HDR, 16), data, Buf::W(STATUS, 1)],
            Some(STATUS),
            &[],
        );
        assert_eq!(st, (IOERR, 1), "kind {kind}");
    }
    // The status descriptor itself 4 GiB long: its last byte is outside memory.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_IN, 0),
        &[Buf::R(HDR, 16), Buf::W(DATA, u32::MAX)],
        None,
        &[],
    );
    assert_eq!(st.1, 0);
    // Header descriptor almost 4 GiB long: only its first 16 bytes are read.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_GET_ID, 0),
        &[
            Buf::R(HDR, u32::MAX - 21),
            Buf::W(DATA, 20),
            Buf::W(STATUS, 1),
        ],
        Some(STATUS),
        &[(DATA, 20)],
    );
    assert_eq!(st, (OK, 21));
    // A chain of more than 2^32 bytes in total (illegal, 2.7.5.2) ends where the sum overflows:
    // here before any writable byte, so nothing can be answered.
    let st = s.case(
        &hdr(VIRTIO_BLK_T_GET_ID, 0),
        &[Buf::R(HDR, u32::MAX), Buf::W(DATA, 20), Buf::W(STATUS, 1)],
        None,
        &[],
    );
    assert_eq!(st.1, 0);
    s.healthy();
}

#[test]
fn chain_loops_end_without_a_hang() {
    let mut s = setup(&[]);
    for descs in [
        // 0 -> 1 -> 0 -> ...
        vec![
            Desc {
                addr: HDR,
                len: 16,
                flags: VRING_DESC_F_NEXT as u16,
                next: 1,
            },
            Desc {
                addr: STATUS,
                len: 1,
                flags: (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                next: 0,
            },
        ],
        // A descriptor pointing at itself.
        vec![Desc {
            addr: HDR,
            len: 16,
            flags: VRING_DESC_F_NEXT as u16,
            next: 0,
        }],
        // next past the end of the table.
        vec![Desc {
            addr: HDR,
            len: 16,
            flags: VRING_DESC_F_NEXT as u16,
            next: 500,
        }],
    ] {
        let before = s.arm();
        let mut before = before;
        s.h.mem.write(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        before[HDR as usize..HDR as usize + 16].copy_from_slice(&hdr(VIRTIO_BLK_T_IN, 0));
        s.h.put_descs(0, 0, &descs);
        s.h.offer(0, 0);
        s.h.kick(0);
        let (_, len) = s.h.wait_used(0);
        assert_canaries(&s.h.mem, &before, &[(STATUS, 1)], 2);
        let status = s.h.mem.read(STATUS, 1)[0];
        assert!(
            (len == 1 && status == IOERR) || (len == 0 && status == CANARY),
            "len {len} status {status}"
        );
    }
    s.healthy();
}

/// Stores `descs` as an indirect table at `table` and offers it on queue 0.
fn submit_indirect(s: &mut Setup, table: u64, descs: &[Desc], table_len: u32) {
    for (i, d) in descs.iter().enumerate() {
        s.h.mem.write(table + 16 * i as u64, &d.to_bytes());
    }
    s.h.put_descs(0, 0, &[Desc::indirect(table, table_len)]);
    s.h.offer(0, 0);
    s.h.kick(0);
}

/// Sends an indirect chain that must be refused: either IOERR at `status` (used length 1) or,
/// when no status byte can be found, used length 0 and nothing written. Never data.
fn expect_refused(s: &mut Setup, status: u64, descs: &[Desc], table_len: u32, what: &str) {
    let table = BUF + 0x8000;
    let mut before = s.arm();
    s.h.mem.write(HDR, &hdr(VIRTIO_BLK_T_IN, 1));
    before[HDR as usize..HDR as usize + 16].copy_from_slice(&hdr(VIRTIO_BLK_T_IN, 1));
    submit_indirect(s, table, descs, table_len);
    for (i, d) in descs.iter().enumerate() {
        let at = (table + 16 * i as u64) as usize;
        before[at..at + 16].copy_from_slice(&d.to_bytes());
    }
    let (_, len) = s.h.wait_used(0);
    assert_canaries(&s.h.mem, &before, &[(status, 1)], 2);
    let got = s.h.mem.read(status, 1)[0];
    assert!(
        (len == 1 && got == IOERR) || (len == 0 && got == CANARY),
        "{what}: len {len} status {got}"
    );
    s.healthy();
}

#[test]
fn indirect_tables_good_nested_oversized_and_too_long() {
    let mut s = setup(&[]);
    let table = BUF + 0x8000;
    let good = linked(&[Buf::R(HDR, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)], 0);
    // A proper indirect chain works.
    let mut before = s.arm();
    s.h.mem.write(HDR, &hdr(VIRTIO_BLK_T_IN, 1));
    submit_indirect(&mut s, table, &good, 48);
    for (i, d) in good.iter().enumerate() {
        let at = (table + 16 * i as u64) as usize;
        before[at..at + 16].copy_from_slice(&d.to_bytes());
    }
    before[HDR as usize..HDR as usize + 16].copy_from_slice(&hdr(VIRTIO_BLK_T_IN, 1));
    assert_eq!(s.h.wait_used(0).1, 513);
    assert_canaries(&s.h.mem, &before, &[(DATA, 512), (STATUS, 1)], 2);
    assert_eq!(s.h.mem.read(STATUS, 1)[0], OK);
    assert_eq!(s.h.mem.read(DATA, 512), s.image[512..1024]);

    // An indirect descriptor inside the indirect table.
    let mut nested = good.clone();
    nested[1] = Desc {
        addr: table + 0x400,
        len: 48,
        flags: (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16,
        next: 2,
    };
    expect_refused(&mut s, STATUS, &nested, 48, "nested");
    // Table length not a multiple of 16, and zero.
    expect_refused(&mut s, STATUS, &good, 47, "odd length");
    expect_refused(&mut s, STATUS, &good, 0, "empty");
    // Table outside memory / huge.
    expect_refused(&mut s, STATUS, &[], 0xffff_fff0, "4 GiB table");
    // More descriptors than the queue has (the device's limit is its queue size, 16).
    let mut long = vec![Buf::R(HDR, 16)];
    long.extend((0..20).map(|i| Buf::W(DATA + 512 * i, 512)));
    long.push(Buf::W(STATUS, 1));
    // The device stops reading at its limit (16): the last writable byte seen so far, the end of
    // the 15th data buffer, gets IOERR.
    expect_refused(
        &mut s,
        DATA + 15 * 512 - 1,
        &linked(&long, 0),
        22 * 16,
        "22 descriptors",
    );
    // A loop inside the table.
    let mut looped = good.clone();
    looped[2].flags |= VRING_DESC_F_NEXT as u16;
    looped[2].next = 0;
    expect_refused(&mut s, STATUS, &looped, 48, "loop");
    s.healthy();
}

#[test]
fn sectors_past_capacity_and_overflowing_arithmetic_are_ioerr() {
    let mut s = setup(&[]);
    for (kind, sector) in [
        (VIRTIO_BLK_T_IN, SECTORS),
        (VIRTIO_BLK_T_IN, SECTORS - 1),
        (VIRTIO_BLK_T_OUT, SECTORS),
        (VIRTIO_BLK_T_IN, u64::MAX),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 - 1),
    ] {
        let data = data_buf(kind, DATA, 1024);
        let st = s.case(
            &hdr(kind, sector),
            &[Buf::R(HDR, 16), data, Buf::W(STATUS, 1)],
            Some(STATUS),
            &[],
        );
        assert_eq!(st, (IOERR, 1), "kind {kind} sector {sector}");
    }
    s.healthy();
}

fn segment(sector: u64, n: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&n.to_le_bytes());
    b[12..].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Sends a DISCARD or WRITE_ZEROES with `segs` as payload; returns the status.
fn discard(s: &mut Setup, kind: u32, segs: &[[u8; 16]], extra: usize) -> u8 {
    let mut payload: Vec<u8> = segs.concat();
    payload.extend(std::iter::repeat_n(0u8, extra));
    let mut before = s.arm();
    s.h.mem.write(DATA, &payload);
    before[DATA as usize..DATA as usize + payload.len()].copy_from_slice(&payload);
    s.h.mem.write(HDR, &hdr(kind, 0));
    before[HDR as usize..HDR as usize + 16].copy_from_slice(&hdr(kind, 0));
    s.h.submit(
        0,
        &[
            Buf::R(HDR, 16),
            Buf::R(DATA, payload.len() as u32),
            Buf::W(STATUS, 1),
        ],
    );
    let (_, len) = s.h.wait_used(0);
    assert_eq!(len, 1);
    assert_canaries(&s.h.mem, &before, &[(STATUS, 1)], 2);
    let status = s.h.mem.read(STATUS, 1)[0];
    s.healthy();
    status
}

fn image_now(s: &Setup) -> Vec<u8> {
    std::fs::read(s._dir.path().join("disk.raw")).unwrap()
}

#[test]
fn discard_and_write_zeroes_segments_and_flags() {
    let mut s = setup(&[]);
    let dz = VIRTIO_BLK_T_WRITE_ZEROES;
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // Unknown flags, UNMAP on a discard: UNSUPP, nothing changes.
    assert_eq!(discard(&mut s, dz, &[segment(0, 8, 2)], 0), UNSUPP);
    assert_eq!(discard(&mut s, dz, &[segment(0, 8, 1 << 31)], 0), UNSUPP);
    assert_eq!(
        discard(&mut s, VIRTIO_BLK_T_DISCARD, &[segment(0, 8, unmap)], 0),
        UNSUPP
    );
    // More segments than advertised (16): UNSUPP.
    let many: Vec<_> = (0..17).map(|i| segment(i * 8, 8, 0)).collect();
    assert_eq!(discard(&mut s, dz, &many, 0), UNSUPP);
    // A valid segment followed by a bad one: the whole request fails and nothing is zeroed.
    assert_eq!(
        discard(&mut s, dz, &[segment(0, 8, 0), segment(SECTORS, 8, 0)], 0),
        IOERR
    );
    assert_eq!(
        discard(
            &mut s,
            dz,
            &[segment(0, 8, 0), segment(u64::MAX / 256, 8, 0)],
            0
        ),
        IOERR
    );
    assert_eq!(discard(&mut s, dz, &[segment(0, u32::MAX, 0)], 0), IOERR);
    // Payload not a whole number of segments, or empty.
    assert_eq!(discard(&mut s, dz, &[segment(0, 8, 0)], 5), IOERR);
    assert_eq!(discard(&mut s, dz, &[], 8), IOERR);
    assert_eq!(
        image_now(&s),
        s.image,
        "a refused request changed the image"
    );
    // Several valid segments: served.
    assert_eq!(
        discard(&mut s, dz, &[segment(8, 8, 0), segment(32, 8, unmap)], 0),
        OK
    );
    let now = image_now(&s);
    assert!(now[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert!(now[32 * 512..40 * 512].iter().all(|&b| b == 0));
    assert_eq!(now[16 * 512..32 * 512], s.image[16 * 512..32 * 512]);
    s.image = now;
    s.healthy();
}

#[test]
fn writes_on_a_read_only_device_are_ioerr() {
    let mut s = setup(&["--read-only"]);
    let st = s.case(
        &hdr(VIRTIO_BLK_T_OUT, 0),
        &[Buf::R(HDR, 16), Buf::R(DATA, 512), Buf::W(STATUS, 1)],
        Some(STATUS),
        &[],
    );
    assert_eq!(st, (IOERR, 1));
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(discard(&mut s, kind, &[segment(0, 8, 0)], 0), IOERR);
    }
    assert_eq!(image_now(&s), s.image);
    s.healthy();
}

#[test]
fn unknown_request_types_are_unsupp() {
    let mut s = setup(&[]);
    for kind in [2, 5, 10, 12, 20, 99, u32::MAX] {
        let st = s.case(
            &hdr(kind, 0),
            &[Buf::R(HDR, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
            Some(STATUS),
            &[],
        );
        assert_eq!(st, (UNSUPP, 1), "type {kind}");
    }
    s.healthy();
}

#[test]
fn head_index_past_the_queue_is_dropped() {
    let mut s = setup(&[]);
    let before = s.arm();
    s.h.offer(0, QSIZE + 3);
    s.h.kick(0);
    // Nothing to answer: no used element, no write anywhere.
    assert!(s.h.wait_used_for(0, Duration::from_millis(300)).is_none());
    assert_canaries(&s.h.mem, &before, &[], 2);
    s.healthy();
}

fn log_lines(d: &Daemon, what: &str) -> usize {
    d.log_text().lines().filter(|l| l.contains(what)).count()
}

#[test]
fn avail_index_far_ahead_stops_the_queue_without_spinning() {
    for features in [F_INDIRECT, F_INDIRECT | F_EVENT_IDX] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let image = pattern_image(&path, IMAGE, 6);
        let daemon = Daemon::start(dir.path(), &path, &["--num-queues", "2"]);
        let mut h = HostileFrontend::connect(
            daemon.path(),
            Options {
                queues: 2,
                features,
            },
        );
        // 100 chains "available" on a queue of 16: the device must not take any.
        h.set_avail_idx(0, 100);
        let t0 = cpu_ticks(daemon.child.id());
        for _ in 0..50 {
            h.kick(0);
        }
        assert!(h.wait_used_for(0, Duration::from_millis(500)).is_none());
        // Queue 1 is unaffected, and the daemon is not spinning on queue 0.
        assert_eq!(h.read_ok(1, 0, 512), image[..512]);
        let burnt = cpu_ticks(daemon.child.id()) - t0;
        assert!(
            burnt < 25,
            "daemon burnt {burnt} ticks in ~0.5 s (features {features:#x})"
        );
        // The guest-triggerable complaint is rate-limited.
        let n = log_lines(&daemon, "avail") + log_lines(&daemon, "Iterator error");
        assert!(n <= 12, "{n} log lines about the avail ring");
        // Once the driver repairs its index, the queue serves again.
        h.set_avail_idx(0, 0);
        assert_eq!(h.read_ok(0, 1, 512), image[512..1024]);
        let mut daemon = daemon;
        assert!(daemon.child.try_wait().unwrap().is_none());
    }
}

#[test]
fn reads_over_256_mib_are_ioerr_even_from_a_small_buffer() {
    // Every data descriptor names the same 1 MiB of guest memory: a huge request costs the
    // guest nothing, so the device caps what one request may carry (memory is spent per host
    // extent while planning it).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let daemon = Daemon::start(dir.path(), &path, &["--format", "raw"]);
    let mut h = HostileFrontend::connect(daemon.path(), Options::default());
    let table = BUF + 0x8000;
    for (mib, expect) in [(256u64, OK), (257, IOERR)] {
        let mut bufs = vec![Buf::R(HDR, 16)];
        bufs.extend((0..mib).map(|_| Buf::W(REGION, 1 << 20)));
        bufs.push(Buf::W(STATUS, 1));
        let descs = linked(&bufs, 0);
        for (i, d) in descs.iter().enumerate() {
            h.mem.write(table + 16 * i as u64, &d.to_bytes());
        }
        h.mem.write(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        h.mem.write(STATUS, &[0xff]);
        h.put_descs(0, 0, &[Desc::indirect(table, 16 * descs.len() as u32)]);
        h.offer(0, 0);
        h.kick(0);
        let (_, len) = h.wait_used(0);
        assert_eq!(h.mem.read(STATUS, 1)[0], expect, "{mib} MiB");
        let want_len = if expect == OK {
            (mib << 20) as u32 + 1
        } else {
            1
        };
        assert_eq!(len, want_len, "{mib} MiB");
    }
    assert_eq!(h.read_ok(0, 0, 512), vec![0; 512]);
}
