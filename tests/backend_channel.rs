//! The back-end channel end to end: a front-end (vhost's own front-end side) negotiates
//! BACKEND_REQ, hands us its channel, and when another thread of the daemon announces a config
//! change, handles it as QEMU does: it asks for the config space on the main socket (which the
//! daemon's connection thread must answer meanwhile) and only then acknowledges.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::VhostBackend;
use vhost_device_blk::block::{self, CacheMode, ImageFormat, LazyRefcounts, OpenOptions};
use vhost_device_blk::io::AioMode;
use vhost_device_blk::vhost_user::{ChannelError, Connection, Device, Options};
use vhost_device_blk::virtio::{serial_bytes, DeviceSettings, DiscardMode};

const SIZE: u64 = 8 << 20;

/// What QEMU does with a config change: read the capacity again on the main socket.
struct Qemu {
    main: Frontend,
    capacities: Vec<u64>,
}

impl VhostUserFrontendReqHandlerMut for Qemu {
    fn handle_config_change(&mut self) -> HandlerResult<u64> {
        let (_, payload) = self
            .main
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
            .map_err(std::io::Error::other)?;
        self.capacities
            .push(u64::from_le_bytes(payload[..8].try_into().unwrap()));
        Ok(0)
    }
}

fn connection(dir: &tempfile::TempDir) -> (Connection, Frontend) {
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let backend = block::open(&OpenOptions {
        path,
        format: Some(ImageFormat::Raw),
        read_only: false,
        cache: CacheMode::Writeback,
        l2_cache_size: None,
        lazy_refcounts: LazyRefcounts::Auto,
        locking: block::lock::Locking::Off,
    })
    .unwrap();
    let settings = Arc::new(DeviceSettings {
        num_queues: 1,
        queue_size: 16,
        logical_block_size: 512,
        serial: serial_bytes("channel"),
        discard: DiscardMode::Unmap,
        read_only: false,
        mapped_reads: false,
    });
    let device =
        Arc::new(Device::new(settings, backend, AioMode::Auto, Options::default()).unwrap());
    let (ours, theirs) = UnixStream::pair().unwrap();
    let conn = Connection::start(device, ours).unwrap();
    let fe = Frontend::from_stream(theirs, 1);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features & (1 << 32 | 1 << 30)).unwrap();
    (conn, fe)
}

fn negotiate(fe: &mut Frontend, extra: VhostUserProtocolFeatures) {
    let offered = fe.get_protocol_features().unwrap();
    assert!(offered.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    fe.set_protocol_features(
        offered
            & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK | extra),
    )
    .unwrap();
    // Every message waits for its acknowledgement: the daemon has the channel once sent.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
}

#[test]
fn config_change_reaches_the_front_end_which_reads_the_config_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut fe) = connection(&dir);
    negotiate(&mut fe, VhostUserProtocolFeatures::BACKEND_REQ);
    let qemu = Arc::new(Mutex::new(Qemu {
        main: fe.clone(),
        capacities: Vec::new(),
    }));
    let mut channel = FrontendReqHandler::new(qemu.clone()).unwrap();
    channel.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&channel.get_tx_raw_fd()).unwrap();
    let server = std::thread::spawn(move || {
        // Two messages, then the test is done with the channel.
        for _ in 0..2 {
            channel.handle_request().unwrap();
        }
    });
    // Sent from this thread, not the daemon's connection thread, which answers GET_CONFIG.
    conn.channel().config_changed().unwrap();
    conn.channel().config_changed().unwrap();
    server.join().unwrap();
    assert_eq!(qemu.lock().unwrap().capacities, [SIZE / 512, SIZE / 512]);
}

#[test]
fn without_the_channel_or_an_answer_the_sender_is_told_and_the_connection_lives() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut fe) = connection(&dir);
    negotiate(&mut fe, VhostUserProtocolFeatures::empty());
    let r = conn.channel().config_changed();
    assert!(matches!(r, Err(ChannelError::NoChannel)), "{r:?}");
    // A front-end that takes the channel but never answers: the sender gives up after the
    // timeout; the main socket still serves.
    let dir2 = tempfile::tempdir().unwrap();
    let (conn, mut fe) = connection(&dir2);
    negotiate(&mut fe, VhostUserProtocolFeatures::BACKEND_REQ);
    let (tx, _rx) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&tx).unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        conn.channel().config_changed(),
        Err(ChannelError::Failed(_))
    ));
    assert!(t.elapsed() < vhost_device_blk::vhost_user::ACK_TIMEOUT + Duration::from_secs(2));
    let (_, payload) = fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap();
    assert_eq!(payload[..8], (SIZE / 512).to_le_bytes());
}
