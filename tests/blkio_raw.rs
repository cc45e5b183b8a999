//! Raw images through a real vhost-user-blk front-end (libblkio): data path, flush, discard,
//! write-zeroes, queues, reconnects, read-only, bad requests, on both I/O engines and both cache
//! modes.

mod common;

use common::{allocated, file_range, pattern_image, read_file, Client, Daemon, Rng, REGION_LEN};

const MIB: usize = 1 << 20;
const EIO: i32 = -libc::EIO;

/// Engine and cache combinations every data-path test runs under.
const MODES: &[&[&str]] = &[
    &["--aio", "io-uring"],
    &["--aio", "threads"],
    &["--aio", "io-uring", "--mapped-reads", "off"],
    &["--aio", "io-uring", "--cache", "none"],
    &["--aio", "threads", "--cache", "none"],
];

fn with_modes(f: impl Fn(&[&str])) {
    for mode in MODES {
        eprintln!("mode {mode:?}");
        f(mode);
    }
}

#[test]
fn reads_match_the_file() {
    with_modes(|mode| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let data = pattern_image(&img, 32 * MIB, 1);
        let d = Daemon::start(dir.path(), &img, &[&["--format", "raw"], mode].concat());
        let mut c = Client::connect(d.path(), 1, false).unwrap();
        assert_eq!(c.capacity(), data.len() as u64);
        let mut rng = Rng::new(2);
        for _ in 0..200 {
            let len = (1 + rng.below(512) as usize) * 512;
            let off = rng.below(((data.len() - len) / 512) as u64) * 512;
            let got = c.read(0, off, len).unwrap();
            assert!(
                got == data[off as usize..off as usize + len],
                "read {off}+{len}"
            );
        }
        // A read as large as the whole buffer, and the last sector.
        assert!(c.read(0, 0, REGION_LEN).unwrap() == data[..REGION_LEN]);
        let end = data.len() as u64 - 512;
        assert!(c.read(0, end, 512).unwrap() == data[end as usize..]);
        drop(c);
        assert!(d.stop().success());
    });
}

#[test]
fn random_writes_then_flush_match_a_model() {
    with_modes(|mode| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let mut model = pattern_image(&img, 16 * MIB, 3);
        let d = Daemon::start(dir.path(), &img, &[&["--format", "raw"], mode].concat());
        let mut c = Client::connect(d.path(), 1, false).unwrap();
        let mut rng = Rng::new(4);
        for i in 0..300 {
            let len = (1 + rng.below(256) as usize) * 512;
            let off = rng.below(((model.len() - len) / 512) as u64) as usize * 512;
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            c.write(0, off as u64, &buf).unwrap();
            model[off..off + len].copy_from_slice(&buf);
            if i % 50 == 0 {
                c.flush(0).unwrap();
            }
        }
        c.flush(0).unwrap();
        // Acknowledged and flushed: the file itself holds the data.
        assert!(read_file(&img) == model);
        for _ in 0..50 {
            let len = (1 + rng.below(64) as usize) * 512;
            let off = rng.below(((model.len() - len) / 512) as u64) as usize * 512;
            assert!(c.read(0, off as u64, len).unwrap() == model[off..off + len]);
        }
        drop(c);
        assert!(d.stop().success());
    });
}

#[test]
fn discard_and_write_zeroes() {
    with_modes(|mode| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let data = pattern_image(&img, 16 * MIB, 5);
        let d = Daemon::start(dir.path(), &img, &[&["--format", "raw"], mode].concat());
        let mut c = Client::connect(d.path(), 1, false).unwrap();

        let before = allocated(&img);
        c.discard(0, 4 * MIB as u64, 2 * MIB as u64).unwrap();
        c.flush(0).unwrap();
        assert!(file_range(&img, 4 * MIB as u64, 2 * MIB)
            .iter()
            .all(|&b| b == 0));
        assert!(
            allocated(&img) <= before - 2 * MIB as u64,
            "discard punched no hole"
        );

        c.write_zeroes(0, 8 * MIB as u64, MIB as u64, false)
            .unwrap();
        c.write_zeroes(0, 10 * MIB as u64 + 512, 4096, true)
            .unwrap();
        assert!(c
            .read(0, 8 * MIB as u64, MIB)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert!(c
            .read(0, 10 * MIB as u64 + 512, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));

        // Untouched neighbours keep their data.
        let file = read_file(&img);
        assert!(file[..4 * MIB] == data[..4 * MIB]);
        assert!(file[6 * MIB..8 * MIB] == data[6 * MIB..8 * MIB]);
        assert!(file[9 * MIB..10 * MIB + 512] == data[9 * MIB..10 * MIB + 512]);
        assert!(file[10 * MIB + 4608..] == data[10 * MIB + 4608..]);
        drop(c);
        assert!(d.stop().success());
    });
}

