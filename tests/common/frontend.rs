//! A deliberately unhelpful vhost-user front-end: guest memory in memfds, split virtqueues laid
//! out by hand, and descriptors written byte by byte, so tests can send what no driver would.
//!
//! Guest physical layout (two memfd regions, adjacent in guest-physical space so a buffer may
//! span them):
//!
//! ```text
//! region 0  0x00_0000 ..0x20_0000   queue q rings at RING_BASE + q * RING_STRIDE:
//!                                   desc +0x0000, avail +0x1000, used +0x2000
//!                                   buffers from BUF (0x10_0000) on
//! region 1  0x20_0000 ..0x40_0000   more buffers
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmm_sys_util::eventfd::EventFd;

/// Size of each of the two memory regions.
pub const REGION: u64 = 2 << 20;
/// Total guest memory.
pub const MEM_END: u64 = 2 * REGION;
/// Queue size the harness configures.
pub const QSIZE: u16 = 16;
/// Where queue 0's rings start; queue q's are RING_STRIDE further.
pub const RING_BASE: u64 = 0x1_0000;
pub const RING_STRIDE: u64 = 0x1_0000;
/// Start of the area tests put buffers in.
pub const BUF: u64 = 0x10_0000;
/// A conventional place for a request header, data and status.
pub const HDR: u64 = BUF;
pub const DATA: u64 = BUF + 0x1000;
pub const STATUS: u64 = BUF + 0x800;
/// Where health checks put their buffers (away from what a test inspects).
pub const HEALTH: u64 = BUF + 0xc_0000;
/// The byte the canary check fills guest memory with.
pub const CANARY: u8 = 0xa5;

/// VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES: what a minimal driver acks.
const BASE_FEATURES: u64 = 1 << 32 | 1 << 30;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub enum Buf {
    /// Device-readable: guest address, length.
    R(u64, u32),
    /// Device-writable.
    W(u64, u32),
}

/// A raw split-ring descriptor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn of(b: Buf) -> Desc {
        match b {
            Buf::R(addr, len) => Desc {
                addr,
                len,
                ..Default::default()
            },
            Buf::W(addr, len) => Desc {
                addr,
                len,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            },
        }
    }

    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Links `bufs` into a chain stored at consecutive indexes from `first`.
pub fn linked(bufs: &[Buf], first: u16) -> Vec<Desc> {
    let n = bufs.len();
    bufs.iter()
        .enumerate()
        .map(|(i, &b)| {
            let mut d = Desc::of(b);
            if i + 1 < n {
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = first + i as u16 + 1;
            }
            d
        })
        .collect()
}

/// A virtio-blk request header.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One shared-memory region mapped in this process.
struct Region {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Region {
    fn new() -> Region {
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: we just created `fd` and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), REGION as i64) }, 0);
        // SAFETY: a fresh shared mapping of the whole memfd; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Region {
            fd,
            ptr: ptr.cast(),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), REGION as usize) };
    }
}

/// Guest memory shared with the daemon.
pub struct GuestMemory {
    regions: [Region; 2],
}

impl GuestMemory {
    pub fn new() -> GuestMemory {
        GuestMemory {
            regions: [Region::new(), Region::new()],
        }
    }

    /// Host pointer of a guest range, which must lie inside one region.
    fn host(&self, gpa: u64, len: usize) -> *mut u8 {
        let r = (gpa / REGION) as usize;
        let off = gpa % REGION;
        assert!(
            r < 2 && off + len as u64 <= REGION,
            "test bug: {gpa:#x}+{len}"
        );
        // SAFETY: `off + len` is inside the region's mapping (checked above).
        unsafe { self.regions[r].ptr.add(off as usize) }
    }

    /// The vhost-user description of the regions (`which` selects some of them).
    pub fn regions(&self, which: &[usize]) -> Vec<VhostUserMemoryRegionInfo> {
        which
            .iter()
            .map(|&i| VhostUserMemoryRegionInfo {
                guest_phys_addr: i as u64 * REGION,
                memory_size: REGION,
                userspace_addr: self.regions[i].ptr as u64,
                mmap_offset: 0,
                mmap_handle: self.regions[i].fd.as_raw_fd(),
            })
            .collect()
    }

