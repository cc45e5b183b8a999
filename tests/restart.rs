//! Restarting the daemon under a running front-end: in-flight tracking (INFLIGHT_SHMFD) through
//! the real protocol, hostile in-flight regions, and a clean stop that completes what it took
//! before it disconnects.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{pattern_image, signal, Daemon};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmm_sys_util::eventfd::EventFd;

const IMAGE: usize = 4 << 20;
const INFLIGHT: VhostUserProtocolFeatures = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
/// Bytes of one queue's in-flight region for QSIZE entries (libvhost-user's stride).
const STRIDE: u64 = (16 * QSIZE as u64 + 2).next_multiple_of(64);

struct Setup {
    dir: tempfile::TempDir,
    image_path: std::path::PathBuf,
    daemon: Daemon,
    image: Vec<u8>,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("disk.raw");
    let image = pattern_image(&image_path, IMAGE, 11);
    let daemon = start(&dir, &image_path, extra);
    Setup {
        dir,
        image_path,
        daemon,
        image,
    }
}

fn start(dir: &tempfile::TempDir, image: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--num-queues", "2", "--queue-size", "16"];
    args.extend_from_slice(extra);
    Daemon::start(dir.path(), image, &args)
}

/// Asks for an in-flight region for two queues of QSIZE and hands it back, as QEMU does at
/// its first start.
fn inflight_region(h: &mut HostileFrontend) -> (VhostUserInflight, File) {
    let (info, file) =
        h.fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, QSIZE))
            .expect("GET_INFLIGHT_FD");
    h.fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    (info, file)
}

fn region_u16(f: &File, at: u64) -> u16 {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, at).unwrap();
    u16::from_le_bytes(b)
}

fn region_u64(f: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

fn region_u8(f: &File, at: u64) -> u8 {
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0]
}

/// Where descriptor `head`'s state lies in queue `q`'s region.
fn desc_at(q: u64, head: u16) -> u64 {
    q * STRIDE + 16 + 16 * u64::from(head)
}

#[test]
fn requests_are_marked_and_cleared_in_the_region() {
    let s = setup(&[]);
    let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
    let (_, region) = inflight_region(&mut h);
    h.start_queue(0, QSIZE).unwrap();
    h.start_queue(1, QSIZE).unwrap();
    // A started ring initialises its region: version 1, its size, the ring's used index.
    for q in 0..2 {
        assert_eq!(region_u16(&region, q * STRIDE + 8), 1, "version");
        assert_eq!(region_u16(&region, q * STRIDE + 10), QSIZE, "desc_num");
    }
    for i in 0..5u64 {
        assert_eq!(h.read_ok(1, i, 512), s.image[i as usize * 512..][..512]);
    }
    // Each chain (head 0) was counted when taken, and cleared when used.
    assert_eq!(region_u16(&region, STRIDE + 14), 5, "used_idx");
    assert_eq!(region_u8(&region, desc_at(1, 0)), 0, "still marked");
    assert_eq!(region_u64(&region, desc_at(1, 0) + 8), 5, "pop counter");
    assert_eq!(region_u16(&region, STRIDE + 12), 0, "last_batch_head");
    // Queue 0 took nothing.
    assert_eq!(region_u64(&region, desc_at(0, 0) + 8), 0);
}

/// Chains a "previous daemon" was serving on a queue when it died, laid out by hand: heads 6,
/// 0, 9 and 3 are available in that order; 6, 0 and 9 were taken; 0 completed and its used
/// element is published; then the daemon was killed. head → (type, sector, fill byte); queue q
/// uses sectors 64 * q further.
const CRASH: [(u16, u32, u64, u8); 4] = [
    (6, VIRTIO_BLK_T_OUT, 8, 0xa1),
    (0, VIRTIO_BLK_T_OUT, 16, 0xb2),
    (9, VIRTIO_BLK_T_OUT, 24, 0xc3),
    (3, VIRTIO_BLK_T_IN, 40, 0x00),
];

