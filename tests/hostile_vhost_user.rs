//! A hostile VMM: vhost-user messages with out-of-range queue indexes, bad queue sizes, ring
//! addresses outside memory, garbage on the socket, memory-table changes and disconnects with
//! I/O in flight. The daemon refuses the message (a NACK, after which vhost-user-backend closes
//! the connection) or keeps serving; it never dies, and the next front-end is served.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::frontend::*;
use common::{cpu_ticks, pattern_image, Daemon};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN};
use vmm_sys_util::eventfd::EventFd;

const IMAGE: usize = 4 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    image: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let image = pattern_image(&path, IMAGE, 7);
    let daemon = Daemon::start(
        dir.path(),
        &path,
        &["--num-queues", "2", "--queue-size", "16"],
    );
    Setup {
        _dir: dir,
        daemon,
        image,
    }
}

impl Setup {
    /// The daemon is alive and a new, well-behaved front-end reads the right data on both
    /// queues (retrying the connection while the daemon finishes the previous one).
    fn healthy(&mut self) {
        assert!(
            self.daemon.child.try_wait().unwrap().is_none(),
            "daemon died: {}",
            self.daemon.log_text()
        );
        let mut h = HostileFrontend::connect(
            self.daemon.path(),
            Options {
                queues: 2,
                ..Default::default()
            },
        );
        for q in 0..2 {
            assert_eq!(h.read_ok(q, 9, 4096), self.image[9 * 512..9 * 512 + 4096]);
        }
    }

    fn connect(&self) -> HostileFrontend {
        HostileFrontend::connect(
            self.daemon.path(),
            Options {
                queues: 2,
                ..Default::default()
            },
        )
    }
}

#[test]
fn out_of_range_queue_indexes_are_refused() {
    let mut s = setup();
    let cfg = {
        let h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
        h.vring_config(0, QSIZE)
    };
    type Msg = fn(&mut HostileFrontend, usize, &VringConfigData) -> vhost::Result<()>;
    let msgs: [(&str, Msg); 7] = [
        ("SET_VRING_NUM", |h, q, _| h.fe.set_vring_num(q, QSIZE)),
        ("SET_VRING_ADDR", |h, q, c| h.fe.set_vring_addr(q, c)),
        ("SET_VRING_BASE", |h, q, _| h.fe.set_vring_base(q, 0)),
        ("GET_VRING_BASE", |h, q, _| h.fe.get_vring_base(q).map(drop)),
        ("SET_VRING_KICK", |h, q, _| {
            h.fe.set_vring_kick(q, &EventFd::new(0).unwrap())
        }),
        ("SET_VRING_CALL", |h, q, _| {
            h.fe.set_vring_call(q, &EventFd::new(0).unwrap())
        }),
        ("SET_VRING_ENABLE", |h, q, _| h.fe.set_vring_enable(q, true)),
    ];
    for (name, msg) in msgs {
        for q in [2, 63] {
            let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
            assert!(
                msg(&mut h, q, &cfg).is_err(),
                "{name} for queue {q} accepted"
            );
        }
    }
    s.healthy();
}

#[test]
fn bad_queue_sizes_are_refused() {
    let mut s = setup();
    for size in [0u16, 32, 1024, u16::MAX] {
        let h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
        assert!(h.fe.set_vring_num(0, size).is_err(), "size {size} accepted");
    }
    // Not a power of two: refused (virtio-queue would keep its previous size, larger than the
    // rings the front-end laid out).
    for size in [12u16, 3, 15] {
        let h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
        assert!(h.fe.set_vring_num(0, size).is_err(), "size {size} accepted");
    }
    // Nor while the ring runs.
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.start_queue(0, QSIZE).unwrap();
    assert!(h.fe.set_vring_num(0, 8).is_err());
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.start_queue(0, 8).unwrap();
    assert_eq!(h.read_ok(0, 0, 512), s.image[..512]);
    drop(h);
    s.healthy();
}

#[test]
fn ring_addresses_outside_memory_are_refused() {
    let mut s = setup();
    let h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.fe.set_vring_num(0, QSIZE).unwrap();
    let mut cfg = h.vring_config(0, QSIZE);
    cfg.desc_table_addr = 0x10;
    assert!(h.fe.set_vring_addr(0, &cfg).is_err());
    let h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.fe.set_vring_num(0, QSIZE).unwrap();
    let mut cfg = h.vring_config(0, QSIZE);
    cfg.used_ring_addr = u64::MAX - 8;
    assert!(h.fe.set_vring_addr(0, &cfg).is_err());
    s.healthy();
}

/// Both queues started; the configuration that moves queue 0's rings to start inside memory
/// and end outside it.
fn rings_at_the_end(s: &Setup) -> (HostileFrontend, VringConfigData) {
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.start_queue(0, QSIZE).unwrap();
    h.start_queue(1, QSIZE).unwrap();
    let mut cfg = h.vring_config(0, QSIZE);
    cfg.desc_table_addr = h.mem.uva(MEM_END - 64);
    cfg.avail_ring_addr = h.mem.uva(MEM_END - 4);
    cfg.used_ring_addr = h.mem.uva(MEM_END - 8);
    (h, cfg)
}

