//! Where a queue's rings are, looked up once per placement and memory map, so that the polling
//! loop reads the avail index through a pointer; and how much of a burst to take at once.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Weak};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{GuestMem, Vring, BURST_MIN};

/// How many chains of a burst of `pending` to complete and publish before taking the rest.
///
/// A driver that waits for its completions (sleeping on the call eventfd) refills the ring only
/// after it is woken, which takes longer than a request: publishing the first part of a large
/// burst early lets it refill while the queue works through the rest, instead of both sides
/// taking turns. Small bursts are taken whole, and so is the rest of a cut burst: every
/// notification costs a wake-up.
pub(super) fn first_part(pending: u16) -> u16 {
    if pending > BURST_MIN {
        (pending / 3).max(BURST_MIN)
    } else {
        pending
    }
}

/// Where a queue's rings were last found to lie inside guest memory, so that polling the avail
/// index does not redo the range checks and vm-memory's region lookup at every look.
pub(super) struct RingPlace {
    /// The memory map the check was made against (compared by address; the weak reference keeps
    /// the address from being reused by a later map).
    mem: Weak<GuestMem>,
    /// Descriptor table, avail ring and used ring addresses, and the queue size.
    rings: (u64, u64, u64, u16),
    /// The avail ring's `idx` field in host memory, mapped while `mem` is.
    avail_idx: *const AtomicU16,
}

/// Chains the driver has made available on a queue, or why its avail ring cannot be used.
///
/// virtio-queue would log an error for a bad ring at every pop (and a spinning poller would call
/// it in a loop); checking first keeps a broken ring a quiet, stopped queue.
pub(super) fn avail_pending(
    place: &mut Option<RingPlace>,
    vring: &Vring,
    mem: &Arc<GuestMem>,
) -> Result<u16, &'static str> {
    let state = vring.get_ref();
    let q = state.get_queue();
    if !q.ready() {
        return Ok(0);
    }
    let rings = (q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
    let known = place
        .as_ref()
        .filter(|p| p.rings == rings && std::ptr::eq(p.mem.as_ptr(), Arc::as_ptr(mem)));
    let avail_idx = match known {
        Some(p) => p.avail_idx,
        None => {
            *place = None;
            let p = locate_rings(mem, rings)?;
            let at = p.avail_idx;
            *place = Some(p);
            at
        }
    };
    // SAFETY: `locate_rings` found these two aligned bytes inside one region of `mem`, which the
    // caller's `Arc` keeps mapped; the driver writes them concurrently, hence the atomic load.
    let avail = u16::from_le(unsafe { (*avail_idx).load(Ordering::Acquire) });
    let pending = avail.wrapping_sub(q.next_avail());
    if pending > q.size() {
        return Err("avail index more than a queue size ahead of the device");
    }
    Ok(pending)
}

/// Checks that a queue's rings lie inside guest memory and finds its avail index.
fn locate_rings(
    mem: &Arc<GuestMem>,
    (desc, avail, used, size): (u64, u64, u64, u16),
) -> Result<RingPlace, &'static str> {
    let n = u64::from(size);
    let fits = |addr: u64, len: u64| {
        GuestMemoryBackend::check_range(&**mem, GuestAddress(addr), len as usize)
    };
    if !fits(desc, 16 * n) || !fits(avail, 6 + 2 * n) {
        return Err("descriptor table or avail ring outside guest memory");
    }
    if !fits(used, 6 + 8 * n) {
        return Err("used ring outside guest memory");
    }
    let idx = avail
        .checked_add(2)
        .and_then(|a| GuestMemoryBackend::get_slice(&**mem, GuestAddress(a), 2).ok())
        .ok_or("avail ring outside guest memory")?;
    let ptr = idx.ptr_guard().as_ptr();
    if ptr as usize % std::mem::align_of::<AtomicU16>() != 0 {
        return Err("avail ring misaligned");
    }
    Ok(RingPlace {
        mem: Arc::downgrade(mem),
        rings: (desc, avail, used, size),
        avail_idx: ptr.cast(),
    })
}