/// Where head `head` of queue `q` has its header (status +0x800, data +0x1000).
fn buffers(q: u64, head: u16) -> u64 {
    BUF + q * 0x10_0000 + 0x1_0000 * u64::from(head)
}

/// How the daemon serves the image in a run of the restart test.
struct Variant {
    qcow2: bool,
    args: &'static [&'static str],
    features: u64,
}

impl Setup {
    /// Writes what the previous daemon did to the image: head 0's data.
    fn executed(&self, q: u64, v: &Variant) {
        let at = (16 + 64 * q) * 512;
        if v.qcow2 {
            let cmd = format!("write -P 0xb2 {at} 4096");
            common::qemu::qemu_io(self.dir.path(), self.image_path.to_str().unwrap(), &[cmd]);
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.image_path)
                .unwrap();
            f.write_all_at(&[0xb2; 4096], at).unwrap();
        }
    }
}

/// Writes queue `q`'s chains and avail ring, the used element of head 0, and (if `region` is
/// given) the marks the previous daemon would have left.
fn lay_out(q: u64, mem: &GuestMemory, region: Option<&File>) {
    let (table, avail, used) = rings(q as usize);
    for (i, &(head, kind, sector, fill)) in CRASH.iter().enumerate() {
        let b = buffers(q, head);
        mem.write(b, &header(kind, sector + 64 * q));
        let data = if kind == VIRTIO_BLK_T_IN {
            mem.fill(b + 0x1000, 4096, 0xee);
            Buf::W(b + 0x1000, 4096)
        } else {
            mem.fill(b + 0x1000, 4096, fill);
            Buf::R(b + 0x1000, 4096)
        };
        mem.write(b + 0x800, &[0xff]);
        for (j, d) in linked(&[Buf::R(b, 16), data, Buf::W(b + 0x800, 1)], head)
            .iter()
            .enumerate()
        {
            mem.write(table + 16 * (u64::from(head) + j as u64), &d.to_bytes());
        }
        mem.write(avail + 4 + 2 * i as u64, &head.to_le_bytes());
    }
    // used_event (EVENT_IDX): notify from the next used element on.
    mem.write(avail + 4 + 2 * u64::from(QSIZE), &1u16.to_le_bytes());
    mem.write(avail + 2, &4u16.to_le_bytes());
    mem.write(buffers(q, 0) + 0x800, &[0]);
    mem.write(used + 4, &0u32.to_le_bytes());
    mem.write(used + 8, &17u32.to_le_bytes());
    mem.write(used + 2, &1u16.to_le_bytes());
    if let Some(r) = region {
        let set = |at: u64, b: &[u8]| r.write_all_at(b, at).unwrap();
        for (head, counter, marked) in [(6u16, 100u64, 1u8), (0, 101, 0), (9, 102, 1)] {
            set(desc_at(q, head), &[marked]);
            set(desc_at(q, head) + 8, &counter.to_le_bytes());
        }
        set(desc_at(q, 0) + 6, &0u16.to_le_bytes());
        set(q * STRIDE + 12, &0u16.to_le_bytes()); // last_batch_head: head 0
        set(q * STRIDE + 14, &1u16.to_le_bytes()); // used_idx: head 0 recorded
    }
}

/// Starts queue `q` as QEMU does after a reconnect: base = the used index.
fn restart_queue(h: &mut HostileFrontend, q: usize) {
    let cfg = h.vring_config(q, QSIZE);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    h.fe.set_vring_num(q, QSIZE).unwrap();
    h.fe.set_vring_base(q, 1).unwrap();
    h.fe.set_vring_addr(q, &cfg).unwrap();
    h.fe.set_vring_kick(q, &kick).unwrap();
    h.fe.set_vring_call(q, &call).unwrap();
    h.fe.set_vring_enable(q, true).unwrap();
    let queue = Queue {
        kick,
        call,
        avail_idx: 4,
        used_seen: 1,
        size: QSIZE,
    };
    if h.queues.len() == q {
        h.queues.push(queue);
    } else {
        h.queues[q] = queue;
    }
}