#[test]
fn rings_running_off_the_end_of_memory_do_not_hurt() {
    let mut s = setup();
    // A running ring cannot move.
    let (h, cfg) = rings_at_the_end(&s);
    assert!(h.fe.set_vring_addr(0, &cfg).is_err());
    drop(h);
    // Queue 1 runs normally; queue 0's rings start inside memory and end outside it.
    let (mut h, cfg) = rings_at_the_end(&s);
    // Stopped, it can; only where each ring starts is checked then (the size may come later).
    h.fe.get_vring_base(0).unwrap();
    h.fe.set_vring_addr(0, &cfg).unwrap();
    h.fe.set_vring_call(0, &h.queues[0].call).unwrap();
    h.fe.set_vring_kick(0, &h.queues[0].kick).unwrap();
    // One chain "available", its avail ring entry just past the end of memory.
    h.mem.write(MEM_END - 2, &1u16.to_le_bytes());
    for _ in 0..30 {
        h.kick(0);
    }
    assert_eq!(h.read_ok(1, 2, 512), s.image[1024..1536]);
    drop(h);
    // Nothing written past the end, one rate-limited complaint, no error line per kick.
    let log = s
        .daemon
        .wait_for_log("queue 0: descriptor table or avail ring outside guest memory");
    let noisy = log.lines().filter(|l| l.contains("ERROR")).count();
    assert!(noisy <= 1, "{noisy} error lines:\n{log}");
    s.healthy();
}

