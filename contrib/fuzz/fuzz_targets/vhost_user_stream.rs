//! cargo-fuzz target: see `vhost_device_blk::fuzzing::vhost_user_stream` for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_device_blk::fuzzing::vhost_user_stream(data);
});
