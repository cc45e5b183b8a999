//! What a daemon restart relies on: chains logged when taken and around publication,
//! resubmitted chains run first, and metadata written through before publication.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::*;

/// What an in-flight log was told, in order.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Logged {
    Taken(u16),
    Publishing(u16),
    Published(u16, u16),
}

struct Recorder(Arc<std::sync::Mutex<Vec<Logged>>>);

impl InflightLog for Recorder {
    fn taken(&mut self, head: u16) {
        self.0.lock().unwrap().push(Logged::Taken(head));
    }
    fn publishing(&mut self, head: u16) {
        self.0.lock().unwrap().push(Logged::Publishing(head));
    }
    fn published(&mut self, head: u16, used_idx: u16) {
        self.0
            .lock()
            .unwrap()
            .push(Logged::Published(head, used_idx));
    }
}

#[test]
fn chains_are_logged_when_taken_and_when_published() {
    for aio in [AioMode::IoUring, AioMode::Threads] {
        let mut h = Harness::new(false, aio);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let vring = h.vring.clone();
        h.worker
            .start_ring(&vring, Some(Box::new(Recorder(log.clone()))), Vec::new());
        let heads: Vec<u16> = (0..4).map(|i| h.add_write(i * 8, 0x5a, 4096).0).collect();
        let used = h.run();
        let log = log.lock().unwrap().clone();
        // Taken in avail order, before any is published.
        let taken: Vec<Logged> = heads.iter().map(|&x| Logged::Taken(x)).collect();
        assert_eq!(log[..4], taken[..], "{aio:?}");
        // Then each used element between its two calls, the used index counting up.
        for (k, &(head, _)) in used.iter().enumerate() {
            let head = head as u16;
            assert_eq!(log[4 + 2 * k], Logged::Publishing(head));
            assert_eq!(log[5 + 2 * k], Logged::Published(head, k as u16 + 1));
        }
        assert_eq!(log.len(), 4 + 2 * heads.len());
    }
}

#[test]
fn resubmitted_chains_run_first_in_order_and_are_not_taken_again() {
    let mut h = Harness::mapped(false);
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    h.image.as_file().write_all_at(&data, 0).unwrap();
    // Two chains a previous daemon took (not in the avail ring now), one new chain.
    let (a_data, a_st, a) = h.read_bufs(1);
    let (b_data, b_st, b) = h.read_bufs(2);
    let (c_data, c_st, c) = h.read_bufs(3);
    let head_a = h.put_chain(&a);
    let head_b = h.put_chain(&b);
    let head_c = h.add(&c);
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let vring = h.vring.clone();
    h.worker.start_ring(
        &vring,
        Some(Box::new(Recorder(log.clone()))),
        vec![head_b, head_a],
    );
    // Mapped reads complete as they start: the used ring shows the order they were started in.
    let used: Vec<u32> = h.run().iter().map(|&(head, _)| head).collect();
    assert_eq!(used, [head_b, head_a, head_c].map(u32::from));
    for (d, st, sector) in [(a_data, a_st, 1), (b_data, b_st, 2), (c_data, c_st, 3)] {
        assert_eq!(h.byte(st), OK);
        let mut got = [0u8; 512];
        h.mem
            .memory()
            .read_slice(&mut got, GuestAddress(d))
            .unwrap();
        assert_eq!(got[..], data[sector * 512..][..512]);
    }
    // Only the new chain is marked; the resubmitted ones still were.
    let taken: Vec<Logged> = log
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|e| matches!(e, Logged::Taken(_)))
        .collect();
    assert_eq!(taken, [Logged::Taken(head_c)]);
}

/// Raw backend whose writes change "metadata": its write-through records how many chains were
/// published when it ran, and fails if told to.
struct ThroughBackend {
    inner: std::sync::OnceLock<Arc<dyn BlockBackend>>,
    mem: std::sync::OnceLock<GuestMemAtomic>,
    fail: bool,
    /// The heads published before each write-through.
    calls: std::sync::Mutex<Vec<Vec<u32>>>,
}

impl ThroughBackend {
    fn inner(&self) -> &dyn BlockBackend {
        &**self.inner.get().unwrap()
    }
}

impl BlockBackend for ThroughBackend {
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
        let mut plan = self.inner().begin_write(offset, len, waker)?;
        plan.metadata = true;
        Ok(plan)
    }
    fn write_through(&self) -> Result<(), BlockError> {
        let m = self.mem.get().unwrap().memory();
        let n: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        let heads = (0..u64::from(n))
            .map(|i| m.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
            .collect();
        self.calls.lock().unwrap().push(heads);
        if self.fail {
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }
    delegate_flush_discard_sync!();
}

#[test]
fn requests_that_change_metadata_are_published_after_the_write_through_or_fail_with_it() {
    for fail in [false, true] {
        let backend = Arc::new(ThroughBackend {
            inner: Default::default(),
            mem: Default::default(),
            fail,
            calls: Default::default(),
        });
        let b = backend.clone();
        let mut h = Harness::wrapping(false, AioMode::IoUring, false, move |raw| {
            b.inner.set(raw).ok();
            b
        });
        backend.mem.set(h.mem.clone()).ok();
        let (w_head, write) = h.add_write(0, 0x33, 4096);
        let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 64);
        let seg = h.segment(64, 8, 0);
        let zeroes = h.status_buf();
        let z_head = h.add(&[Buf::R(hdr, 16), Buf::R(seg, 16), Buf::W(zeroes, 1)]);
        // A read changes nothing: its status does not depend on the write-through.
        let hdr = h.header(VIRTIO_BLK_T_IN, 0);
        let data = h.alloc(512);
        let read = h.status_buf();
        h.add(&[Buf::R(hdr, 16), Buf::W(data, 512), Buf::W(read, 1)]);
        assert_eq!(h.run().len(), 3);
        // They were published after a write-through: none before the first one.
        let calls = backend.calls.lock().unwrap().clone();
        let changed = [u32::from(w_head), u32::from(z_head)];
        assert!(
            !calls.is_empty() && !calls[0].iter().any(|h| changed.contains(h)),
            "{calls:?}"
        );
        let want = if fail { IOERR } else { OK };
        assert_eq!(
            (h.byte(write), h.byte(zeroes)),
            (want, want),
            "fail: {fail}"
        );
        assert_eq!(h.byte(read), OK);
    }
}
