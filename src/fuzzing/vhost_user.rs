//! The vhost-user message stream: a real device (two queues of 16 on a 1 MiB raw image) behind
//! our vhost-user handler, fed arbitrary bytes and file descriptors over a Unix socket.
//!
//! Input: chunks of `[len: u16 LE][flags: u8][len bytes]`. Flags bit 6: the bytes are the
//! contents of guest memory for the memfds sent after it (rings, requests), not sent. Otherwise
//! the bytes are written to the socket as they are (messages may span chunks); flags bits 0-1:
//! how many descriptors travel with them; bits 2-4: for each, an eventfd (bit set) or a 64 KiB
//! memfd holding the last guest memory contents; bit 7: after sending, write every eventfd sent
//! so far (a kick).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{le16, memfd};
use crate::block::{self, CacheMode, ImageFormat, LazyRefcounts, OpenOptions};
use crate::io::AioMode;
use crate::vhost_user::{Connection, Device, Options};
use crate::virtio::{serial_bytes, DeviceSettings, DiscardMode};

const QUEUES: u16 = 2;

/// Serves one connection that sends what the input describes. Returns the used index of queue
/// 0 in the first guest memory sent, with the rings where the seeds put them (0x200), 0 if none.
pub fn vhost_user_stream(data: &[u8]) -> u16 {
    run(data, None)
}

/// [`vhost_user_stream`], but after each kick waits up to `wait` for that used index to move
/// (so that a replayed seed completes its request before the stream goes on).
pub fn vhost_user_stream_until_used(data: &[u8], wait: Duration) -> u16 {
    run(data, Some(wait))
}

/// The used index of queue 0 in guest memory `m` (rings as the seeds lay them out).
fn used_idx(m: Option<&OwnedFd>) -> u16 {
    let Some(m) = m else { return 0 };
    let mut used = [0u8; 2];
    let f = std::fs::File::from(m.try_clone().expect("dup"));
    match std::os::unix::fs::FileExt::read_exact_at(&f, &mut used, 0x202) {
        Ok(()) => u16::from_le_bytes(used),
        Err(_) => 0,
    }
}

fn run(data: &[u8], wait: Option<Duration>) -> u16 {
    let image = memfd(c"fuzz-disk", &[], 1 << 20);
    let backend = block::open(&OpenOptions {
        path: PathBuf::from(format!("/proc/self/fd/{}", image.as_raw_fd())),
        format: Some(ImageFormat::Raw),
        read_only: false,
        cache: CacheMode::Writeback,
        l2_cache_size: None,
        lazy_refcounts: LazyRefcounts::Auto,
        locking: block::lock::Locking::Off,
    })
    .expect("a raw memfd image opens");
    let settings = Arc::new(DeviceSettings {
        num_queues: QUEUES,
        queue_size: 16,
        logical_block_size: 512,
        serial: serial_bytes("fuzz"),
        discard: DiscardMode::Unmap,
        read_only: false,
        mapped_reads: true,
    });
    let device = Arc::new(
        Device::new(settings, backend, AioMode::Auto, Options::default()).expect("device"),
    );

    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "vhost-device-blk-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("socket name");
    let listener = UnixListener::bind_addr(&addr).expect("bind");
    let mut front = UnixStream::connect_addr(&addr).expect("connect");
    let (stream, _) = listener.accept().expect("accept");
    let conn = Connection::start(device, stream).expect("connection");
    front
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    let mut kicks: Vec<EventFd> = Vec::new();
    let mut keep: Vec<OwnedFd> = Vec::new();
    let mut guest: &[u8] = &[];
    let mut at = 0;
    while at + 3 <= data.len() {
        let len = usize::from(le16(data, at));
        let flags = data[at + 2];
        let bytes = &data[at + 3..(at + 3 + len).min(data.len())];
        at += 3 + bytes.len();
        if flags & 0x40 != 0 {
            guest = bytes;
            continue;
        }
        let mut fds = Vec::new();
        for i in 0..(flags & 3) {
            if flags & (4 << i) != 0 {
                let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
                fds.push(e.as_raw_fd());
                kicks.push(e);
            } else {
                let m = OwnedFd::from(memfd(c"fuzz-guest", guest, 64 << 10));
                fds.push(m.as_raw_fd());
                keep.push(m);
            }
        }
        // The used index before this chunk: the device may serve the ring as soon as it is
        // enabled, before the kick.
        let before = used_idx(keep.first());
        let sent = if fds.is_empty() {
            front.write_all(bytes).is_ok()
        } else {
            front.send_with_fds(&[bytes], &fds).is_ok()
        };
        if !sent {
            break;
        }
        if flags & 0x80 != 0 {
            for k in &kicks {
                let _ = k.write(1);
            }
            if let Some(wait) = wait {
                let deadline = std::time::Instant::now() + wait;
                while used_idx(keep.first()) == before && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    let _ = front.shutdown(Shutdown::Write);
    // Read the replies so the back-end never blocks on a full socket, until it hangs up.
    let mut sink = [0u8; 4096];
    while matches!(front.read(&mut sink), Ok(n) if n > 0) {}
    conn.wait();
    used_idx(keep.first())
}
