//! The restart algorithm on a mock ring: requests are taken, completed in every order, and the
//! process "dies" between any two steps of publishing; the next incarnation must resubmit
//! exactly the requests whose used element was not written, in the order they were taken.

use std::sync::Arc;

use super::*;

/// A ring of 8 entries as the device sees it: the region plus the used index in guest memory.
struct Sim {
    region: Arc<Region>,
    log: QueueLog,
    used: u16,
}

impl Sim {
    fn new(ring_used: u16) -> Sim {
        let (_file, region) = Region::create(2, 8).unwrap();
        let region = Arc::new(region);
        let mut log = region.queue(1, 8).unwrap();
        assert!(log.recover(ring_used).fresh);
        Sim {
            region,
            log,
            used: ring_used,
        }
    }

    /// A new daemon incarnation on the same region.
    fn restart(&mut self) -> Recovery {
        self.log = self.region.queue(1, 8).unwrap();
        self.log.recover(self.used)
    }

    /// Runs the first `steps` of the three steps of publishing `head`.
    fn complete(&mut self, head: u16, steps: usize) {
        if steps > 0 {
            self.log.publishing(head);
        }
        if steps > 1 {
            self.used = self.used.wrapping_add(1);
        }
        if steps > 2 {
            self.log.published(head, self.used);
        }
    }
}

fn permutations(items: &[u16]) -> Vec<Vec<u16>> {
    if items.is_empty() {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let x = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, x);
            out.push(p);
        }
    }
    out
}

#[test]
fn every_completion_order_and_crash_point_resubmits_exactly_the_unpublished() {
    let taken = [5u16, 0, 7, 2];
    let mut cases = 0;
    // The used index wraps during the run for the second start value.
    for start in [0u16, u16::MAX - 1] {
        for order in permutations(&taken) {
            // Crash after `k` fully published completions and `s` steps of the next one.
            for k in 0..=order.len() {
                for s in 0..3 {
                    if k == order.len() && s > 0 {
                        continue;
                    }
                    let mut sim = Sim::new(start);
                    for &h in &taken {
                        sim.log.mark(h);
                    }
                    for &h in &order[..k] {
                        sim.complete(h, 3);
                    }
                    if k < order.len() {
                        sim.complete(order[k], s);
                    }
                    let written: Vec<u16> = order[..k + usize::from(s >= 2)].to_vec();
                    let expect: Vec<u16> = taken
                        .iter()
                        .copied()
                        .filter(|h| !written.contains(h))
                        .collect();
                    let r = sim.restart();
                    assert!(!r.fresh);
                    assert_eq!(r.resubmit, expect, "order {order:?} k {k} s {s}");
                    // The second incarnation dies at once too: same answer.
                    assert_eq!(sim.restart().resubmit, expect);
                    // It completes the rest; a third one finds nothing.
                    for &h in &expect {
                        sim.complete(h, 3);
                    }
                    assert_eq!(sim.restart().resubmit, Vec::<u16>::new());
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 2 * 24 * 13);
}

#[test]
fn resubmitted_chains_keep_their_order_across_restarts_and_new_chains_follow() {
    let mut sim = Sim::new(0);
    for h in [3, 1, 6] {
        sim.log.mark(h);
    }
    sim.complete(1, 3);
    assert_eq!(sim.restart().resubmit, vec![3, 6]);
    // The new incarnation takes a new chain after the resubmitted ones, then dies again.
    sim.log.mark(0);
    sim.complete(6, 3);
    assert_eq!(sim.restart().resubmit, vec![3, 0]);
}

#[test]
fn a_fresh_region_takes_the_ring_used_index() {
    // spdk#3766: a region never written while the ring's used index is not 0 (after a
    // migration); a crash before the first completion must not clear the first chain.
    let mut sim = Sim::new(1234);
    sim.log.mark(0);
    assert_eq!(sim.restart().resubmit, vec![0]);
}

#[test]
fn a_region_laid_out_for_another_ring_size_is_reset() {
    let mut sim = Sim::new(0);
    sim.log.mark(2);
    let mut smaller = sim.region.queue(1, 4).unwrap();
    let r = smaller.recover(0);
    assert!(r.fresh);
    assert!(r.resubmit.is_empty());
    // Queue 0's region is separate from queue 1's.
    let mut q0 = sim.region.queue(0, 8).unwrap();
    assert!(q0.recover(0).fresh);
}

#[test]
fn garbage_regions_are_bounded() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let (_file, region) = Region::create(1, 16).unwrap();
        // SAFETY: the test owns the mapping, which is `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.ptr, region.len) };
        for b in bytes.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        // A valid header over garbage entries, most rounds.
        if round % 4 != 0 {
            bytes[8..10].copy_from_slice(&VERSION.to_le_bytes());
            bytes[10..12].copy_from_slice(&16u16.to_le_bytes());
        }
        let region = Arc::new(region);
        let mut log = region.queue(0, 16).unwrap();
        let r = log.recover(rng as u16);
        assert!(r.resubmit.len() <= 16);
        assert!(r.resubmit.iter().all(|&h| h < 16));
        let mut seen = r.resubmit.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), r.resubmit.len(), "a head resubmitted twice");
        // Marking and publishing out-of-range heads touches nothing.
        log.mark(16);
        log.mark(u16::MAX);
        log.publishing(u16::MAX);
        log.published(u16::MAX, 0);
    }
}

#[test]
fn regions_that_do_not_fit_are_refused() {
    let (file, _) = Region::create(1, 8).unwrap();
    let need = queue_stride(8) as u64;
    assert!(Region::open(&file, need, 0, 1, 8).is_ok());
    assert!(Region::open(&file, need - 1, 0, 1, 8).is_err(), "too small");
    assert!(
        Region::open(&file, need, 0, 2, 8).is_err(),
        "too small for two"
    );
    assert!(
        Region::open(&file, need, 4096, 1, 8).is_err(),
        "past the file"
    );
    assert!(Region::open(&file, need, 100, 1, 8).is_err(), "unaligned");
    assert!(Region::open(&file, u64::MAX, u64::MAX - 4095, 1, 8).is_err());
    assert!(
        Region::open(&file, need, 0, 1, 12).is_err(),
        "not a power of two"
    );
    assert!(Region::open(&file, need, 0, 0, 8).is_err(), "no queue");
    assert!(Region::create(1, 0).is_err());
    // A larger ring than the region was laid out for is not tracked.
    let region = Arc::new(Region::open(&file, need, 0, 1, 8).unwrap());
    assert!(region.queue(0, 16).is_none());
    assert!(region.queue(1, 8).is_none());
    assert!(region.queue(0, 4).is_some());
}

#[test]
fn stride_matches_libvhost_user() {
    assert_eq!(queue_stride(128), 2112);
    assert_eq!(queue_stride(256), 4160);
    for size in [1u16, 2, 4, 8, 1024, 32768] {
        assert!(queue_stride(size) >= HEADER + DESC * usize::from(size));
    }
}