#[test]
fn discard_ignore_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern_image(&img, 4 * MIB, 6);
    let d = Daemon::start(
        dir.path(),
        &img,
        &["--format", "raw", "--discard", "ignore"],
    );
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    c.discard(0, 0, MIB as u64).unwrap();
    // WRITE_ZEROES with UNMAP still zeroes, just without deallocating.
    c.write_zeroes(0, 2 * MIB as u64, 8192, true).unwrap();
    c.flush(0).unwrap();
    let file = read_file(&img);
    assert!(file[..2 * MIB] == data[..2 * MIB]);
    assert!(file[2 * MIB..2 * MIB + 8192].iter().all(|&b| b == 0));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn several_queues_at_once() {
    with_modes(|mode| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        pattern_image(&img, 16 * MIB, 7);
        let d = Daemon::start(
            dir.path(),
            &img,
            &[&["--format", "raw", "--num-queues", "4"], mode].concat(),
        );
        let mut c = Client::connect(d.path(), 4, false).unwrap();
        assert_eq!(c.queues.len(), 4);
        // Each queue keeps 16 writes of 64 KiB in flight, to its own quarter of the disk.
        let chunk = 64 * 1024;
        let base = c.region.addr;
        let mut expected = read_file(&img);
        for q in 0..4usize {
            for i in 0..16usize {
                let at = (q * 16 + i) * chunk;
                let fill = (q * 16 + i) as u8 ^ 0x5a;
                c.buf()[at..at + chunk].fill(fill);
                let off = (q * 4 * MIB + i * chunk) as u64;
                expected[off as usize..off as usize + chunk].fill(fill);
            }
        }
        std::thread::scope(|s| {
            for (q, queue) in c.queues.iter_mut().enumerate() {
                s.spawn(move || {
                    for i in 0..16usize {
                        let at = (q * 16 + i) * chunk;
                        let off = (q * 4 * MIB + i * chunk) as u64;
                        queue.write(
                            off,
                            (base + at) as *const u8,
                            chunk,
                            i,
                            blkio::ReqFlags::empty(),
                        );
                    }
                    for _ in 0..16 {
                        assert_eq!(Client::complete(queue).1, 0);
                    }
                    queue.flush(99, blkio::ReqFlags::empty());
                    assert_eq!(Client::complete(queue).1, 0);
                });
            }
        });
        assert!(read_file(&img) == expected);
        drop(c);
        assert!(d.stop().success());
    });
}

#[test]
fn reconnects_serve_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    pattern_image(&img, 4 * MIB, 8);
    let d = Daemon::start(dir.path(), &img, &["--format", "raw", "--num-queues", "2"]);
    for round in 0..4u8 {
        let mut c = Client::connect(d.path(), 2, false).unwrap();
        if round > 0 {
            // What the previous connection wrote is there.
            assert!(c
                .read(1, 4096 * u64::from(round - 1), 4096)
                .unwrap()
                .iter()
                .all(|&b| b == round));
        }
        c.write(0, 4096 * u64::from(round), &[round + 1; 4096])
            .unwrap();
        // Leave I/O in flight on purpose on the last rounds: the daemon drains it on disconnect.
        if round >= 2 {
            let p = c.ptr(0);
            c.queues[1].read(0, p, 1 << 20, 9, blkio::ReqFlags::empty());
        }
        drop(c);
    }
    assert!(d.stop().success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(log.matches("front-end connected").count(), 4, "{log}");
}

#[test]
fn read_only_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern_image(&img, 4 * MIB, 9);
    let d = Daemon::start(dir.path(), &img, &["--format", "raw", "--read-only"]);
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses to start it writable.
    let err = Client::connect(d.path(), 1, false)
        .err()
        .expect("read-only device started writable");
    assert_eq!(err.errno(), blkio::Errno::ROFS);
    let mut c = Client::connect(d.path(), 1, true).unwrap();
    assert!(c.read(0, 0, 65536).unwrap() == data[..65536]);
    assert_eq!(c.flush(0), Ok(()));
    drop(c);
    assert!(d.stop().success());
    assert!(read_file(&img) == data);
}

