//! The vhost-user-blk device of one front-end connection: what it offers (virtio and protocol
//! features, config space), its vrings and one worker and thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::info;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::queue::QueueThread;
use super::Options;
use crate::block::BlockBackend;
use crate::io::{AioMode, Engine, EngineError};
use crate::virtio::config::VirtioBlkConfig;
use crate::virtio::worker::{GuestMemAtomic, QueueWorker, Vring};
use crate::virtio::DeviceSettings;

/// Why a device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No I/O engine for a queue.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A queue's ring state or thread could not be created.
    #[error("cannot set up queue {queue}: {source}")]
    Queue {
        /// The queue.
        queue: u16,
        /// The error.
        source: io::Error,
    },
}

/// One queue: its ring, its worker and the thread that runs it.
pub struct Queue {
    /// The ring as the front-end configured it.
    pub vring: Vring,
    /// The worker (locked by its thread while it works, and by the handler to stop the ring).
    pub worker: Arc<Mutex<QueueWorker>>,
    /// The thread.
    pub thread: QueueThread,
}

/// One vhost-user-blk device for the lifetime of one front-end connection.
pub struct Device {
    settings: Arc<DeviceSettings>,
    options: Options,
    config: VirtioBlkConfig,
    mem: GuestMemAtomic,
    queues: Vec<Queue>,
    event_idx: Arc<AtomicBool>,
    /// The features last acknowledged (logged when they change).
    acked: AtomicU64,
}

impl Device {
    /// Creates the device: one ring, worker (with its own I/O engine) and thread per queue.
    pub fn new(
        settings: Arc<DeviceSettings>,
        backend: Arc<dyn BlockBackend>,
        aio: AioMode,
        options: Options,
    ) -> Result<Self, DeviceError> {
        let info = backend.info();
        let config = VirtioBlkConfig::new(&settings, info.size, info.opt_io_size);
        let depth = u32::from(settings.queue_size) * 2;
        let mem = GuestMemAtomic::new(Default::default());
        let event_idx = Arc::new(AtomicBool::new(false));
        let mut queues = Vec::new();
        for i in 0..settings.num_queues {
            let err = |source| DeviceError::Queue { queue: i, source };
            let engine = Engine::new(aio, depth)?;
            let worker = Arc::new(Mutex::new(QueueWorker::new(
                i,
                settings.clone(),
                backend.clone(),
                mem.clone(),
                engine,
            )));
            let vring = VringRwLock::new(mem.clone(), settings.queue_size)
                .map_err(|e| err(io::Error::other(e.to_string())))?;
            let thread = QueueThread::spawn(i, worker.clone(), vring.clone(), event_idx.clone())
                .map_err(err)?;
            queues.push(Queue {
                vring,
                worker,
                thread,
            });
        }
        Ok(Device {
            settings,
            options,
            config,
            mem,
            queues,
            event_idx,
            acked: AtomicU64::new(u64::MAX),
        })
    }

    /// The device settings.
    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    /// The guest memory map the front-end gave us (swapped in place on changes).
    pub fn memory(&self) -> &GuestMemAtomic {
        &self.mem
    }

    /// Queue `index`, if the device has it.
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// Every queue.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Locks queue `index`'s worker.
    pub fn worker(&self, index: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.queues
            .get(index)
            .map(|q| q.worker.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        self.settings.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The vhost-user protocol features offered (REPLY_ACK is added by the message layer).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.options.inflight {
            f |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        f
    }

    /// Records the features the front-end acknowledged.
    pub fn set_acked_features(&self, features: u64) {
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.event_idx.store(event_idx, Ordering::Release);
        for q in &self.queues {
            q.vring.set_queue_event_idx(event_idx);
        }
        // Front-ends repeat SET_FEATURES; one line per change (firmware, then the OS driver).
        if self.acked.swap(features, Ordering::Relaxed) != features {
            info!(
                "front-end features {features:#x}: {}",
                feature_names(features)
            );
        }
    }

    /// `size` bytes of config space from `offset`, or nothing if that is outside it.
    pub fn get_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        self.config.read(offset, size)
    }

    /// Stops every ring and completes what it took: nothing is taken from the rings afterwards,
    /// and every request taken is completed and published (SIGTERM, RESET_DEVICE).
    pub fn quiesce(&self) {
        for q in &self.queues {
            q.vring.set_queue_ready(false);
            let _ = q.thread.set_kick(None);
            q.worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain();
        }
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