/// Collects queue `q`'s used elements until `n` arrived and nothing more comes for 300 ms.
fn used_heads(h: &mut HostileFrontend, q: usize, n: usize) -> Vec<u32> {
    let mut heads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while heads.len() < n && Instant::now() < deadline {
        if let Some((id, _)) = h.wait_used_for(q, Duration::from_millis(100)) {
            heads.push(id);
        }
    }
    while let Some((id, _)) = h.wait_used_for(q, Duration::from_millis(300)) {
        heads.push(id);
    }
    heads.sort_unstable();
    heads
}

/// Kills the daemon after its first connection set up both queues, and returns the guest
/// memory and in-flight region the front-end keeps.
fn first_life(s: &mut Setup, features: u64, with_inflight: bool) -> (GuestMemory, Option<File>) {
    let proto = if with_inflight {
        INFLIGHT
    } else {
        VhostUserProtocolFeatures::empty()
    };
    let mut h = HostileFrontend::handshake_with(s.daemon.path(), features, proto);
    let region = with_inflight.then(|| inflight_region(&mut h).1);
    h.start_queue(0, QSIZE).unwrap();
    h.start_queue(1, QSIZE).unwrap();
    signal(&s.daemon.child, libc::SIGKILL);
    s.daemon.child.wait().unwrap();
    (h.mem, region)
}

fn restart_case(v: &Variant) {
    let mut s = setup(v.args);
    if v.qcow2 {
        s.daemon.stop();
        let img = s.dir.path().join("disk.qcow2");
        common::qemu::sh(
            s.dir.path(),
            &format!(
                "qemu-img convert -O qcow2 -o extended_l2=on,cluster_size=64k {} {}",
                s.image_path.display(),
                img.display()
            ),
        );
        s.image_path = img;
        s.daemon = start(&s.dir, &s.image_path, v.args);
    }
    let (mem, region) = first_life(&mut s, v.features, true);
    let region = region.unwrap();
    for q in 0..2 {
        lay_out(q, &mem, Some(&region));
        s.executed(q, v);
    }
    s.daemon = start(&s.dir, &s.image_path, v.args);
    let mut h = HostileFrontend::handshake_mem(s.daemon.path(), v.features, INFLIGHT, mem);
    // QEMU keeps its region across the reconnect and sends only SET_INFLIGHT_FD.
    let info = VhostUserInflight::new(2 * STRIDE, 0, 2, QSIZE);
    h.fe.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    for q in 0..2 {
        restart_queue(&mut h, q);
    }
    for q in 0..2 {
        // 6 and 9 were taken and not completed: run again; 3 was never taken; 0 was completed
        // and must not be repeated.
        assert_eq!(
            used_heads(&mut h, q, 3),
            [3, 6, 9],
            "{}",
            s.daemon.log_text()
        );
    }
    s.daemon
        .wait_for_log("queue 1: resubmitting 2 requests taken before the restart");
    // Everything is accounted for: nothing marked, the region's used index is the ring's.
    for q in 0..2 {
        for head in 0..QSIZE {
            assert_eq!(region_u8(&region, desc_at(q, head)), 0, "head {head}");
        }
        assert_eq!(region_u16(&region, q * STRIDE + 14), 4);
    }
    // Every status is OK and the read got the image's data.
    for q in 0..2u64 {
        for (head, kind, sector, _) in CRASH {
            let b = buffers(q, head);
            assert_eq!(h.mem.read(b + 0x800, 1)[0], 0, "queue {q} head {head}");
            if kind == VIRTIO_BLK_T_IN {
                let at = (sector + 64 * q) as usize * 512;
                assert_eq!(h.mem.read(b + 0x1000, 4096), s.image[at..at + 4096]);
            }
        }
    }
    // The queue goes on serving new requests after the resubmitted ones.
    assert_eq!(h.read_ok_at(0, 2, 512, HEALTH), s.image[1024..1536]);
    drop(h);
    assert!(s.daemon.stop().success());
    let image = if v.qcow2 {
        assert_eq!(common::qemu::qemu_check(&s.image_path), 0);
        common::qemu::qemu_raw(&s.image_path)
    } else {
        common::read_file(&s.image_path)
    };
    for q in 0..2u64 {
        for (head, kind, sector, fill) in CRASH {
            if kind == VIRTIO_BLK_T_OUT {
                let at = (sector + 64 * q) as usize * 512;
                assert_eq!(image[at..at + 4096], [fill; 4096], "queue {q} head {head}");
            }
        }
    }
}

