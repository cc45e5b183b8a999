//! Small helpers shared by the layers: aligned buffers and rate-limited logging.

pub mod aligned;
pub mod ratelimit;
