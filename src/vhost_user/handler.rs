//! Our vhost-user request handler: the front-end's messages, validated, applied to the
//! [`Device`]. vhost's dispatcher (`BackendReqHandler`) reads and decodes the messages and
//! answers them; everything they mean is decided here.
//!
//! Any message we refuse ends the connection after its NACK (REPLY_ACK) is sent, as
//! libvhost-user does: a front-end that did not ask for acknowledgements would otherwise go on
//! with a ring we never set up the way it thinks.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::channel::BackendChannel;
use super::device::Device;
use super::inflight::Region;
use crate::virtio::worker::{GuestMem, InflightLog};

/// Memory slots a front-end may use (CONFIGURE_MEM_SLOTS), as vhost-user-backend and QEMU's
/// vhost limit.
const MAX_MEM_SLOTS: usize = 509;

/// Where a front-end's memory region lives in its own address space.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The state of one connection.
pub struct Handler {
    device: Arc<Device>,
    channel: BackendChannel,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    mappings: Vec<Mapping>,
    inflight: Option<Arc<Region>>,
    /// The connection is being closed: rings are stopped and stay so.
    closing: bool,
}

fn refused(what: String) -> VhostUserError {
    warn!("front-end message refused: {what}");
    VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what))
}

impl Handler {
    /// A handler for a fresh connection to `device`.
    pub fn new(device: Arc<Device>, channel: BackendChannel) -> Self {
        Handler {
            device,
            channel,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            mappings: Vec::new(),
            inflight: None,
            closing: false,
        }
    }

    /// Stops every ring for good and completes what they took (the connection is closing).
    pub fn close(&mut self) {
        self.closing = true;
        self.device.quiesce();
    }

    fn queue(&self, index: u32) -> Result<&super::device::Queue> {
        self.device
            .queue(index as usize)
            .ok_or_else(|| refused(format!("queue {index} does not exist")))
    }

    fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol & f.bits() != 0
    }

    /// A ring's configuration may only change while it is stopped.
    fn stopped(&self, index: u32, what: &str) -> Result<&super::device::Queue> {
        let q = self.queue(index)?;
        if q.vring.get_ref().get_queue().ready() {
            return Err(refused(format!("{what} for running queue {index}")));
        }
        Ok(q)
    }

    fn vmm_to_gpa(&self, addr: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|m| addr >= m.vmm_addr && addr - m.vmm_addr < m.size)
            .map(|m| addr - m.vmm_addr + m.gpa)
    }

    /// Watches the queue's kick while its ring is started and enabled, and looks at the ring
    /// when it becomes so.
    fn update_registration(&self, index: u32) -> Result<()> {
        let q = self.queue(index)?;
        if self.closing {
            return Ok(());
        }
        let (active, kick) = {
            let state = q.vring.get_ref();
            let active = state.get_queue().ready() && state.is_enabled();
            (active, state.get_kick().as_ref().map(|k| k.as_raw_fd()))
        };
        let kick = kick.filter(|_| active);
        q.thread
            .set_kick(kick)
            .map_err(VhostUserError::ReqHandlerError)?;
        if kick.is_some() {
            q.thread.wake();
        }
        Ok(())
    }

    /// Starts a ring once it has its kick: the used index is taken from guest memory, and with
    /// an in-flight region, the requests a previous incarnation took and did not complete are
    /// queued for resubmission and the avail ring resumes after them.
    fn start_ring(&mut self, index: u32) -> Result<()> {
        let q = self.queue(index)?;
        if self.closing {
            return Ok(());
        }
        {
            let state = q.vring.get_ref();
            if state.get_queue().ready() || state.get_kick().is_none() {
                return Ok(());
            }
        }
        let used = q
            .vring
            .queue_used_idx()
            .map_err(|e| refused(format!("queue {index}: used ring unreadable: {e}")))?;
        q.vring.set_queue_next_used(used);
        let size = q.vring.get_ref().get_queue().size();
        let mut log = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(index as u16, size));
        if self.inflight.is_some() && log.is_none() {
            warn!(
                "queue {index}: the in-flight region has no room for a ring of {size}; not tracked"
            );
        }
        let recovery = log.as_mut().map(|l| l.recover(used)).unwrap_or_default();
        if log.is_some() && !recovery.fresh {
            let next = used.wrapping_add(recovery.resubmit.len() as u16);
            if !recovery.resubmit.is_empty() {
                info!(
                    "queue {index}: resubmitting {} requests taken before the restart",
                    recovery.resubmit.len()
                );
            }
            q.vring.set_queue_next_avail(next);
        }
        q.vring.set_queue_ready(true);
        q.worker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start_ring(
                &q.vring,
                log.map(|l| Box::new(l) as Box<dyn InflightLog>),
                recovery.resubmit,
            );
        // Used elements a previous incarnation published may never have been signalled.
        if !recovery.fresh {
            let _ = q.vring.signal_used_queue();
        }
        self.update_registration(index)
    }

    fn add_region(
        &mut self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<GuestRegionMmap> {
        let mmap = region.mmap_region::<()>(file)?;
        let guest = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| refused("memory region wraps the guest address space".into()))?;
        check_region_in_file(&guest).map_err(|e| refused(e.to_string()))?;
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(guest)
    }

    fn replace_memory(&self, mem: GuestMem) {
        self.device
            .memory()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(mem);
    }

    /// Stops ring `index` and completes what it took (GET_VRING_BASE, RESET_DEVICE).
    fn stop_ring(&self, index: u32) -> Result<u16> {
        let q = self.queue(index)?;
        q.vring.set_queue_ready(false);
        let _ = q.thread.set_kick(None);
        // The front-end reads the used ring (and syncs its dirty log) right after our answer.
        q.worker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stop_ring();
        Ok(q.vring.queue_next_avail())
    }
}

