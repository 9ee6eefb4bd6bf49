//! Fuzz target: arbitrary export limits and transmission-phase bytes through the request
//! decoder and validator (see `fuzzing::fuzz_request`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pairbd_nbd_proto::fuzzing::fuzz_request(data);
});
