//! Entry points for the fuzz targets in `contrib/fuzz` (and for the test that replays their seed
//! corpus). Not part of the daemon's API: each function takes arbitrary bytes, drives one
//! layer the way a hostile guest, VMM or image would, and panics only when an invariant
//! breaks. See docs/security.md for how to run them.

mod inflight;
mod qcow2;
mod request;
mod vhost_user;

pub use inflight::inflight_region;
pub use qcow2::qcow2_ops;
pub use request::request_parse;
pub use vhost_user::{vhost_user_stream, vhost_user_stream_until_used};

use std::os::fd::{FromRawFd, OwnedFd};

/// An anonymous memory file of `size` bytes (at least) starting with `data`.
fn memfd(name: &std::ffi::CStr, data: &[u8], size: u64) -> std::fs::File {
    // SAFETY: a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size.max(data.len() as u64))
        .expect("sizing a memfd");
    std::os::unix::fs::FileExt::write_all_at(&file, data, 0).expect("filling a memfd");
    file
}

/// Reads a little-endian u16 at `at`, or 0 past the end.
fn le16(data: &[u8], at: usize) -> u16 {
    match data.get(at..at + 2) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]),
        None => 0,
    }
}