/// Checks that a file-backed region lies inside its file (for regular files, such as memfds,
/// shm and hugetlbfs files; device files have no size to check): touching a mapping past the end
/// of its file raises SIGBUS.
fn check_region_in_file(region: &GuestRegionMmap) -> io::Result<()> {
    let Some(fo) = region.file_offset() else {
        return Ok(());
    };
    let meta = fo.file().metadata()?;
    if !meta.file_type().is_file() {
        return Ok(());
    }
    let end = fo.start().checked_add(region.len());
    if end.is_none_or(|end| end > meta.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "region at guest address {:#x} maps {} bytes from offset {} of a {}-byte file",
                region.start_addr().0,
                region.len(),
                fo.start(),
                meta.len()
            ),
        ));
    }
    Ok(())
}

fn unsupported<T>(what: &'static str) -> Result<T> {
    Err(VhostUserError::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.owned, true) {
            return Err(refused("SET_OWNER twice".into()));
        }
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_device()?;
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        for i in 0..self.device.queues().len() {
            self.stop_ring(i as u32)?;
            let q = self.queue(i as u32)?;
            q.vring.set_enabled(false);
            q.vring.set_kick(None);
            q.vring.set_call(None);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.device.features();
        if extra != 0 {
            return Err(refused(format!("features {extra:#x} were not offered")));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES, rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (i, q) in self.device.queues().iter().enumerate() {
                q.vring.set_enabled(true);
                self.update_registration(i as u32)?;
            }
        }
        self.device.set_acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return unsupported("postcopy");
        }
        self.mappings.clear();
        let mut guest = Vec::new();
        for (region, file) in regions.iter().zip(files) {
            match self.add_region(region, file) {
                Ok(r) => guest.push(r),
                Err(e) => {
                    // Withdraw the old map too: the front-end's memory is no longer what it was.
                    self.replace_memory(GuestMemoryMmap::new());
                    return Err(e);
                }
            }
        }
        let mem = GuestMemoryMmap::from_regions(guest)
            .map_err(|e| refused(format!("memory table: {e}")))?;
        self.replace_memory(mem);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = u32::from(self.device.settings().queue_size);
        let q = self.stopped(index, "SET_VRING_NUM")?;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(refused(format!(
                "queue {index} size {num}: not a power of two from 1 to {max}"
            )));
        }
        q.vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        // The logging flag matters only with LOG_SHMFD, which is not offered.
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let q = self.queue(index)?;
        let translate = |addr: u64, what: &str| {
            self.vmm_to_gpa(addr).ok_or_else(|| {
                refused(format!(
                    "queue {index}: {what} at {addr:#x} is in no memory region"
                ))
            })
        };
        let desc = translate(descriptor, "descriptor table")?;
        let avail = translate(available, "avail ring")?;
        let used = translate(used, "used ring")?;
        let running = q.vring.get_ref().get_queue().ready();
        if running {
            // Only the logging flag may change under a running ring (migration start/end).
            let qu = q.vring.get_ref();
            let qu = qu.get_queue();
            if (qu.desc_table(), qu.avail_ring(), qu.used_ring()) != (desc, avail, used) {
                return Err(refused(format!("ring addresses of running queue {index}")));
            }
            return Ok(());
        }
        q.vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| refused(format!("queue {index}: ring addresses: {e}")))?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let q = self.stopped(index, "SET_VRING_BASE")?;
        let base = u16::try_from(base)
            .map_err(|_| refused(format!("queue {index} base {base} above 65535")))?;
        q.vring.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let next_avail = self.stop_ring(index)?;
        let q = self.queue(index)?;
        q.vring.set_kick(None);
        q.vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.queue(u32::from(index))?;
        // Unwatch the old descriptor before it is closed.
        q.thread
            .set_kick(None)
            .map_err(VhostUserError::ReqHandlerError)?;
        q.vring.set_kick(fd);
        self.start_ring(u32::from(index))?;
        self.update_registration(u32::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.queue(u32::from(index))?;
        q.vring.set_call(fd);
        if q.vring.get_ref().get_queue().ready() {
            // QEMU sends the call descriptor after the kick: used elements published before a
            // restart (or while the interrupt was masked) get their notification now. A
            // spurious one costs the driver a look at the used ring.
            let _ = q.vring.signal_used_queue();
            return Ok(());
        }
        self.start_ring(u32::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.queue(u32::from(index))?.vring.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.device.protocol_features().bits();
        if extra != 0 {
            return Err(refused(format!(
                "protocol features {extra:#x} were not offered"
            )));
        }
        if self.acked_protocol != features {
            info!(
                "front-end protocol features {features:#x}: {:?}",
                VhostUserProtocolFeatures::from_bits_truncate(features)
            );
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.device.queues().len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.queue(index)?.vring.set_enabled(enable);
        self.update_registration(index)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        // An empty answer tells the front-end the read failed.
        Ok(self.device.get_config(offset, size).unwrap_or_else(|| {
            crate::guest_warn!(
                "GET_CONFIG for {size} bytes at {offset} is outside the config space"
            );
            Vec::new()
        }))
    }

    fn set_config(&mut self, offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // No field is writable without CONFIG_WCE, which we do not offer.
        Err(refused(format!(
            "config space offset {offset} is read-only"
        )))
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        let reply_ack = self.has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        self.channel.set(backend, reply_ack);
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> Result<()> {
        unsupported("GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if usize::from(msg.num_queues) > self.device.queues().len() {
            return Err(refused(format!(
                "in-flight region for {} queues; the device has {}",
                msg.num_queues,
                self.device.queues().len()
            )));
        }
        let (file, region) =
            Region::create(msg.num_queues, msg.queue_size).map_err(|e| refused(e.to_string()))?;
        let size = file
            .metadata()
            .map_err(VhostUserError::ReqHandlerError)?
            .len();
        self.inflight = Some(Arc::new(region));
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let queues = msg.num_queues.min(self.device.queues().len() as u16);
        let region = Region::open(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            queues,
            msg.queue_size,
        )
        .map_err(|e| refused(e.to_string()))?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return unsupported("postcopy");
        }
        if self.mappings.len() >= MAX_MEM_SLOTS {
            return Err(refused(format!("more than {MAX_MEM_SLOTS} memory regions")));
        }
        let guest = self.add_region(region, file)?;
        let mem = self
            .device
            .memory()
            .memory()
            .insert_region(Arc::new(guest))
            .map_err(|e| {
                self.mappings.pop();
                refused(format!("memory region: {e}"))
            })?;
        self.replace_memory(mem);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (mem, _) = self
            .device
            .memory()
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| refused(format!("memory region: {e}")))?;
        self.replace_memory(mem);
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> Result<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> Result<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported("dirty logging")
    }
}
