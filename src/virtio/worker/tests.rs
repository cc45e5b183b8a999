//! Worker tests on a mock split queue: the statuses and used lengths the spec asks for, for
//! requests a well-behaved front-end (libblkio) never sends.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::plan::OFFLOAD_MIN;
use super::*;
use crate::block::{ExtraData, Target};
use crate::virtio::{DiscardMode, MAX_DISCARD_SECTORS};

/// The `BlockBackend` methods a test backend passes unchanged to `self.inner()`.
macro_rules! delegate_flush_discard_sync {
    () => {
        fn flush(&self, out: &mut Vec<HostOp>) -> Result<(), BlockError> {
            self.inner().flush(out)
        }
        fn discard(
            &self,
            offset: u64,
            len: u64,
            unmap: bool,
            waker: &Waker,
            out: &mut Vec<HostOp>,
        ) -> Result<(), BlockError> {
            self.inner().discard(offset, len, unmap, waker, out)
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            unmap: bool,
            waker: &Waker,
            out: &mut Vec<HostOp>,
        ) -> Result<(), BlockError> {
            self.inner().write_zeroes(offset, len, unmap, waker, out)
        }
        fn sync(&self) -> Result<(), BlockError> {
            self.inner().sync()
        }
    };
}

mod restart;
use crate::block::file::ImageFile;
use crate::block::raw::RawBackend;
use crate::block::CacheMode;
use crate::io::AioMode;
use crate::virtio::serial_bytes;

const QSIZE: u16 = 64;
/// Ring layout in guest memory.
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const IMAGE: usize = 1 << 20;

struct Harness {
    mem: GuestMemAtomic,
    vring: Vring,
    worker: QueueWorker,
    image: tempfile::NamedTempFile,
    next_desc: u16,
    next_buf: u64,
}

#[derive(Clone, Copy)]
enum Buf {
    R(u64, u32),
    W(u64, u32),
}

impl Harness {
    fn new(read_only: bool, aio: AioMode) -> Harness {
        Self::wrapping(read_only, aio, false, |raw| raw)
    }

    /// A harness whose page-cache reads are copied from a mapping of the image.
    fn mapped(read_only: bool) -> Harness {
        Self::wrapping(read_only, AioMode::IoUring, true, |raw| raw)
    }

    /// A harness whose backend is `wrap` applied to the raw backend of its image.
    fn wrapping(
        read_only: bool,
        aio: AioMode,
        mapped_reads: bool,
        wrap: impl FnOnce(Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend>,
    ) -> Harness {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().write_all_at(&vec![0x11; IMAGE], 0).unwrap();
        let file = ImageFile::open(image.path(), read_only, CacheMode::Writeback).unwrap();
        let backend = wrap(Arc::new(RawBackend::new(file, read_only, false)));
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
        );
        let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let settings = Arc::new(DeviceSettings {
            num_queues: 1,
            queue_size: QSIZE,
            logical_block_size: 512,
            serial: serial_bytes("serial-under-test"),
            discard: DiscardMode::Unmap,
            read_only,
            mapped_reads,
        });
        let worker = QueueWorker::new(
            0,
            settings,
            backend,
            mem.clone(),
            Engine::new(aio, 64).unwrap(),
        );
        Harness {
            mem,
            vring,
            worker,
            image,
            next_desc: 0,
            next_buf: 0x10_0000,
        }
    }

