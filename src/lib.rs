//! vhost-device-blk: a vhost-user-blk device daemon.
//!
//! A VMM connects to our Unix socket, hands over the guest memory and the virtqueues, and we
//! serve block requests from a disk image. Each layer knows only the one below it:
//!
//! ```text
//! VMM ──unix socket──▶ daemon (listener, reconnect, signals)
//!                        │
//!                        ▼
//!                      vhost_user (VhostUserBackend: features, config space, queue threads)
//!                        │ kick / io completion on the queue's epoll
//!                        ▼
//!                      virtio::worker (one per queue: pop → parse → map → submit → complete)
//!                        │ guest iovecs + host extents
//!                        ▼
//!                      block (BlockBackend: raw, later qcow2) maps guest ranges to extents
//!                        │
//!                        ▼
//!                      io (IoEngine: io_uring per queue, or a thread pool) → kernel
//! ```
//!
//! Guest data never passes through an intermediate buffer: descriptor buffers are translated
//! into host iovecs and handed to the kernel.

#![deny(missing_docs)]

pub mod block;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod tools;
pub mod util;
pub mod vhost_user;
pub mod virtio;

pub use config::Config;
pub use error::Error;
