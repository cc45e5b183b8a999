//! The per-queue worker: pop → parse → map → submit → complete → notify.
//!
//! One worker per virtqueue, driven by its own thread: kicks call [`QueueWorker::process_queue`],
//! the I/O engine's eventfd calls [`QueueWorker::process_completions`]. Requests stay in flight
//! (holding the guest memory they point into) until every host operation they need has
//! completed; then the status byte is written and the chain returned to the used ring.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, info};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::request::{self, ParseError, Request};
use super::status::{RequestError, STATUS_OK};
use super::DeviceSettings;
use crate::block::{BlockBackend, BlockError, Extent, HostOp, Scratch, Wake, Waker};
use crate::guest_warn;
use crate::io::mapped::MappedFiles;
use crate::io::{Completion, Engine, IoOp, OpKind};
use crate::util::aligned::AlignedBuf;
use plan::{zero_ops, Deferred, Plan};
use rings::{avail_pending, first_part, RingPlace};

/// Guest memory as vhost-user-backend maps it.
pub type GuestMem = GuestMemoryMmap<()>;
/// The swappable guest memory map shared with vhost-user-backend.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// A virtqueue as vhost-user-backend hands it to us.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// How long a queue polls its ring for more requests before going back to sleep.
const POLL: std::time::Duration = std::time::Duration::from_micros(20);
/// How long it polls while its host I/O is in flight (O_DIRECT reads take ~60 µs here).
const POLL_IO: std::time::Duration = std::time::Duration::from_micros(100);
/// While host I/O is in flight, enter the kernel every this many spins of the poll loop: its
/// completions are posted only when this thread does.
const POKE_EVERY: u32 = 64;

/// Bursts up to this many chains are processed in one batch (see [`first_part`]).
const BURST_MIN: u16 = 8;

/// Most data one read or write may carry. Planning costs memory per host extent (one per
/// cluster on a fragmented image), and descriptors may all point at the same guest buffer, so a
/// chain of 4 GiB costs the guest nothing; drivers send a few MiB (Linux: `max_sectors_kb`).
pub const MAX_REQUEST_BYTES: u64 = 256 << 20;

/// Host operations a queue keeps in flight before it stops taking new requests (each holds an
/// iovec list; a request on a fragmented image can need one per cluster).
const MAX_OPS_IN_FLIGHT: usize = 1 << 16;

/// `fallocate` modes, remembered in the op tag so a failure knows what was tried.
const ATTEMPT_PUNCH: u64 = 1;
const ATTEMPT_ZERO_RANGE: u64 = 2;
/// Not an fallocate: a read that fills a copy-on-write buffer; the host-op field of the tag
/// indexes the request's [`Deferred`] writes.
const ATTEMPT_FILL: u64 = 3;

fn tag(slot: usize, host_op: usize, attempt: u64) -> u64 {
    slot as u64 | (host_op as u64) << 32 | attempt << 56
}

fn untag(tag: u64) -> (usize, usize, u64) {
    (
        (tag & 0xffff_ffff) as usize,
        ((tag >> 32) & 0xff_ffff) as usize,
        tag >> 56,
    )
}

/// Where a queue records the chains it takes and publishes (vhost-user's in-flight region), so
/// that a restarted device can resubmit the requests it had not completed.
pub trait InflightLog: Send {
    /// `head` was taken from the avail ring; called before its request runs.
    fn taken(&mut self, head: u16);
    /// `head`'s used element is about to be written.
    fn publishing(&mut self, head: u16);
    /// `head`'s used element is written; the ring's used index is now `used_idx`.
    fn published(&mut self, head: u16, used_idx: u16);
}

/// Wakes a worker by writing its engine's eventfd.
struct EventWaker(vmm_sys_util::eventfd::EventFd);

impl Wake for EventWaker {
    fn wake(&self) {
        let _ = self.0.write(1);
    }
}

/// A request waiting for another request's allocation (the backend said busy).
struct Parked {
    head: u16,
    req: Request,
    mem: Arc<GuestMem>,
}

