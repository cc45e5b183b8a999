//! cargo-fuzz target: see `vhost_device_blk::fuzzing::request_parse` for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_device_blk::fuzzing::request_parse(data);
});