#[test]
fn a_restarted_daemon_resubmits_what_its_predecessor_took() {
    restart_case(&Variant {
        qcow2: false,
        args: &[],
        features: F_INDIRECT,
    });
}

#[test]
fn restart_with_threads_and_event_idx() {
    restart_case(&Variant {
        qcow2: false,
        args: &["--aio", "threads"],
        features: F_INDIRECT | F_EVENT_IDX,
    });
}

#[test]
fn restart_on_qcow2_with_subclusters_allocating() {
    restart_case(&Variant {
        qcow2: true,
        args: &[],
        features: F_INDIRECT | F_EVENT_IDX,
    });
}

#[test]
fn restart_on_qcow2_with_o_direct_and_threads() {
    restart_case(&Variant {
        qcow2: true,
        args: &["--cache", "none", "--aio", "threads"],
        features: F_INDIRECT,
    });
}

/// The same crash without in-flight tracking: QEMU restarts the ring at the used index, so the
/// request completed out of order is executed and completed again and the one before it is
/// lost. This is what the tests above guard against.
#[test]
fn without_inflight_tracking_the_same_restart_repeats_and_loses_requests() {
    let v = Variant {
        qcow2: false,
        args: &["--inflight", "off"],
        features: F_INDIRECT,
    };
    let mut s = setup(v.args);
    let (mem, region) = first_life(&mut s, v.features, false);
    assert!(region.is_none());
    lay_out(0, &mem, None);
    s.executed(0, &v);
    s.daemon = start(&s.dir, &s.image_path, v.args);
    let mut h = HostileFrontend::handshake_mem(s.daemon.path(), v.features, INFLIGHT, mem);
    assert!(
        !h.fe.get_protocol_features().unwrap().contains(INFLIGHT),
        "--inflight off still offers INFLIGHT_SHMFD"
    );
    restart_queue(&mut h, 0);
    assert_eq!(used_heads(&mut h, 0, 3), [0, 3, 9]);
}

/// Writes `bytes` over the region of queue 0, then starts the queue: whatever the region says,
/// the daemon neither dies nor writes outside the rings and the buffers the chains name.
fn start_on_garbage(s: &Setup, bytes: &[u8]) {
    let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
    let (_, region) = inflight_region(&mut h);
    region.write_all_at(bytes, 0).unwrap();
    let before = h.mem.snapshot();
    h.start_queue(0, QSIZE).unwrap();
    // Heads the garbage marks name zeroed descriptors: no status byte, used length 0. The
    // queue may then be broken for this front-end (its avail index is behind what the region
    // says was taken): that is its own doing.
    std::thread::sleep(Duration::from_millis(50));
    assert_canaries(&h.mem, &before, &[], 1);
    drop(h);
    healthy(s);
}

/// The daemon lives and a new, well-behaved front-end is served.
fn healthy(s: &Setup) {
    let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
    inflight_region(&mut h);
    h.start_queue(0, QSIZE).unwrap();
    assert_eq!(h.read_ok_at(0, 3, 512, HEALTH), s.image[1536..2048]);
}

