use std::sync::Arc;

use crate::block::lock::Locking;
use crate::block::{
    self, BlockBackend, CacheMode, HostOp, LazyRefcounts, OpenOptions, Target, Wake, Waker,
};
use crate::tools::{create, CreateOptions};

const CLUSTER: u64 = 64 << 10;

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

fn image(dir: &tempfile::TempDir, lazy: LazyRefcounts) -> Arc<dyn BlockBackend> {
    let path = dir.path().join("disk.qcow2");
    let o = CreateOptions {
        size: 64 << 20,
        cluster_size: CLUSTER,
        extended_l2: false,
        lazy_refcounts: true,
        backing: None,
        backing_format: None,
    };
    create(&path, &o).unwrap();
    block::open(&OpenOptions {
        path,
        format: Some(block::ImageFormat::Qcow2),
        read_only: false,
        cache: CacheMode::Writeback,
        l2_cache_size: None,
        lazy_refcounts: lazy,
        locking: Locking::Off,
    })
    .unwrap()
}

/// Plans a write; returns its host offset and ticket (the data itself does not matter here).
fn begin(b: &dyn BlockBackend, waker: &Waker, offset: u64, len: u64) -> (u64, Option<u64>) {
    let plan = b.begin_write(offset, len, waker).unwrap();
    let Target::Data { offset: host, .. } = plan.extents[0].target else {
        panic!("a write to {offset} planned {:?}", plan.extents);
    };
    (host, plan.ticket)
}

fn commit(b: &dyn BlockBackend, ticket: Option<u64>) {
    if let Some(t) = ticket {
        b.commit_write(t, true).unwrap();
    }
}

fn flush(b: &dyn BlockBackend) {
    let mut ops: Vec<HostOp> = Vec::new();
    b.flush(&mut ops).unwrap();
}

#[test]
fn a_cluster_freed_under_an_in_place_write_is_reused_only_after_it() {
    for lazy in [LazyRefcounts::On, LazyRefcounts::Off] {
        let dir = tempfile::tempdir().unwrap();
        let b = image(&dir, lazy);
        let waker: Waker = Arc::new(NoWake);
        // Guest cluster 0 gets host cluster X.
        let (x, t) = begin(&*b, &waker, 0, CLUSTER);
        commit(&*b, t);
        // An in-place write to X is in flight when the guest discards the cluster and flushes.
        let (host, in_place) = begin(&*b, &waker, 0, 4096);
        assert_eq!(host, x);
        let mut ops = Vec::new();
        b.discard(0, CLUSTER, true, &waker, &mut ops).unwrap();
        flush(&*b);
        // A new allocation must not get X while the write may still land there.
        let (y, t) = begin(&*b, &waker, 16 * CLUSTER, CLUSTER);
        commit(&*b, t);
        assert_ne!(y, x, "{lazy:?}: reused under an in-place write");
        // Once it is done, the next write-back frees X for reuse.
        commit(&*b, in_place);
        flush(&*b);
        let (z, t) = begin(&*b, &waker, 32 * CLUSTER, CLUSTER);
        commit(&*b, t);
        assert_eq!(z, x, "{lazy:?}: the freed cluster was never reused");
    }
}

#[test]
fn frees_wait_for_writes_across_generations() {
    let dir = tempfile::tempdir().unwrap();
    let b = image(&dir, LazyRefcounts::On);
    let waker: Waker = Arc::new(NoWake);
    let mut ops = Vec::new();
    let (x, t) = begin(&*b, &waker, 0, CLUSTER);
    commit(&*b, t);
    let (w, t) = begin(&*b, &waker, CLUSTER, CLUSTER);
    commit(&*b, t);
    // Write A to X in flight; X freed; a write-back ends A's generation.
    let (_, a) = begin(&*b, &waker, 0, 4096);
    b.discard(0, CLUSTER, true, &waker, &mut ops).unwrap();
    flush(&*b);
    // Write B to W, in the next generation; W freed; A is still in flight.
    let (_, bw) = begin(&*b, &waker, CLUSTER, 4096);
    b.discard(CLUSTER, CLUSTER, true, &waker, &mut ops).unwrap();
    flush(&*b);
    commit(&*b, a);
    flush(&*b);
    // X is free again; W waits for B.
    let mut got = Vec::new();
    for i in 0..2 {
        let (h, t) = begin(&*b, &waker, (16 + i) * CLUSTER, CLUSTER);
        commit(&*b, t);
        got.push(h);
    }
    assert!(got.contains(&x), "X was not released after A: {got:?}");
    assert!(!got.contains(&w), "W was reused under B: {got:?}");
    commit(&*b, bw);
    flush(&*b);
    let (h, t) = begin(&*b, &waker, 32 * CLUSTER, CLUSTER);
    commit(&*b, t);
    assert_eq!(h, w);
}