    /// Guest memory for a buffer of `len` bytes.
    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(4096);
        at
    }

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let m = self.mem.memory();
        m.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
        at
    }

    fn status_buf(&mut self) -> u64 {
        let at = self.alloc(1);
        self.mem
            .memory()
            .write_obj(0xffu8, GuestAddress(at))
            .unwrap();
        at
    }

    /// Makes a write of `len` bytes of `fill` at `sector` available; returns its head and the
    /// address of its status byte.
    fn add_write(&mut self, sector: u64, fill: u8, len: u32) -> (u16, u64) {
        let hdr = self.header(VIRTIO_BLK_T_OUT, sector);
        let data = self.alloc(u64::from(len));
        self.mem
            .memory()
            .write_slice(&vec![fill; len as usize], GuestAddress(data))
            .unwrap();
        let st = self.status_buf();
        let head = self.add(&[Buf::R(hdr, 16), Buf::R(data, len), Buf::W(st, 1)]);
        (head, st)
    }

    /// Makes a chain available; returns its head index.
    fn add(&mut self, bufs: &[Buf]) -> u16 {
        let first = self.put_chain(bufs);
        let m = self.mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(first, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
        first
    }

    /// Writes a chain into the descriptor table without making it available; returns its head.
    fn put_chain(&mut self, bufs: &[Buf]) -> u16 {
        let m = self.mem.memory();
        let first = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (addr, len, mut flags) = match *b {
                    Buf::R(a, l) => (a, l, 0u16),
                    Buf::W(a, l) => (a, l, VRING_DESC_F_WRITE as u16),
                };
                let next = first + i as u16 + 1;
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        for (i, d) in descs.iter().enumerate() {
            m.write_obj(*d, GuestAddress(DESC + 16 * (u64::from(first) + i as u64)))
                .unwrap();
        }
        self.next_desc += bufs.len() as u16;
        first
    }

    /// A 512-byte read of `sector` into a buffer of its own: (data, status, chain).
    fn read_bufs(&mut self, sector: u64) -> (u64, u64, [Buf; 3]) {
        let hdr = self.header(VIRTIO_BLK_T_IN, sector);
        let data = self.alloc(512);
        let st = self.status_buf();
        (
            data,
            st,
            [Buf::R(hdr, 16), Buf::W(data, 512), Buf::W(st, 1)],
        )
    }

    /// The used ring's entries: (head, used length).
    fn used(&self) -> Vec<(u32, u32)> {
        let m = self.mem.memory();
        let n: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(n))
            .map(|i| {
                let at = USED + 4 + 8 * i;
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Processes the queue and waits for everything; returns (head, used len) per used entry.
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.worker.process_queue(&self.vring, false);
        self.worker.drain();
        self.used()
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.memory().read_obj(GuestAddress(at)).unwrap()
    }

    fn segment(&mut self, sector: u64, num: u32, flags: u32) -> u64 {
        let at = self.alloc(16);
        let m = self.mem.memory();
        m.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(num.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        at
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_lands_in_guest_memory_and_counts_in_used_len() {
    for aio in [AioMode::IoUring, AioMode::Threads] {
        let mut h = Harness::new(false, aio);
        h.image.as_file().write_all_at(&[0xab; 1024], 4096).unwrap();
        let hdr = h.header(VIRTIO_BLK_T_IN, 8);
        let data = h.alloc(1024);
        let st = h.status_buf();
        let head = h.add(&[Buf::R(hdr, 16), Buf::W(data, 1024), Buf::W(st, 1)]);
        assert_eq!(h.run(), vec![(u32::from(head), 1025)]);
        assert_eq!(h.byte(st), OK);
        let mut got = [0u8; 1024];
        h.mem
            .memory()
            .read_slice(&mut got, GuestAddress(data))
            .unwrap();
        assert_eq!(got, [0xab; 1024]);
    }
}

#[test]
fn cached_reads_are_copied_from_a_mapping_and_see_earlier_writes() {
    let mut h = Harness::mapped(false);
    let pattern: Vec<u8> = (0..64 << 10).map(|i| (i % 253) as u8).collect();
    h.image.as_file().write_all_at(&pattern, 64 << 10).unwrap();
    // A write through the worker (io_uring), then reads through the mapping.
    let (_, st) = h.add_write(128, 0x5a, 4096);
    h.run();
    assert_eq!(h.byte(st), OK);
    let mut expect = pattern.clone();
    expect[0..4096].fill(0x5a);
    // 64 KiB over three uneven buffers, and 1 KiB at an odd sector.
    let hdr = h.header(VIRTIO_BLK_T_IN, 128);
    let bufs = [h.alloc(1000), h.alloc(30_000), h.alloc(34_536)];
    let st1 = h.status_buf();
    h.add(&[
        Buf::R(hdr, 16),
        Buf::W(bufs[0], 1000),
        Buf::W(bufs[1], 30_000),
        Buf::W(bufs[2], 34_536),
        Buf::W(st1, 1),
    ]);
    let hdr = h.header(VIRTIO_BLK_T_IN, 128 + 9);
    let small = h.alloc(1024);
    let st2 = h.status_buf();
    h.add(&[Buf::R(hdr, 16), Buf::W(small, 1024), Buf::W(st2, 1)]);
    let copied = h.worker.mapped.as_ref().unwrap().copies();
    h.worker.process_queue(&h.vring, false);
    // Copied while the queue was processed: nothing went to the engine.
    assert_eq!(h.worker.mapped.as_ref().unwrap().copies(), copied + 2);
    assert_eq!(h.worker.in_flight(), 0);
    assert_eq!(h.used().len(), 3);
    assert_eq!((h.byte(st1), h.byte(st2)), (OK, OK));
    let m = h.mem.memory();
    let mut got = vec![0u8; 64 << 10];
    m.read_slice(&mut got[..1000], GuestAddress(bufs[0]))
        .unwrap();
    m.read_slice(&mut got[1000..31_000], GuestAddress(bufs[1]))
        .unwrap();
    m.read_slice(&mut got[31_000..], GuestAddress(bufs[2]))
        .unwrap();
    assert!(
        got == expect,
        "the mapped read's bytes differ from the image's"
    );
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(small)).unwrap();
    assert_eq!(got, expect[9 * 512..][..1024]);
}

#[test]
fn a_large_page_cache_read_split_across_threads_lands_whole() {
    // Reads from OFFLOAD_MIN on are split, half of them run by io_uring's workers: every byte
    // must still land where it belongs, across uneven guest buffers.
    const LEN: usize = 768 << 10;
    const AT: u64 = 128 << 10;
    const FIRST: usize = 100 << 10;
    assert!(LEN as u64 >= OFFLOAD_MIN);
    let pattern: Vec<u8> = (0..LEN).map(|i| (i / 512 % 251) as u8).collect();
    for aio in [AioMode::IoUring, AioMode::Threads] {
        let mut h = Harness::new(false, aio);
        h.image.as_file().write_all_at(&pattern, AT).unwrap();
        let hdr = h.header(VIRTIO_BLK_T_IN, AT / 512);
        let a = h.alloc(FIRST as u64);
        let b = h.alloc((LEN - FIRST) as u64);
        let st = h.status_buf();
        let head = h.add(&[
            Buf::R(hdr, 16),
            Buf::W(a, FIRST as u32),
            Buf::W(b, (LEN - FIRST) as u32),
            Buf::W(st, 1),
        ]);
        assert_eq!(h.run(), vec![(u32::from(head), LEN as u32 + 1)]);
        assert_eq!(h.byte(st), OK);
        let mut got = vec![0u8; LEN];
        let m = h.mem.memory();
        m.read_slice(&mut got[..FIRST], GuestAddress(a)).unwrap();
        m.read_slice(&mut got[FIRST..], GuestAddress(b)).unwrap();
        assert!(got == pattern, "{aio:?}: the read's bytes landed elsewhere");
    }
}

#[test]
fn unknown_types_flags_and_segment_counts_are_unsupp() {
    let mut h = Harness::new(false, AioMode::IoUring);
    let mut expect = Vec::new();
    let mut check = |h: &mut Harness, bufs: Vec<Buf>, st: u64, status: u8| {
        let head = h.add(&bufs);
        expect.push((head, st, status));
    };
    for t in [
        0x99u32,
        10, /* GET_LIFETIME */
        2,  /* SCSI */
        VIRTIO_BLK_T_SECURE_ERASE,
    ] {
        let hdr = h.header(t, 0);
        let st = h.status_buf();
        check(&mut h, vec![Buf::R(hdr, 16), Buf::W(st, 1)], st, UNSUPP);
    }
    // UNMAP is not allowed on DISCARD; unknown flags on either.
    for (t, flags) in [
        (VIRTIO_BLK_T_DISCARD, 1),
        (VIRTIO_BLK_T_DISCARD, 4),
        (VIRTIO_BLK_T_WRITE_ZEROES, 2),
    ] {
        let hdr = h.header(t, 0);
        let seg = h.segment(0, 8, flags);
        let st = h.status_buf();
        check(
            &mut h,
            vec![Buf::R(hdr, 16), Buf::R(seg, 16), Buf::W(st, 1)],
            st,
            UNSUPP,
        );
    }
    // More segments than advertised.
    let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
    let segs = h.alloc(16 * 17);
    let st = h.status_buf();
    check(
        &mut h,
        vec![Buf::R(hdr, 16), Buf::R(segs, 16 * 17), Buf::W(st, 1)],
        st,
        UNSUPP,
    );
    // A payload that is not whole segments, and a segment larger than advertised: IOERR.
    let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = h.segment(0, 8, 0);
    let st = h.status_buf();
    check(
        &mut h,
        vec![Buf::R(hdr, 16), Buf::R(seg, 12), Buf::W(st, 1)],
        st,
        IOERR,
    );
    let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = h.segment(0, MAX_DISCARD_SECTORS + 1, 0);
    let st = h.status_buf();
    check(
        &mut h,
        vec![Buf::R(hdr, 16), Buf::R(seg, 16), Buf::W(st, 1)],
        st,
        IOERR,
    );

    let used = h.run();
    assert_eq!(used.len(), expect.len());
    for (head, st, status) in expect {
        assert!(
            used.contains(&(u32::from(head), 1)),
            "head {head}: {used:?}"
        );
        assert_eq!(h.byte(st), status, "head {head}");
    }
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = Harness::new(false, AioMode::IoUring);
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let id = h.alloc(20);
    let st = h.status_buf();
    let a = h.add(&[Buf::R(hdr, 16), Buf::W(id, 20), Buf::W(st, 1)]);
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let short = h.alloc(6);
    let st2 = h.status_buf();
    let b = h.add(&[Buf::R(hdr, 16), Buf::W(short, 6), Buf::W(st2, 1)]);
    assert_eq!(h.run(), vec![(u32::from(a), 21), (u32::from(b), 7)]);
    let mut got = [0u8; 20];
    h.mem
        .memory()
        .read_slice(&mut got, GuestAddress(id))
        .unwrap();
    assert_eq!(&got, b"serial-under-test\0\0\0");
    assert_eq!((h.byte(st), h.byte(st2)), (OK, OK));
}

#[test]
fn read_only_refuses_writes_even_when_the_driver_ignores_ro() {
    let mut h = Harness::new(true, AioMode::IoUring);
    let mut statuses = Vec::new();
    let (_, st) = h.add_write(0, 0x22, 512);
    statuses.push((st, IOERR));
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let hdr = h.header(t, 0);
        let seg = h.segment(0, 8, 0);
        let st = h.status_buf();
        h.add(&[Buf::R(hdr, 16), Buf::R(seg, 16), Buf::W(st, 1)]);
        statuses.push((st, IOERR));
    }
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_buf();
    h.add(&[Buf::R(hdr, 16), Buf::W(st, 1)]);
    statuses.push((st, OK));
    assert_eq!(h.run().len(), 4);
    for (st, want) in statuses {
        assert_eq!(h.byte(st), want);
    }
    let mut file = vec![0u8; IMAGE];
    h.image.as_file().read_exact_at(&mut file, 0).unwrap();
    assert!(file.iter().all(|&b| b == 0x11));
}

#[test]
fn bad_chains_complete_and_the_queue_goes_on() {
    let mut h = Harness::new(false, AioMode::IoUring);
    // No writable byte: returned with used length 0.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let a = h.add(&[Buf::R(hdr, 16)]);
    // Short header: IOERR.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let st_b = h.status_buf();
    let b = h.add(&[Buf::R(hdr, 8), Buf::W(st_b, 1)]);
    // Data buffer outside guest memory: IOERR.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let st_c = h.status_buf();
    let c = h.add(&[Buf::R(hdr, 16), Buf::W(0x3f_f000, 0x2000), Buf::W(st_c, 1)]);
    // Sector arithmetic that overflows, and a range past the end: IOERR.
    let hdr = h.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
    let data = h.alloc(512);
    let st_d = h.status_buf();
    let d = h.add(&[Buf::R(hdr, 16), Buf::W(data, 512), Buf::W(st_d, 1)]);
    let hdr = h.header(VIRTIO_BLK_T_OUT, (IMAGE as u64 / 512) - 1);
    let data = h.alloc(1024);
    let st_e = h.status_buf();
    let e = h.add(&[Buf::R(hdr, 16), Buf::R(data, 1024), Buf::W(st_e, 1)]);
    // A good request after all of them still works.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(512);
    let st_f = h.status_buf();
    let f = h.add(&[Buf::R(hdr, 16), Buf::W(data, 512), Buf::W(st_f, 1)]);
    let used = h.run();
    for (head, len) in [(a, 0), (b, 1), (c, 1), (d, 1), (e, 1), (f, 513)] {
        assert!(used.contains(&(u32::from(head), len)), "{head}: {used:?}");
    }
    for st in [st_b, st_c, st_d, st_e] {
        assert_eq!(h.byte(st), IOERR);
    }
    assert_eq!(h.byte(st_f), OK);
}

#[test]
fn drain_completes_everything_in_flight() {
    let mut h = Harness::new(false, AioMode::Threads);
    let mut sts = Vec::new();
    for i in 0..16 {
        let hdr = h.header(VIRTIO_BLK_T_OUT, i * 8);
        let data = h.alloc(4096);
        let st = h.status_buf();
        h.add(&[Buf::R(hdr, 16), Buf::R(data, 4096), Buf::W(st, 1)]);
        sts.push(st);
    }
    h.worker.process_queue(&h.vring, false);
    // Whatever is still in flight after the kick, a drain (GET_VRING_BASE) finishes and
    // publishes all of it.
    h.worker.drain();
    assert_eq!(h.worker.in_flight(), 0);
    assert_eq!(h.used().len(), 16);
    for st in sts {
        assert_eq!(h.byte(st), OK);
    }
}

/// Raw backend whose writes also copy `COPY_LEN` bytes of `source` to `COPY_AT` of the image, the
/// way qcow2 copy-on-write does: the copy's reads are left to the worker.
struct CopyingBackend {
    /// The harness's raw backend, set when the harness is built.
    inner: std::sync::OnceLock<Arc<dyn BlockBackend>>,
    source: std::fs::File,
    commits: std::sync::Mutex<Vec<bool>>,
}

/// Right after the guest's 4 KiB at 0: the copy joins the guest's write.
const COPY_AT: u64 = 4096;
const COPY_LEN: usize = 12 * 1024;

impl CopyingBackend {
    fn inner(&self) -> &dyn BlockBackend {
        &**self.inner.get().unwrap()
    }
}

impl BlockBackend for CopyingBackend {
    fn info(&self) -> &crate::block::BackendInfo {
        self.inner().info()
    }
    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BlockError> {
        self.inner().map_read(offset, len, out)
    }
    fn begin_write(
        &self,
        offset: u64,
        len: u64,
        waker: &Waker,
    ) -> Result<crate::block::WritePlan, BlockError> {
        use std::os::unix::io::AsRawFd;
        let mut plan = self.inner().begin_write(offset, len, waker)?;
        let Target::Data { fd: image_fd, .. } = plan.extents[0].target else {
            panic!("raw writes go to the image file");
        };
        let mut buf = AlignedBuf::new(COPY_LEN, 4096);
        // The middle 4 KiB is filled in by the backend, the rest by two reads.
        buf.as_mut_slice()[4096..8192].fill(0x5a);
        let read = |at: usize| crate::block::FillRead {
            fd: self.source.as_raw_fd(),
            offset: at as u64,
            at,
            len: 4096,
        };
        plan.extra.push(crate::block::ExtraWrite {
            fd: image_fd,
            offset: COPY_AT,
            data: ExtraData::Bytes {
                buf,
                reads: vec![read(0), read(8192)],
            },
        });
        plan.ticket = Some(7);
        Ok(plan)
    }
    fn commit_write(&self, ticket: u64, ok: bool) -> Result<(), BlockError> {
        assert_eq!(ticket, 7);
        self.commits.lock().unwrap().push(ok);
        Ok(())
    }
    delegate_flush_discard_sync!();
}

#[test]
fn copy_on_write_reads_complete_before_their_write_and_failures_fail_the_request() {
    for aio in [AioMode::IoUring, AioMode::Threads] {
        for readable in [true, false] {
            let src = tempfile::NamedTempFile::new().unwrap();
            src.as_file().write_all_at(&[0xc3; COPY_LEN], 0).unwrap();
            // A write-only descriptor makes the copy's reads fail (EBADF).
            let source = std::fs::OpenOptions::new()
                .read(readable)
                .write(!readable)
                .open(src.path())
                .unwrap();
            let backend = Arc::new(CopyingBackend {
                inner: Default::default(),
                source,
                commits: Default::default(),
            });
            let b = backend.clone();
            let mut h = Harness::wrapping(false, aio, false, move |raw| {
                b.inner.set(raw).ok();
                b
            });
            let (head, st) = h.add_write(0, 0x77, 4096);
            assert_eq!(h.run(), vec![(u32::from(head), 1)]);
            let mut copied = vec![0u8; COPY_LEN];
            h.image
                .as_file()
                .read_exact_at(&mut copied, COPY_AT)
                .unwrap();
            let mut guest = vec![0u8; 4096];
            h.image.as_file().read_exact_at(&mut guest, 0).unwrap();
            if readable {
                assert_eq!(guest, [0x77; 4096], "{aio:?}");
                assert_eq!(h.byte(st), OK, "{aio:?}");
                assert_eq!(copied[..4096], [0xc3; 4096]);
                assert_eq!(copied[4096..8192], [0x5a; 4096]);
                assert_eq!(copied[8192..], [0xc3; 4096]);
                assert_eq!(*backend.commits.lock().unwrap(), [true]);
            } else {
                assert_eq!(h.byte(st), IOERR, "{aio:?}");
                assert_eq!(copied, [0x11; COPY_LEN], "a failed copy must not write");
                assert_eq!(*backend.commits.lock().unwrap(), [false]);
            }
        }
    }
}

#[test]
fn requests_in_flight_never_exceed_the_queue_size() {
    // A driver may offer the same head again before the device used it: the worker takes at
    // most a queue's worth, leaves the rest in the ring and picks it up as requests complete.
    let mut h = Harness::new(true, AioMode::Threads);
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(64 << 10);
    let st = h.status_buf();
    let head = h.add(&[Buf::R(hdr, 16), Buf::W(data, 64 << 10), Buf::W(st, 1)]);
    let offer = |h: &Harness, n: u16| {
        let m = h.mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for i in 0..n {
            let at = AVAIL + 4 + 2 * u64::from(idx.wrapping_add(i) % QSIZE);
            m.write_obj(head, GuestAddress(at)).unwrap();
        }
        m.write_obj(idx.wrapping_add(n), GuestAddress(AVAIL + 2))
            .unwrap();
    };
    offer(&h, QSIZE - 1); // one is already offered by `add`
    h.worker.process_queue(&h.vring, false);
    assert!(h.worker.in_flight() <= usize::from(QSIZE));
    offer(&h, QSIZE);
    h.worker.process_queue(&h.vring, false);
    assert!(h.worker.in_flight() <= usize::from(QSIZE));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let used_idx =
        |h: &Harness| -> u16 { h.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap() };
    while used_idx(&h) < 2 * QSIZE {
        assert!(std::time::Instant::now() < deadline, "requests left behind");
        h.worker.drain();
        h.worker.process_completions(&h.vring);
        assert!(h.worker.in_flight() <= usize::from(QSIZE));
    }
    assert_eq!(used_idx(&h), 2 * QSIZE);
    // The ring holds the last QSIZE entries.
    let ring = h.used();
    assert!(ring[..usize::from(QSIZE)]
        .iter()
        .all(|&e| e == (u32::from(head), (64 << 10) + 1)));
}

#[test]
fn a_queue_stopped_with_chains_pending_does_not_spin() {
    // Found by the vhost_user_stream fuzz target: GET_VRING_BASE marks the queue not ready while
    // a kick is being handled; with EVENT_IDX, enable_notification kept reporting the chains
    // left in the ring and the worker looped forever (and GET_VRING_BASE waited for it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut h = Harness::new(false, AioMode::IoUring);
        let hdr = h.header(VIRTIO_BLK_T_IN, 0);
        let data = h.alloc(512);
        let st = h.status_buf();
        h.add(&[Buf::R(hdr, 16), Buf::W(data, 512), Buf::W(st, 1)]);
        h.vring.set_queue_ready(false);
        h.worker.process_queue(&h.vring, true);
        let _ = tx.send(h.used().len());
    });
    let used = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_queue on a stopped queue did not return");
    assert_eq!(used, 0);
}

#[test]
fn a_large_burst_is_published_in_two_parts() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // With EVENT_IDX the worker publishes (and notifies) the first part of a burst before taking
    // the rest, so a driver waiting on its call eventfd can refill the ring meanwhile.
    let mut h = Harness::new(true, AioMode::Threads);
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: the descriptor is a fresh duplicate that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    h.vring.set_call(Some(file));
    let burst = 30u16;
    for _ in 0..burst {
        let hdr = h.header(0xff, 0); // unsupported: completes without host I/O
        let st = h.status_buf();
        h.add(&[Buf::R(hdr, 16), Buf::W(st, 1)]);
    }
    h.worker.process_queue(&h.vring, true);
    assert_eq!(h.used().len(), usize::from(burst));
    // The queue's own EVENT_IDX is off, so every publication notifies: the eventfd counts them.
    assert_eq!(call.read().unwrap(), 2);
    assert_eq!(first_part(burst), 10);
    assert_eq!(first_part(BURST_MIN), BURST_MIN);
    assert_eq!(first_part(BURST_MIN + 1), BURST_MIN);
}