#[test]
fn hostile_inflight_regions_are_refused_or_contained() {
    let s = setup(&[]);
    // Regions that do not fit what they claim: refused, the connection ends.
    let bad = [
        (STRIDE, 0, 2, QSIZE, "smaller than two queues"),
        (2 * STRIDE, 4096, 2, QSIZE, "past the end of the file"),
        (2 * STRIDE, 100, 2, QSIZE, "unaligned offset"),
        (2 * STRIDE, 0, 2, 12, "queue size not a power of two"),
        (2 * STRIDE, 0, 0, QSIZE, "no queue"),
        (u64::MAX, u64::MAX - 4095, 2, QSIZE, "wrapping"),
    ];
    for (size, offset, queues, qsize, what) in bad {
        let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
        let (_, file) =
            h.fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, QSIZE))
                .unwrap();
        let info = VhostUserInflight::new(size, offset, queues, qsize);
        assert!(
            h.fe.set_inflight_fd(&info, file.as_raw_fd()).is_err(),
            "{what} accepted"
        );
    }
    healthy(&s);
    // More queues than the device has, a queue size of 0 or 3.
    for (queues, qsize) in [(3u16, QSIZE), (2, 0), (2, 3), (0, QSIZE), (1, 65535)] {
        let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
        assert!(h
            .fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, queues, qsize))
            .is_err());
    }
    // Garbage content: marks on every head with repeated counters, used_idx far off, a batch
    // list that loops, a wrong version, a desc_num that does not match the ring.
    let mut region = vec![0u8; 2 * STRIDE as usize];
    region[8..10].copy_from_slice(&1u16.to_le_bytes());
    region[10..12].copy_from_slice(&QSIZE.to_le_bytes());
    region[12..14].copy_from_slice(&5u16.to_le_bytes());
    region[14..16].copy_from_slice(&0x8000u16.to_le_bytes());
    for head in 0..QSIZE as usize {
        let d = 16 + 16 * head;
        region[d] = 1;
        region[d + 6..d + 8].copy_from_slice(&5u16.to_le_bytes());
        region[d + 8..d + 16].copy_from_slice(&7u64.to_le_bytes());
    }
    start_on_garbage(&s, &region);
    region[14..16].copy_from_slice(&1u16.to_le_bytes());
    region[13] = 0xff; // last_batch_head out of range
    start_on_garbage(&s, &region);
    region[10..12].copy_from_slice(&64u16.to_le_bytes());
    start_on_garbage(&s, &region);
    region[8..10].copy_from_slice(&0xffu16.to_le_bytes());
    start_on_garbage(&s, &[0xff; 2 * STRIDE as usize]);
    // A ring larger than the region was laid out for is served, untracked.
    let mut h = HostileFrontend::handshake_with(s.daemon.path(), F_INDIRECT, INFLIGHT);
    let (_, file) =
        h.fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 8))
            .unwrap();
    h.fe.set_inflight_fd(&VhostUserInflight::new(2 * 192, 0, 2, 8), file.as_raw_fd())
        .unwrap();
    h.start_queue(0, QSIZE).unwrap();
    assert_eq!(h.read_ok(0, 0, 512), s.image[..512]);
    drop(h);
    s.daemon.wait_for_log("has no room for a ring of 16");
    healthy(&s);
}