/// A request waiting for host operations.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Used length reported on success.
    used_len: u32,
    /// Host operations not yet completed.
    pending: usize,
    error: Option<RequestError>,
    /// The backend's non-data operations, indexed by `tag`'s host-op field minus one.
    host_ops: Vec<HostOp>,
    /// Keeps the guest memory the operations point into mapped.
    mem: Arc<GuestMem>,
    /// Metadata to commit once the writes are done.
    ticket: Option<u64>,
    /// The request changes metadata: published only after a write-through.
    metadata: bool,
    /// Copy-on-write data the operations write from.
    _buffers: Vec<AlignedBuf>,
    /// Copy-on-write writes submitted once their buffers are filled.
    deferred: Vec<Deferred>,
}

/// The state of one virtqueue.
pub struct QueueWorker {
    index: u16,
    settings: Arc<DeviceSettings>,
    backend: Arc<dyn BlockBackend>,
    mem: GuestMemAtomic,
    engine: Engine,
    /// The vring, remembered at its first event so that a drain can complete requests.
    vring: Option<Vring>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Completed chains not yet published: (head, used length).
    used: Vec<(u16, u32)>,
    /// Status bytes of completed requests that changed metadata, turned into errors if the
    /// write-through before publishing fails.
    through: Vec<(Arc<GuestMem>, GuestAddress)>,
    completions: Vec<Completion>,
    extents: Vec<Extent>,
    iov: Vec<libc::iovec>,
    no_punch_hole: bool,
    no_zero_range: bool,
    bounce: Option<AlignedBuf>,
    scratch: Scratch,
    waker: Waker,
    parked: Vec<Parked>,
    /// Size of the queue as last seen: the bound on requests in flight.
    queue_size: u16,
    /// Whether the last kick's EVENT_IDX setting was on (for resuming after throttling).
    event_idx: bool,
    /// Chains were left in the avail ring because `queue_size` requests were in flight.
    throttled: bool,
    /// The avail ring was unusable at the last look (reported once until it recovers).
    broken: bool,
    /// Where the rings were found at the last look.
    rings: Option<RingPlace>,
    /// Page-cache reads by memory copy (`--mapped-reads`, only with the page cache).
    mapped: Option<MappedFiles>,
    /// The in-flight log of the running ring, if the front-end keeps one.
    inflight: Option<Box<dyn InflightLog>>,
    /// Heads taken before a restart, to run again before any new chain, in order.
    resubmit: std::collections::VecDeque<u16>,
}

impl QueueWorker {
    /// A worker for queue `index`.
    pub fn new(
        index: u16,
        settings: Arc<DeviceSettings>,
        backend: Arc<dyn BlockBackend>,
        mem: GuestMemAtomic,
        engine: Engine,
    ) -> Self {
        let waker: Waker = Arc::new(EventWaker(
            engine.notifier().expect("duplicating the engine's eventfd"),
        ));
        let mapped = if settings.mapped_reads && backend.info().mem_align <= 1 {
            MappedFiles::new()
        } else {
            None
        };
        QueueWorker {
            index,
            settings,
            backend,
            mem,
            engine,
            vring: None,
            slots: Vec::new(),
            free: Vec::new(),
            used: Vec::new(),
            through: Vec::new(),
            completions: Vec::new(),
            extents: Vec::new(),
            iov: Vec::new(),
            no_punch_hole: false,
            no_zero_range: false,
            bounce: None,
            scratch: Scratch::default(),
            waker,
            parked: Vec::new(),
            queue_size: 0,
            event_idx: false,
            throttled: false,
            broken: false,
            rings: None,
            mapped,
            inflight: None,
            resubmit: Default::default(),
        }
    }

    /// The ring starts (or restarts): `log` records what it takes, and `resubmit` are the heads
    /// a previous incarnation took and did not complete, in the order it took them.
    pub fn start_ring(
        &mut self,
        vring: &Vring,
        log: Option<Box<dyn InflightLog>>,
        resubmit: Vec<u16>,
    ) {
        self.vring = Some(vring.clone());
        self.rings = None;
        self.broken = false;
        self.inflight = log;
        self.resubmit = resubmit.into();
    }

    /// The ring stops (GET_VRING_BASE): everything taken is completed and published first.
    pub fn stop_ring(&mut self) {
        self.drain();
        self.resubmit.clear();
        self.inflight = None;
    }

    /// The engine's completion eventfd, to register in the queue thread's epoll.
    pub fn notify_fd(&self) -> std::os::unix::io::RawFd {
        self.engine.notify_fd()
    }

