//! The in-flight region as a restarted daemon finds it: arbitrary bytes from the front-end.
//!
//! Input: `[ring size exponent: u8][ring used index: u16 LE][region bytes...]`, the region being
//! laid out for queues of 32. Checks: recovery resubmits only heads of the ring, each once; then
//! a new incarnation that takes three more chains and publishes one is recovered as exactly the
//! old resubmissions followed by the two unpublished chains, in order.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::le16;
use crate::vhost_user::inflight::{queue_stride, Region};

const LAYOUT: u16 = 32;

/// Runs one input; returns how many heads the first recovery resubmitted.
pub fn inflight_region(data: &[u8]) -> usize {
    let size = 1u16 << (data.first().copied().unwrap_or(0) % 6);
    let ring_used = le16(data, 1);
    let (file, region) = Region::create(1, LAYOUT).expect("a region");
    let bytes = data.get(3..).unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(queue_stride(LAYOUT))];
    file.write_all_at(bytes, 0).expect("writing the region");
    let region = Arc::new(region);
    let mut log = region.queue(0, size).expect("a queue");
    let first = log.recover(ring_used);
    let mut seen = vec![false; usize::from(size)];
    for &h in &first.resubmit {
        assert!(h < size, "head {h} outside a ring of {size}");
        assert!(
            !std::mem::replace(&mut seen[usize::from(h)], true),
            "head {h} twice"
        );
    }
    // Three chains the ring has free, taken in this order; the second is completed.
    let free: Vec<u16> = (0..size)
        .filter(|&h| !seen[usize::from(h)])
        .take(3)
        .collect();
    for &h in &free {
        log.mark(h);
    }
    let mut used = ring_used;
    if let Some(&h) = free.get(1) {
        log.publishing(h);
        used = used.wrapping_add(1);
        log.published(h, used);
    }
    let mut again = region.queue(0, size).expect("a queue");
    let second = again.recover(used);
    let mut expect = first.resubmit.clone();
    expect.extend(
        free.iter()
            .enumerate()
            .filter(|&(i, _)| i != 1)
            .map(|(_, &h)| h),
    );
    assert_eq!(second.resubmit, expect);
    first.resubmit.len()
}