#[test]
fn sigterm_completes_and_publishes_before_it_disconnects() {
    let mut s = setup(&["--cache", "none"]);
    let mut h = HostileFrontend::handshake(s.daemon.path(), F_INDIRECT);
    h.start_queue(0, QSIZE).unwrap();
    // 15 chains: writes of 256 KiB and flushes, all available at once.
    let (_, avail, _) = rings(0);
    for i in 0..15u16 {
        let b = BUF + 0x1_0000 * u64::from(i % 8) + if i >= 8 { 0x10_0000 } else { 0 };
        let kind = if i % 3 == 2 {
            VIRTIO_BLK_T_FLUSH
        } else {
            VIRTIO_BLK_T_OUT
        };
        h.mem.write(b, &header(kind, u64::from(i) * 512));
        h.mem.write(b + 0x800, &[0xff]);
        let bufs: Vec<Buf> = if kind == VIRTIO_BLK_T_FLUSH {
            vec![Buf::R(b, 16), Buf::W(b + 0x800, 1)]
        } else {
            h.mem.fill(b + 0x1000, 0x8000, i as u8);
            vec![
                Buf::R(b, 16),
                Buf::R(b + 0x1000, 0x8000),
                Buf::W(b + 0x800, 1),
            ]
        };
        // Chain i at descriptors 3i.. is too long for a table of 16: use an indirect table.
        let table = b + 0xe000;
        for (j, d) in linked(&bufs, 0).iter().enumerate() {
            h.mem.write(table + 16 * j as u64, &d.to_bytes());
        }
        h.put_descs(0, i, &[Desc::indirect(table, 16 * bufs.len() as u32)]);
        h.mem.write(avail + 4 + 2 * u64::from(i), &i.to_le_bytes());
    }
    h.mem.write(avail + 2, &15u16.to_le_bytes());
    h.kick(0);
    // Once the daemon has taken the chains (the first completes), stop it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.used_idx(0) == 0 && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    let at_signal = h.used_idx(0);
    signal(&s.daemon.child, libc::SIGTERM);
    // The daemon closes the connection only after every request it took is in the used ring:
    // what the front-end finds at the hang-up is final.
    let mut pfd = libc::pollfd {
        fd: h.fe.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 10_000) };
    let at_hangup = h.used_idx(0);
    let status = s.daemon.child.wait().unwrap();
    assert!(status.success(), "{}", s.daemon.log_text());
    assert_eq!(h.used_idx(0), at_hangup, "completions after the hang-up");
    // Taken chains were completed; chains never taken stay for the next daemon, which QEMU
    // restarts at the used index.
    assert!(at_hangup > 0 && at_hangup <= 15);
    eprintln!("{at_signal} requests completed at SIGTERM, {at_hangup} at the hang-up");
    let (_, _, used) = rings(0);
    let mut ids: Vec<u32> = (0..at_hangup)
        .map(|k| {
            u32::from_le_bytes(
                h.mem
                    .read(used + 4 + 8 * u64::from(k), 4)
                    .try_into()
                    .unwrap(),
            )
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..u32::from(at_hangup)).collect::<Vec<_>>());
}

#[test]
fn reset_device_completes_what_was_taken_and_the_device_starts_again() {
    let s = setup(&[]);
    let mut h = HostileFrontend::handshake_with(
        s.daemon.path(),
        F_INDIRECT,
        VhostUserProtocolFeatures::RESET_DEVICE,
    );
    h.start_queue(0, QSIZE).unwrap();
    // A read offered and kicked, then the reset right away.
    h.mem.write(HDR, &header(VIRTIO_BLK_T_IN, 4));
    h.mem.write(STATUS, &[0xff]);
    h.submit(0, &[Buf::R(HDR, 16), Buf::W(DATA, 4096), Buf::W(STATUS, 1)]);
    h.fe.reset_device().unwrap();
    // Whatever the ring had taken is completed by the time the reset is acknowledged.
    let used = h.used_idx(0);
    assert!(used <= 1);
    if used == 1 {
        assert_eq!(h.mem.read(STATUS, 1)[0], 0);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.used_idx(0), used, "the ring was served after the reset");
    // The driver sets the device up again.
    h.fe.set_features(h.features).unwrap();
    h.queues.clear();
    h.start_queue(0, QSIZE).unwrap();
    assert_eq!(h.read_ok_at(0, 2, 512, HEALTH), s.image[1024..1536]);
}
