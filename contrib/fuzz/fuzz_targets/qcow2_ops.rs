//! cargo-fuzz target: see `vhost_device_blk::fuzzing::qcow2_ops` for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_device_blk::fuzzing::qcow2_ops(data);
});