#[test]
fn an_image_shrunk_under_the_daemon_reads_as_the_file_does() {
    // Page-cache reads copy from a mapping of the image: bytes past a shrunk file's end fault
    // (SIGBUS) where preadv returns 0. The daemon catches the fault and reads through its engine.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern_image(&img, 4 * MIB, 10);
    let d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    let at = 3 * MIB;
    assert!(c.read(0, at as u64, 4096).unwrap() == data[at..at + 4096]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(MIB as u64).unwrap();
    assert_eq!(c.read(0, at as u64, 4096).unwrap(), vec![0; 4096]);
    assert!(c.read(0, 0, 4096).unwrap() == data[..4096]);
    // Grown back with new bytes: the mapping shows them.
    f.set_len(4 * MIB as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x77; 4096], at as u64).unwrap();
    assert_eq!(c.read(0, at as u64, 4096).unwrap(), vec![0x77; 4096]);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn out_of_range_requests_fail_and_the_queue_goes_on() {
    with_modes(|mode| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let data = pattern_image(&img, 4 * MIB, 10);
        let d = Daemon::start(dir.path(), &img, &[&["--format", "raw"], mode].concat());
        let mut c = Client::connect(d.path(), 1, false).unwrap();
        let cap = c.capacity();
        assert_eq!(c.read(0, cap, 512), Err(EIO));
        assert_eq!(c.read(0, cap - 512, 1024), Err(EIO));
        assert_eq!(c.write(0, cap - 512, &[1; 4096]), Err(EIO));
        assert_eq!(c.write_zeroes(0, cap - 512, 1024, false), Err(EIO));
        assert_eq!(c.discard(0, cap, 512), Err(EIO));
        assert_eq!(
            c.read(0, u64::MAX - 511, 512).err().map(|e| e < 0),
            Some(true)
        );
        // Nothing was written, and the queue still works.
        assert!(c.read(0, cap - 4096, 4096).unwrap() == data[data.len() - 4096..]);
        drop(c);
        assert!(d.stop().success());
        assert!(read_file(&img) == data);
    });
}

#[test]
fn requests_misaligned_to_a_4k_logical_block_fail() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern_image(&img, 4 * MIB, 11);
    let d = Daemon::start(
        dir.path(),
        &img,
        &["--format", "raw", "--logical-block-size", "4096"],
    );
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);
    // libblkio checks alignment itself, so use the raw queue API with 512-byte requests.
    let p = c.ptr(0);
    c.queues[0].read(512, p, 512, 1, blkio::ReqFlags::empty());
    assert_ne!(Client::complete(&mut c.queues[0]).1, 0);
    assert!(c.read(0, 8192, 8192).unwrap() == data[8192..16384]);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn probed_raw_refuses_image_headers_in_sector_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    pattern_image(&img, MIB, 12);
    let mut header = vec![0u8; 4096];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[7] = 3;

    // No --format: probed raw, sector 0 is protected.
    let d = Daemon::start(dir.path(), &img, &[]);
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    assert_eq!(c.write(0, 0, &header), Err(EIO));
    assert_eq!(
        c.write(0, 0, b"KDMV\0\0\0\0".repeat(64).as_slice()),
        Err(EIO)
    );
    // Ordinary data in sector 0, and headers elsewhere, are fine.
    c.write(0, 0, &[0xee; 512]).unwrap();
    c.write(0, 4096, &header).unwrap();
    drop(c);
    assert!(d.stop().success());
    assert_eq!(file_range(&img, 0, 512), vec![0xee; 512]);
    assert!(d_log_mentions(&dir, "probed as raw"));

    // An explicit --format raw lifts the restriction.
    let d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
    let mut c = Client::connect(d.path(), 1, false).unwrap();
    c.write(0, 0, &header).unwrap();
    c.flush(0).unwrap();
    drop(c);
    assert!(d.stop().success());
    assert_eq!(file_range(&img, 0, 4), b"QFI\xfb");
}

fn d_log_mentions(dir: &tempfile::TempDir, what: &str) -> bool {
    std::fs::read_to_string(dir.path().join("daemon.log"))
        .unwrap()
        .contains(what)
}

#[test]
fn misaligned_guest_buffers_with_o_direct_go_through_a_bounce_buffer() {
    for aio in ["io-uring", "threads"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let mut model = pattern_image(&img, 4 * MIB, 13);
        let d = Daemon::start(
            dir.path(),
            &img,
            &["--format", "raw", "--cache", "none", "--aio", aio],
        );
        let mut c = Client::connect(d.path(), 1, false).unwrap();
        // Buffers 8 bytes off any O_DIRECT alignment, larger than the 1 MiB bounce buffer.
        let len = 3 * MIB / 2;
        let mut data = vec![0u8; len];
        Rng::new(14).fill(&mut data);
        c.buf()[8..8 + len].copy_from_slice(&data);
        let p = c.ptr(8);
        c.queues[0].write(512, p, len, 1, blkio::ReqFlags::empty());
        assert_eq!(Client::complete(&mut c.queues[0]).1, 0);
        model[512..512 + len].copy_from_slice(&data);
        c.buf()[..REGION_LEN / 2].fill(0);
        c.queues[0].read(0, p, len + 512, 2, blkio::ReqFlags::empty());
        assert_eq!(Client::complete(&mut c.queues[0]).1, 0);
        assert!(c.buf()[8..8 + len + 512] == model[..len + 512]);
        c.flush(0).unwrap();
        drop(c);
        assert!(d.stop().success());
        assert!(read_file(&img) == model);
    }
}