#[test]
fn garbage_on_the_socket_closes_only_that_connection() {
    let mut s = setup();
    let mut rng = common::Rng::new(3);
    let headers: [&[u8]; 4] = [
        // GET_FEATURES with a 4 GiB body.
        &[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        // An unknown request code.
        &[0xee, 0xee, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        // SET_MEM_TABLE claiming 1000 regions, with no file descriptors.
        &[
            5, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0xe8, 3, 0, 0, 0, 0, 0, 0,
        ],
        // A header cut short.
        &[1, 0, 0],
    ];
    for (i, bytes) in headers.iter().enumerate() {
        let mut c = UnixStream::connect(s.daemon.path()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(bytes);
        drop(c);
        // Random bytes after a valid handshake prefix.
        let mut junk = vec![0u8; 64 + 64 * i];
        rng.fill(&mut junk);
        let mut c = UnixStream::connect(s.daemon.path()).unwrap();
        let _ = c.write_all(&junk);
        drop(c);
    }
    s.healthy();
}

#[test]
fn config_space_writes_and_reads_outside_it_are_refused() {
    let mut s = setup();
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    assert!(h
        .fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .is_err());
    let mut h2 = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    let r = h2
        .fe
        .get_config(0x1000, 8, VhostUserConfigFlags::WRITABLE, &[0; 8]);
    assert!(r.is_err(), "GET_CONFIG past the config space answered");
    drop((h, h2));
    s.healthy();
}

/// Offers `n` 64 KiB reads on queue `q`, each its own chain, without waiting.
fn offer_reads(h: &mut HostileFrontend, q: usize, n: u16) {
    for i in 0..n {
        let base = BUF + 0x2_0000 * u64::from(i);
        h.mem
            .write(base, &header(VIRTIO_BLK_T_IN, u64::from(i) * 128));
        h.mem.write(base + 0x100, &[0xff]);
        let first = i * 3;
        h.put_descs(
            q,
            first,
            &linked(
                &[
                    Buf::R(base, 16),
                    Buf::W(base + 0x1000, 0x1_0000),
                    Buf::W(base + 0x100, 1),
                ],
                first,
            ),
        );
        h.offer(q, first);
    }
    h.kick(q);
}

#[test]
fn memory_table_changes_with_io_in_flight() {
    let mut s = setup();
    let mut h = s.connect();
    for round in 0..3 {
        offer_reads(&mut h, 0, 5);
        // The same memory again (new mappings on the daemon's side), then one region fewer.
        h.fe.set_mem_table(&h.mem.regions(&[0, 1])).unwrap();
        for i in 0..5u64 {
            let (id, len) = h.wait_used(0);
            assert_eq!((id, len), (i as u32 * 3, 0x1_0001), "round {round}");
            let base = BUF + 0x2_0000 * i;
            assert_eq!(h.mem.read(base + 0x100, 1)[0], 0);
            let at = i as usize * 0x1_0000;
            assert_eq!(
                h.mem.read(base + 0x1000, 0x1_0000),
                s.image[at..at + 0x1_0000]
            );
        }
    }
    // Region 1 removed: buffers there are outside guest memory now.
    h.fe.remove_mem_region(&h.mem.regions(&[1])[0]).unwrap();
    h.mem.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    h.mem.write(STATUS, &[0xff]);
    h.submit(
        0,
        &[
            Buf::R(HDR, 16),
            Buf::W(REGION + 0x1000, 512),
            Buf::W(STATUS, 1),
        ],
    );
    assert_eq!(h.wait_used(0), (0, 1));
    assert_eq!(h.mem.read(STATUS, 1)[0], VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.read_ok(1, 0, 512), s.image[..512]);
    drop(h);
    s.healthy();
}

#[test]
fn disconnects_with_io_in_flight() {
    let mut s = setup();
    for round in 0..5 {
        let mut h = s.connect();
        offer_reads(&mut h, 0, 5);
        offer_reads(&mut h, 1, (round % 5) + 1);
        if round % 2 == 1 {
            // Stop a queue while it has work, then kick it anyway.
            let _ = h.fe.get_vring_base(0);
            h.kick(0);
        }
        drop(h);
    }
    s.healthy();
    // The image was only read.
    assert_eq!(
        std::fs::read(s._dir.path().join("disk.raw")).unwrap(),
        s.image
    );
}

#[test]
fn memory_regions_larger_than_their_file_are_refused() {
    let mut s = setup();
    // Region 0 claims 4 MiB of a 2 MiB memfd: touching the second half would be SIGBUS.
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    let mut regions = h.mem.regions(&[0]);
    regions[0].memory_size = 2 * REGION;
    let refused = h.fe.set_mem_table(&regions).is_err();
    if !refused {
        // Had it been accepted: a status byte past the end of the file.
        h.start_queue(0, QSIZE).unwrap();
        h.mem.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
        h.submit(
            0,
            &[
                Buf::R(HDR, 16),
                Buf::W(DATA, 512),
                Buf::W(REGION + 0x1000, 1),
            ],
        );
        let _ = h.wait_used_for(0, Duration::from_secs(1));
    }
    drop(h);
    s.healthy();
    assert!(refused, "SET_MEM_TABLE past the end of the file accepted");
    // The same through ADD_MEM_REG, with a mapping offset past the end.
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    let mut region = h.mem.regions(&[1])[0];
    region.guest_phys_addr = 8 * REGION;
    region.mmap_offset = REGION;
    assert!(h.fe.add_mem_region(&region).is_err());
    drop(h);
    s.healthy();
}

#[test]
fn avail_ring_at_guest_address_zero_does_not_spin() {
    // Found by the vhost_user_stream fuzz target: virtio-queue treats an avail ring at guest
    // address 0 as not ready and hands out no chain, while the index says one is there; with
    // EVENT_IDX the worker looped on "more work" forever, holding the queue (and
    // GET_VRING_BASE waited for it).
    let mut s = setup();
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT | F_EVENT_IDX);
    h.start_queue(1, QSIZE).unwrap();
    let mut cfg = h.vring_config(0, QSIZE);
    cfg.avail_ring_addr = h.mem.uva(0);
    h.fe.set_vring_num(0, QSIZE).unwrap();
    h.fe.set_vring_addr(0, &cfg).unwrap();
    h.fe.set_vring_base(0, 0).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    h.fe.set_vring_call(0, &call).unwrap();
    h.fe.set_vring_kick(0, &kick).unwrap();
    h.fe.set_vring_enable(0, true).unwrap();
    // avail.idx (at guest address 2) = 1.
    h.mem.write(2, &1u16.to_le_bytes());
    let t0 = cpu_ticks(s.daemon.child.id());
    for _ in 0..20 {
        kick.write(1).unwrap();
    }
    // Queue 1 still serves, and nothing burns a core.
    for _ in 0..5 {
        assert_eq!(h.read_ok(1, 0, 512), s.image[..512]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let burnt = cpu_ticks(s.daemon.child.id()) - t0;
    assert!(burnt < 15, "daemon burnt {burnt} ticks in ~0.3 s");
    h.fe.get_vring_base(0).unwrap();
    let log = s.daemon.log_text();
    assert_eq!(
        log.matches("queue 0: avail ring unusable").count(),
        1,
        "{log}"
    );
    drop(h);
    s.healthy();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn reconnects_leak_no_descriptors() {
    // vhost-user-backend leaked each queue thread's exit eventfd: two descriptors per
    // connection here, until a front-end reconnecting in a loop exhausted the daemon's limit.
    let s = setup();
    let pid = s.daemon.child.id();
    let mut counts = Vec::new();
    for _ in 0..12 {
        // While a connection is up, the previous one is completely torn down (the daemon serves
        // one at a time).
        let mut h = s.connect();
        assert_eq!(h.read_ok(0, 0, 512), s.image[..512]);
        counts.push(open_fds(pid));
        drop(h);
    }
    assert!(
        counts[2..].iter().all(|&n| n == counts[1]),
        "descriptors per connection: {counts:?}"
    );
}