    /// The front-end's virtual address of a guest address (for SET_VRING_ADDR).
    pub fn uva(&self, gpa: u64) -> u64 {
        self.host(gpa, 0) as u64
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let p = self.host(gpa + i as u64, 1);
            // SAFETY: `p` is inside our shared mapping; volatile because the daemon shares it.
            unsafe { p.write_volatile(b) };
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let p = self.host(gpa + i, 1);
                // SAFETY: as in `write`.
                unsafe { p.read_volatile() }
            })
            .collect()
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        let mut done = 0;
        while done < len {
            let at = gpa + done as u64;
            let n = (len - done).min((REGION - at % REGION) as usize);
            // SAFETY: `n` bytes from `at` stay inside one region.
            unsafe { std::ptr::write_bytes(self.host(at, n), byte, n) };
            done += n;
        }
    }

    pub fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// A copy of all guest memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MEM_END as usize);
        for r in &self.regions {
            // SAFETY: the whole mapping is REGION bytes long.
            v.extend_from_slice(unsafe { std::slice::from_raw_parts(r.ptr, REGION as usize) });
        }
        v
    }
}

impl Default for GuestMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// Guest-physical ring addresses of queue `q`.
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = RING_BASE + q as u64 * RING_STRIDE;
    (base, base + 0x1000, base + 0x2000)
}

/// The driver's side of one virtqueue.
pub struct Queue {
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub used_seen: u16,
    pub size: u16,
}

/// A connected hostile front-end.
pub struct HostileFrontend {
    pub fe: Frontend,
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub features: u64,
}

/// Connection options.
#[derive(Clone, Copy)]
pub struct Options {
    pub queues: usize,
    pub features: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            features: F_INDIRECT,
        }
    }
}

impl HostileFrontend {
    /// Connects, negotiates and sets up the memory table, without any queue.
    pub fn handshake(socket: &str, features: u64) -> HostileFrontend {
        Self::handshake_with(socket, features, VhostUserProtocolFeatures::empty())
    }

    /// [`Self::handshake`], also acknowledging the `protocol` features the daemon offers of
    /// these (INFLIGHT_SHMFD, BACKEND_REQ...).
    pub fn handshake_with(
        socket: &str,
        features: u64,
        protocol: VhostUserProtocolFeatures,
    ) -> HostileFrontend {
        Self::handshake_mem(socket, features, protocol, GuestMemory::new())
    }

