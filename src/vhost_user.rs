//! The only module that knows vhost-user: `VhostUserBlk` implements `VhostUserBackend` directly
//! (interior mutability, one lock per queue), so every queue thread runs in parallel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::block::BlockBackend;
use crate::io::{AioMode, Engine, EngineError};
use crate::virtio::config::VirtioBlkConfig;
use crate::virtio::worker::{GuestMem, GuestMemAtomic, QueueWorker, Vring};
use crate::virtio::DeviceSettings;

/// The epoll token of a queue's I/O completion eventfd (above the range vhost-user-backend
/// reserves for kicks and its own exit/enable events).
pub fn io_event_token(num_queues: u16) -> u16 {
    num_queues + 1
}

/// Checks that every file-backed region of `mem` lies inside its file (for regular files, such
/// as memfds, shm and hugetlbfs files; device files have no size to check).
fn check_regions_in_files(mem: &GuestMem) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
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
    }
    Ok(())
}

/// One vhost-user-blk device for the lifetime of one front-end connection.
pub struct VhostUserBlk {
    settings: Arc<DeviceSettings>,
    config: VirtioBlkConfig,
    workers: Vec<Mutex<QueueWorker>>,
    event_idx: AtomicBool,
    /// The features last acknowledged (logged when they change).
    acked: AtomicU64,
}

impl VhostUserBlk {
    /// Creates the device and one worker (with its own I/O engine) per queue.
    pub fn new(
        settings: Arc<DeviceSettings>,
        backend: Arc<dyn BlockBackend>,
        mem: GuestMemAtomic,
        aio: AioMode,
    ) -> Result<Self, EngineError> {
        let info = backend.info();
        let config = VirtioBlkConfig::new(&settings, info.size, info.opt_io_size);
        let depth = u32::from(settings.queue_size) * 2;
        let workers = (0..settings.num_queues)
            .map(|i| {
                let engine = Engine::new(aio, depth)?;
                Ok(Mutex::new(QueueWorker::new(
                    i,
                    settings.clone(),
                    backend.clone(),
                    mem.clone(),
                    engine,
                )))
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(VhostUserBlk {
            settings,
            config,
            workers,
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(u64::MAX),
        })
    }

    fn worker(&self, queue: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.workers
            .get(queue)
            .map(|w| w.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The completion eventfd of queue `queue`'s engine.
    pub fn io_event_fd(&self, queue: usize) -> Option<std::os::unix::io::RawFd> {
        self.worker(queue).map(|w| w.notify_fd())
    }

    /// Completes every in-flight request on every queue (front-end gone or shutting down).
    pub fn drain_all(&self) {
        for q in 0..self.workers.len() {
            if let Some(mut w) = self.worker(q) {
                w.drain();
            }
        }
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        self.settings.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        // Front-ends repeat SET_FEATURES; one line per change (firmware, then the OS driver).
        if self.acked.swap(features, Ordering::Relaxed) != features {
            info!(
                "front-end features {features:#x}: {}",
                feature_names(features)
            );
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size).unwrap_or_else(|| {
            crate::guest_warn!(
                "GET_CONFIG for {size} bytes at {offset} is outside the config space"
            );
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, _buf: &[u8]) -> io::Result<()> {
        // No field is writable without CONFIG_WCE, which we do not offer.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("config space offset {offset} is read-only"),
        ))
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        // The workers hold a clone of the same GuestMemoryAtomic, which vhost-user-backend updates
        // in place; in-flight requests keep the old map alive through their own guard.
        //
        // vhost-user-backend maps whatever size the front-end names: a region past the end of
        // its file would raise SIGBUS at the first touch. Withdraw such a map before any queue
        // uses it; the error closes the connection.
        if let Err(e) = check_regions_in_files(&mem.memory()) {
            warn!("front-end memory table refused: {e}");
            mem.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace(GuestMemoryMmap::new());
            return Err(e);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.settings.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        // vhost-user-backend 0.24 adds the consumer to the thread's epoll set with
        // `into_raw_fd()` and never closes it: one descriptor leaked per queue thread and
        // connection, until a front-end that reconnects often exhausts them. Both ends are the
        // same eventfd, so hand it the notifier's own descriptor as the consumer; the notifier,
        // which vhost-user-backend keeps and drops with the thread's handler, closes it once.
        drop(consumer);
        // SAFETY: the descriptor is open (owned by `notifier`). vhost-user-backend 0.24 never
        // drops or closes the consumer (it only takes its raw number for epoll), so it is closed
        // exactly once, by `notifier`, after the polling thread is done with it. Revisit on an
        // upgrade: tests/hostile_vhost_user.rs counts the daemon's descriptors across reconnects.
        let consumer = unsafe { EventConsumer::from_raw_fd(notifier.as_raw_fd()) };
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the back-end must finish everything it accepted before it answers.
        if let Some(mut w) = self.worker(queue_index as usize) {
            w.drain();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(vring), Some(mut worker)) = (vrings.first(), self.worker(thread_id)) else {
            return Ok(());
        };
        if device_event == io_event_token(self.settings.num_queues) {
            worker.process_completions(vring);
        } else if device_event == 0 {
            let event_idx = self.event_idx.load(Ordering::Acquire);
            worker.process_queue(vring, event_idx);
        }
        // Errors are per request and already reported to the guest: returning one here would
        // stop the queue thread.
        Ok(())
    }
}

/// The names of the feature bits a front-end may acknowledge, for the log.
fn feature_names(features: u64) -> String {
    const NAMES: [(u32, &str); 12] = [
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_BLK_F_RO, "RO"),
        (30, "PROTOCOL_FEATURES"),
    ];
    let mut rest = features;
    let mut names: Vec<String> = Vec::new();
    for (bit, name) in NAMES {
        if features & (1u64 << bit) != 0 {
            names.push(name.to_owned());
            rest &= !(1u64 << bit);
        }
    }
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn feature_names() {
        assert_eq!(
            super::feature_names((1 << 32) | (1 << 29) | (1 << 12) | (1 << 40)),
            "VERSION_1 EVENT_IDX MQ 0x10000000000"
        );
        assert_eq!(super::feature_names(0), "none");
    }
}
