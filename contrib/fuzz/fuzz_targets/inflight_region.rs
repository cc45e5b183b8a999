//! cargo-fuzz target: see `vhost_device_blk::fuzzing::inflight_region` for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_device_blk::fuzzing::inflight_region(data);
});