    /// [`Self::handshake_with`] on existing guest memory (a front-end reconnecting to a
    /// restarted daemon).
    pub fn handshake_mem(
        socket: &str,
        features: u64,
        protocol: VhostUserProtocolFeatures,
        mem: GuestMemory,
    ) -> HostileFrontend {
        let mut fe = Frontend::connect(socket, 64).expect("connect");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let features = offered & (BASE_FEATURES | features);
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | protocol),
        )
        .unwrap();
        // Every message asks for an answer, so a refusal shows up as an error at once.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_mem_table(&mem.regions(&[0, 1])).unwrap();
        HostileFrontend {
            fe,
            mem,
            queues: Vec::new(),
            features,
        }
    }

    /// Connects and starts `opts.queues` queues of QSIZE entries.
    pub fn connect(socket: &str, opts: Options) -> HostileFrontend {
        let mut h = Self::handshake(socket, opts.features);
        for q in 0..opts.queues {
            h.start_queue(q, QSIZE).unwrap();
        }
        h
    }

    /// The vring configuration for queue `q` at its usual place.
    pub fn vring_config(&self, q: usize, size: u16) -> VringConfigData {
        let (desc, avail, used) = rings(q);
        VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.mem.uva(desc),
            used_ring_addr: self.mem.uva(used),
            avail_ring_addr: self.mem.uva(avail),
            log_addr: None,
        }
    }

    /// Configures, kicks off and enables queue `q` (its index in `queues` must be next).
    pub fn start_queue(&mut self, q: usize, size: u16) -> vhost::Result<()> {
        let (desc, avail, used) = rings(q);
        self.mem.fill(desc, 0x3000, 0);
        let _ = (avail, used);
        let cfg = self.vring_config(q, size);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.fe.set_vring_num(q, size)?;
        self.fe.set_vring_addr(q, &cfg)?;
        self.fe.set_vring_base(q, 0)?;
        self.fe.set_vring_call(q, &call)?;
        self.fe.set_vring_kick(q, &kick)?;
        self.fe.set_vring_enable(q, true)?;
        let queue = Queue {
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
            size,
        };
        while self.queues.len() <= q {
            // Placeholders for queues a test sets up by hand (or not at all).
            self.queues.push(Queue {
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                avail_idx: 0,
                used_seen: 0,
                size,
            });
        }
        self.queues[q] = queue;
        Ok(())
    }

    /// Writes descriptors into queue `q`'s table from index `first`.
    pub fn put_descs(&self, q: usize, first: u16, descs: &[Desc]) {
        let (table, _, _) = rings(q);
        for (i, d) in descs.iter().enumerate() {
            self.mem
                .write(table + 16 * (u64::from(first) + i as u64), &d.to_bytes());
        }
    }

    /// Offers `head` in the avail ring (without kicking).
    pub fn offer(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let qu = &mut self.queues[q];
        let slot = u64::from(qu.avail_idx % qu.size);
        self.mem.write(avail + 4 + 2 * slot, &head.to_le_bytes());
        qu.avail_idx = qu.avail_idx.wrapping_add(1);
        self.set_avail_idx(q, self.queues[q].avail_idx);
    }

    /// Stores any value in the avail ring's idx field.
    pub fn set_avail_idx(&self, q: usize, idx: u16) {
        let (_, avail, _) = rings(q);
        // Ask for a notification for every used entry (EVENT_IDX: used_event = idx we wait for).
        let qu = &self.queues[q];
        self.mem.write(
            avail + 4 + 2 * u64::from(qu.size),
            &qu.used_seen.to_le_bytes(),
        );
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write(avail + 2, &idx.to_le_bytes());
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Stores the chain `bufs` at index 0 onwards, offers it and kicks.
    pub fn submit(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        self.put_descs(q, 0, &linked(bufs, 0));
        self.offer(q, 0);
        self.kick(q);
        0
    }

    /// The used idx the daemon has published for queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.u16_at(rings(q).2 + 2)
    }

    /// Waits up to `timeout` for the next used element of queue `q`: (id, len).
    pub fn wait_used_for(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.queues[q].used_seen;
            if self.used_idx(q) != seen {
                let (_, _, used) = rings(q);
                let at = used + 4 + 8 * u64::from(seen % self.queues[q].size);
                let e = self.mem.read(at, 8);
                self.queues[q].used_seen = seen.wrapping_add(1);
                return Some((
                    u32::from_le_bytes(e[..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..].try_into().unwrap()),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let left = (deadline - now).min(Duration::from_millis(20));
            let mut pfd = libc::pollfd {
                fd: self.queues[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            let _ = self.queues[q].call.read();
        }
    }

    /// Waits (5 s at most) for the next used element; panics on a hang.
    pub fn wait_used(&mut self, q: usize) -> (u32, u32) {
        self.wait_used_for(q, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("queue {q}: no used element within 5 s (hung)"))
    }

    /// A well-formed request through the conventional places: header at HDR, status at STATUS,
    /// `data` (readable for writes, writable otherwise) at DATA. Returns (status, used len).
    pub fn request(&mut self, q: usize, kind: u32, sector: u64, data: Buf) -> (u8, u32) {
        self.request_at(q, kind, sector, data, HDR)
    }

    /// [`Self::request`] with the header at `hdr` and the status byte 0x800 after it.
    pub fn request_at(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: Buf,
        hdr: u64,
    ) -> (u8, u32) {
        let status = hdr + 0x800;
        self.mem.write(hdr, &header(kind, sector));
        self.mem.write(status, &[0xff]);
        self.submit(q, &[Buf::R(hdr, 16), data, Buf::W(status, 1)]);
        let (_, len) = self.wait_used(q);
        (self.mem.read(status, 1)[0], len)
    }

    /// Reads `len` bytes at `sector` the proper way; asserts success and returns the data.
    pub fn read_ok(&mut self, q: usize, sector: u64, len: u32) -> Vec<u8> {
        self.read_ok_at(q, sector, len, HDR)
    }

    /// [`Self::read_ok`] with its buffers from `base` on (header, status at +0x800, data at
    /// +0x1000), to leave the conventional places alone.
    pub fn read_ok_at(&mut self, q: usize, sector: u64, len: u32, base: u64) -> Vec<u8> {
        let data = base + 0x1000;
        self.mem.fill(data, len as usize, 0xee);
        let (status, used) = self.request_at(q, 0, sector, Buf::W(data, len), base);
        assert_eq!(status, 0, "a well-formed read failed");
        assert_eq!(used, len + 1);
        self.mem.read(data, len as usize)
    }
}

/// What a test lets the daemon change: (guest address, length).
pub type Allowed<'a> = &'a [(u64, u64)];

/// Asserts that guest memory differs from `before` only in `allowed` ranges and the rings of
/// the first `queues` queues (the descriptor table and avail ring, which the test writes, and
/// the used ring, which the device writes).
pub fn assert_canaries(mem: &GuestMemory, before: &[u8], allowed: Allowed, queues: usize) {
    let after = mem.snapshot();
    let mut ok: Vec<(u64, u64)> = allowed.to_vec();
    let n = u64::from(QSIZE);
    for q in 0..queues.max(1) {
        let (desc, avail, used) = rings(q);
        ok.push((desc, 16 * n));
        ok.push((avail, 6 + 2 * n));
        ok.push((used, 6 + 8 * n));
    }
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b {
            let i = i as u64;
            assert!(
                ok.iter().any(|&(s, l)| i >= s && i < s + l),
                "daemon wrote outside the chain's writable buffers at {i:#x} ({a:#x} -> {b:#x})"
            );
        }
    }
}