/// The image as a second, read-only opener (a restarted daemon) finds it in the file.
fn reopened(dir: &tempfile::TempDir) -> Arc<dyn BlockBackend> {
    block::open(&OpenOptions {
        path: dir.path().join("disk.qcow2"),
        format: Some(block::ImageFormat::Qcow2),
        read_only: true,
        cache: CacheMode::Writeback,
        l2_cache_size: None,
        lazy_refcounts: LazyRefcounts::Auto,
        locking: Locking::Off,
    })
    .unwrap()
}

fn mapped_to(b: &dyn BlockBackend, offset: u64) -> Target {
    let mut ext = Vec::new();
    b.map_read(offset, 4096, &mut ext).unwrap();
    ext[0].target
}

/// A committed allocation and a discard reach the file at the write-through that follows them,
/// not before and without a flush; with eager refcounts the file counts every cluster it
/// references by then (a crash leaks at most).
#[test]
fn write_through_puts_committed_metadata_in_the_file() {
    for lazy in [LazyRefcounts::On, LazyRefcounts::Off] {
        let dir = tempfile::tempdir().unwrap();
        let b = image(&dir, lazy);
        let waker: Waker = Arc::new(NoWake);
        let (x, t) = begin(&*b, &waker, 0, CLUSTER);
        commit(&*b, t);
        assert_eq!(mapped_to(&*reopened(&dir), 0), Target::Zero, "{lazy:?}");
        b.write_through().unwrap();
        let Target::Data { offset, .. } = mapped_to(&*reopened(&dir), 0) else {
            panic!("{lazy:?}: not in the file after the write-through");
        };
        assert_eq!(offset, x);
        // Nothing changed: nothing to do.
        b.write_through().unwrap();
        let (y, t) = begin(&*b, &waker, 32 << 20, 4096);
        commit(&*b, t);
        let mut ops = Vec::new();
        b.discard(0, CLUSTER, true, &waker, &mut ops).unwrap();
        b.write_through().unwrap();
        let again = reopened(&dir);
        assert_eq!(mapped_to(&*again, 0), Target::Zero, "{lazy:?}: discard");
        assert!(
            matches!(mapped_to(&*again, 32 << 20), Target::Data { offset, .. } if offset == y),
            "{lazy:?}"
        );
        if lazy == LazyRefcounts::Off {
            // What the file says is consistent as it is: no cluster referenced and uncounted.
            let file = crate::block::file::ImageFile::open(
                &dir.path().join("disk.qcow2"),
                true,
                CacheMode::Writeback,
            )
            .unwrap();
            let head = file.read_at(0, 4096).unwrap();
            let h = crate::block::qcow2::header::Header::parse(&head, file.size).unwrap();
            let res = crate::block::qcow2::check::check(
                &file,
                &h,
                crate::block::qcow2::check::Repair::None,
            );
            assert_eq!(res.corruptions, 0, "{:?}", res.messages);
        }
    }
}

/// Eager refcounts: after every write-through the file counts every cluster it references,
/// and clusters ahead of allocation (the reserve; leaks if the daemon died now); a clean close
/// leaves exact refcounts.
#[test]
fn eager_refcounts_count_a_reserve_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let b = image(&dir, LazyRefcounts::Off);
    let waker: Waker = Arc::new(NoWake);
    let path = dir.path().join("disk.qcow2");
    let check = || {
        let file = crate::block::file::ImageFile::open(&path, true, CacheMode::Writeback).unwrap();
        let head = file.read_at(0, 4096).unwrap();
        let h = crate::block::qcow2::header::Header::parse(&head, file.size).unwrap();
        crate::block::qcow2::check::check(&file, &h, crate::block::qcow2::check::Repair::None)
    };
    for i in 0..40 {
        let (_, t) = begin(&*b, &waker, i * CLUSTER, 4096);
        commit(&*b, t);
        b.write_through().unwrap();
        let res = check();
        assert_eq!(res.corruptions, 0, "write {i}: {:?}", res.messages);
        assert!(res.leaks > 0, "write {i}: no reserve counted");
    }
    b.sync().unwrap();
    let res = check();
    assert_eq!((res.corruptions, res.leaks), (0, 0), "{:?}", res.messages);
}