    /// Whether to leave further chains in the ring for now: as many requests in flight as the
    /// queue has entries, or [`MAX_OPS_IN_FLIGHT`] host operations.
    fn at_capacity(&self) -> bool {
        self.in_flight() >= usize::from(self.queue_size)
            || self.engine.in_flight() >= MAX_OPS_IN_FLIGHT
    }

    /// Requests in flight (parked ones included).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.parked.len()
    }

    /// Handles a kick: takes every available chain, submits their I/O, publishes what finished.
    pub fn process_queue(&mut self, vring: &Vring, event_idx: bool) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.event_idx = event_idx;
        self.throttled = false;
        self.queue_size = vring.get_ref().get_queue().size();
        if !vring.get_ref().is_enabled() {
            return;
        }
        self.resubmit_taken(vring);
        let mut deadline = None;
        // Whether the last batch was the first part of a burst (see `first_part`).
        let mut cut = false;
        loop {
            // A fresh look at the memory map for every batch: the front-end may have added a
            // region (ADD_MEM_REG) while we polled.
            let mem = self.mem.memory().into_inner();
            loop {
                if event_idx {
                    let _ = vring.disable_notification();
                }
                // Stopped (GET_VRING_BASE) while we were at it: the chains stay in the ring.
                let ready = vring.get_ref().get_queue().ready();
                let (pending, mut problem) = match avail_pending(&mut self.rings, vring, &mem) {
                    Ok(n) => (n, None),
                    Err(reason) => (0, Some(reason)),
                };
                // Without EVENT_IDX there is no polling to come back for the rest.
                let take = if cut || !event_idx {
                    pending
                } else {
                    first_part(pending)
                };
                cut = take < pending;
                for _ in 0..take {
                    // At most one request per queue entry in flight: a driver that offers the
                    // same head again before it was used cannot make us hold more.
                    if self.at_capacity() {
                        self.throttled = true;
                        break;
                    }
                    let chain = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = chain else {
                        // virtio-queue refuses a ring our checks accept (an avail ring at guest
                        // address 0 counts as not ready): the chains stay, so must we.
                        problem = Some("avail ring unusable");
                        break;
                    };
                    if let Some(log) = self.inflight.as_mut() {
                        log.taken(chain.head_index());
                    }
                    self.start(chain, &mem);
                }
                match problem {
                    // Reported once until the ring recovers.
                    Some(reason) if !std::mem::replace(&mut self.broken, true) => {
                        guest_warn!("queue {}: {reason}; queue stopped", self.index)
                    }
                    Some(_) => {}
                    None => self.broken = false,
                }
                if cut
                    || !ready
                    || self.throttled
                    || self.broken
                    || !event_idx
                    || !matches!(vring.enable_notification(), Ok(true))
                {
                    break;
                }
            }
            self.engine.submit();
            // Page-cache hits often complete during the submit itself: finish them now rather
            // than after another trip through epoll. Reaping consumes the eventfd, which also
            // carries wake-ups for parked requests: retry those too.
            self.engine.reap(&mut self.completions);
            self.handle_completions();
            self.retry_parked();
            self.engine.submit();
            self.publish(vring);
            // Poll the ring briefly before sleeping: a driver that keeps the queue busy then
            // needs no kick and we no wake-up (notifications stay enabled meanwhile).
            // Longer while host I/O is in flight: its completion would otherwise cost a sleep
            // and a wake-up.
            let window = if self.engine.in_flight() > 0 {
                POLL_IO
            } else {
                POLL
            };
            let until = *deadline.get_or_insert_with(|| Instant::now() + window);
            if !event_idx
                || self.throttled
                || self.broken
                || !self.wait_for_avail(vring, &mem, until)
            {
                break;
            }
            deadline = None;
        }
    }

    /// Spins until the driver makes a chain available, host I/O completes or `until` passes.
    fn wait_for_avail(&mut self, vring: &Vring, mem: &Arc<GuestMem>, until: Instant) -> bool {
        let mut spins = 0u32;
        loop {
            spins = spins.wrapping_add(1);
            if spins % POKE_EVERY == 0 && self.engine.in_flight() > 0 {
                self.engine.poke(&mut self.completions);
                if !self.completions.is_empty() {
                    return true;
                }
            }
            // A broken ring is not work: it would make us spin on it.
            if matches!(avail_pending(&mut self.rings, vring, mem), Ok(n) if n > 0) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Handles the engine's eventfd: completes requests whose operations are all done, and
    /// retries requests that waited for another one's allocation.
    pub fn process_completions(&mut self, vring: &Vring) {
        self.engine.reap(&mut self.completions);
        self.handle_completions();
        self.retry_parked();
        self.engine.submit();
        self.publish(vring);
        if self.throttled && !self.at_capacity() {
            // Chains left in the ring at the in-flight bound: their kick is already consumed.
            self.process_queue(vring, self.event_idx);
        }
    }

    /// Waits for every in-flight request and completes it (GET_VRING_BASE, disconnect, exit).
    pub fn drain(&mut self) {
        while self.engine.in_flight() > 0 || !self.parked.is_empty() {
            if self.engine.in_flight() > 0 {
                self.engine.wait(&mut self.completions);
                self.handle_completions();
            } else {
                // Parked requests wait for another queue's allocation to commit.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.retry_parked();
            self.engine.submit();
        }
        if let Some(vring) = self.vring.clone() {
            self.publish(&vring);
        }
    }

    /// Runs the requests a previous incarnation took and did not complete, oldest first, before
    /// anything new is taken (bounded by the queue size like any request).
    fn resubmit_taken(&mut self, vring: &Vring) {
        if self.resubmit.is_empty() {
            return;
        }
        let mem = self.mem.memory().into_inner();
        let (table, size) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (GuestAddress(q.desc_table()), q.size())
        };
        while let Some(&head) = self.resubmit.front() {
            if self.at_capacity() {
                // Completions bring us back (see `process_completions`).
                self.throttled = true;
                break;
            }
            self.resubmit.pop_front();
            let max = self.settings.max_descriptors();
            let descs = super::chain::read_chain(&*mem, table, size, head, max);
            self.start_parsed(head, descs, &mem);
        }
        self.engine.submit();
        self.publish(vring);
    }

    fn retry_parked(&mut self) {
        for p in std::mem::take(&mut self.parked) {
            self.execute(p.head, p.req, &p.mem);
        }
    }

    fn start(&mut self, chain: DescriptorChain<Arc<GuestMem>>, popped_with: &Arc<GuestMem>) {
        let head = chain.head_index();
        self.start_parsed(head, chain, popped_with);
    }

    fn start_parsed<I>(&mut self, head: u16, chain: I, popped_with: &Arc<GuestMem>)
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        if head >= self.queue_size {
            // Not a descriptor at all: nothing to parse and nothing the used ring can name.
            guest_warn!(
                "queue {}: avail ring names descriptor {head} of {}; ignored",
                self.index,
                self.queue_size
            );
            return;
        }
        // The map current now: a region the driver added just before making this chain available
        // may be missing from the one the chain was popped with.
        let latest = self.mem.memory().into_inner();
        let mem = if Arc::ptr_eq(&latest, popped_with) {
            popped_with
        } else {
            &latest
        };
        let req = match request::parse(chain, &**mem, self.settings.max_descriptors()) {
            Ok(r) => r,
            Err(ParseError::NoStatus) => {
                guest_warn!(
                    "queue {}: chain {head} has no status byte; dropped",
                    self.index
                );
                self.used.push((head, 0));
                return;
            }
            Err(ParseError::Malformed { status, reason }) => {
                self.finish(mem, head, status, Err(RequestError::Malformed(reason)));
                return;
            }
        };
        self.execute(head, req, mem);
    }

    fn execute(&mut self, head: u16, req: Request, mem: &Arc<GuestMem>) {
        let status = req.status;
        match self.plan(&req, mem) {
            Ok(plan)
                if plan.ops.is_empty()
                    && plan.offloaded.is_empty()
                    && plan.host_ops.is_empty()
                    && plan.ticket.is_none()
                    && !plan.metadata =>
            {
                self.finish(mem, head, status, Ok(plan.used_len));
            }
            Ok(plan) => self.submit(head, status, plan, mem.clone()),
            Err(RequestError::Block(BlockError::Busy)) => self.parked.push(Parked {
                head,
                req,
                mem: mem.clone(),
            }),
            Err(e) => self.finish(mem, head, status, Err(e)),
        }
    }

    fn submit(&mut self, head: u16, status: GuestAddress, plan: Plan, mem: Arc<GuestMem>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut req = InFlight {
            head,
            status,
            used_len: plan.used_len,
            pending: 0,
            error: None,
            host_ops: plan.host_ops,
            mem,
            ticket: plan.ticket,
            metadata: plan.metadata,
            _buffers: plan.buffers,
            deferred: plan.deferred,
        };
        // Offloaded reads first: the kernel's worker starts while this thread copies its part.
        for mut op in plan.offloaded {
            op.tag = tag(slot, 0, 0);
            req.pending += 1;
            self.engine.push_offloaded(op);
        }
        for mut op in plan.ops {
            op.tag = tag(slot, 0, 0);
            req.pending += 1;
            self.engine.push(op);
        }
        for (k, mut op) in plan.fill_reads {
            op.tag = tag(slot, k, ATTEMPT_FILL);
            req.pending += 1;
            self.engine.push(op);
        }
        for i in 0..req.host_ops.len() {
            req.pending += self.push_host_op(slot, i, req.host_ops[i]);
        }
        let done = req.pending == 0;
        self.slots[slot] = Some(req);
        if done {
            self.retire(slot);
        }
    }

    /// Turns a backend operation into engine operations, honouring what this file system has
    /// been seen not to support. Returns how many were pushed.
    fn push_host_op(&mut self, slot: usize, index: usize, op: HostOp) -> usize {
        let fallocate = |fd, offset, len, mode, attempt| IoOp {
            fd,
            offset,
            kind: OpKind::Fallocate { mode, len },
            iov: Vec::new(),
            tag: tag(slot, index + 1, attempt),
        };
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let op = match op {
            HostOp::Sync { fd } => IoOp {
                fd,
                offset: 0,
                kind: OpKind::Fdatasync,
                iov: Vec::new(),
                tag: tag(slot, index + 1, 0),
            },
            HostOp::Discard { .. } if self.no_punch_hole => return 0,
            HostOp::Discard { fd, offset, len } => fallocate(
                fd,
                offset,
                len,
                libc::FALLOC_FL_PUNCH_HOLE | keep,
                ATTEMPT_PUNCH,
            ),
            HostOp::Zero {
                fd,
                offset,
                len,
                unmap,
            } => {
                if unmap && !self.no_punch_hole {
                    fallocate(
                        fd,
                        offset,
                        len,
                        libc::FALLOC_FL_PUNCH_HOLE | keep,
                        ATTEMPT_PUNCH,
                    )
                } else if !self.no_zero_range {
                    fallocate(
                        fd,
                        offset,
                        len,
                        libc::FALLOC_FL_ZERO_RANGE | keep,
                        ATTEMPT_ZERO_RANGE,
                    )
                } else {
                    return self.push_zero_writes(slot, index, fd, offset, len);
                }
            }
        };
        self.engine.push(op);
        1
    }

    /// Writes zeroes from the shared zero block (file systems without ZERO_RANGE).
    fn push_zero_writes(
        &mut self,
        slot: usize,
        index: usize,
        fd: i32,
        offset: u64,
        len: u64,
    ) -> usize {
        let ops = zero_ops(fd, offset, len);
        let n = ops.len();
        for mut op in ops {
            op.tag = tag(slot, index + 1, 0);
            self.engine.push(op);
        }
        n
    }

    fn handle_completions(&mut self) {
        let completions = std::mem::take(&mut self.completions);
        for c in &completions {
            let (slot, host_op, attempt) = untag(c.tag);
            let Some(req) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            req.pending -= 1;
            let mut resubmit = None;
            if attempt == ATTEMPT_FILL {
                if c.result < 0 && req.error.is_none() {
                    req.error = Some(RequestError::Host(io::Error::from_raw_os_error(-c.result)));
                }
                let d = &mut req.deferred[host_op];
                d.reads_left -= 1;
                if d.reads_left == 0 && req.error.is_none() {
                    if let Some(mut op) = d.write.take() {
                        op.tag = tag(slot, 0, 0);
                        req.pending += 1;
                        self.engine.push(op);
                    }
                }
            } else if c.result == -libc::EOPNOTSUPP && host_op > 0 && attempt != 0 {
                // The file system lacks this fallocate mode: remember, and fall back.
                let op = req.host_ops[host_op - 1];
                if attempt == ATTEMPT_PUNCH {
                    self.no_punch_hole = true;
                } else {
                    self.no_zero_range = true;
                }
                info!(
                    "queue {}: the file system does not support {}; falling back",
                    self.index,
                    if attempt == ATTEMPT_PUNCH {
                        "punching holes"
                    } else {
                        "FALLOC_FL_ZERO_RANGE"
                    }
                );
                if let HostOp::Zero { .. } = op {
                    resubmit = Some(op);
                }
            } else if c.result < 0 && req.error.is_none() {
                req.error = Some(RequestError::Host(io::Error::from_raw_os_error(-c.result)));
            }
            if let Some(op) = resubmit {
                let n = self.push_host_op(slot, host_op - 1, op);
                if let Some(req) = self.slots[slot].as_mut() {
                    req.pending += n;
                }
            }
            if self.slots[slot].as_ref().is_some_and(|r| r.pending == 0) {
                self.retire(slot);
            }
        }
        self.completions = completions;
        self.completions.clear();
    }

    fn retire(&mut self, slot: usize) {
        let Some(req) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        let mut error = req.error;
        if let Some(ticket) = req.ticket {
            if let Err(e) = self.backend.commit_write(ticket, error.is_none()) {
                error.get_or_insert(e.into());
            }
        }
        let result = match error {
            None => Ok(req.used_len),
            Some(e) => Err(e),
        };
        if req.metadata && result.is_ok() {
            self.through.push((req.mem.clone(), req.status));
        }
        self.finish(&req.mem, req.head, req.status, result);
    }

    /// Writes the status byte and queues the chain for the used ring.
    fn finish(
        &mut self,
        mem: &GuestMem,
        head: u16,
        status: GuestAddress,
        result: Result<u32, RequestError>,
    ) {
        let (byte, len) = match result {
            Ok(len) => (STATUS_OK, len),
            Err(e) => {
                match &e {
                    RequestError::Host(_) | RequestError::Block(BlockError::Io(_)) => {
                        guest_warn!("queue {}: request {head} failed: {e}", self.index)
                    }
                    _ => guest_warn!("queue {}: request {head} refused: {e}", self.index),
                }
                (e.status(), 1)
            }
        };
        if mem.write_obj(byte, status).is_err() {
            // Checked at parse time; memory cannot have shrunk under our guard.
            debug!("queue {}: status byte of {head} not writable", self.index);
        }
        self.used.push((head, len));
    }

    /// Returns finished chains to the guest and notifies it if it wants to be.
    fn publish(&mut self, vring: &Vring) {
        self.write_through();
        if self.used.is_empty() {
            return;
        }
        {
            let mut state = vring.get_mut();
            for (head, len) in self.used.drain(..) {
                if let Some(log) = self.inflight.as_mut() {
                    log.publishing(head);
                }
                match state.add_used(head, len) {
                    Ok(()) => {
                        if let Some(log) = self.inflight.as_mut() {
                            log.published(head, state.get_queue().next_used());
                        }
                    }
                    Err(e) => guest_warn!("queue {}: cannot return chain {head}: {e}", self.index),
                }
            }
        }
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                debug!("queue {}: cannot notify the guest: {e}", self.index);
            }
        }
    }

    /// Puts the metadata that finished requests changed into the image file before they are
    /// published (once per pass); if that fails, they fail.
    fn write_through(&mut self) {
        if self.through.is_empty() {
            return;
        }
        if let Err(e) = self.backend.write_through() {
            let e = RequestError::from(e);
            guest_warn!(
                "queue {}: {} requests failed: {e}",
                self.index,
                self.through.len()
            );
            for (mem, status) in &self.through {
                let _ = mem.write_obj(e.status(), *status);
            }
        }
        self.through.clear();
    }
}

// SAFETY: the only non-Send fields are raw pointers into guest memory (scratch `iov`, ops inside
// the engine, the avail index in `rings`); they are used by whichever single thread holds the
// worker's mutex, and the memory they point to is kept alive by `Arc<GuestMem>` guards that are
// themselves Send (`rings` is only dereferenced under the guard it was checked against).
unsafe impl Send for QueueWorker {}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // The kernel may still be transferring into guest memory that in-flight requests keep
        // mapped: wait for it before the requests (and their memory guards) go away.
        self.drain();
        if let Some(m) = &self.mapped {
            debug!(
                "queue {}: {} reads copied from the page cache",
                self.index,
                m.copies()
            );
        }
    }
}

mod plan;
mod rings;
#[cfg(test)]
mod tests;
