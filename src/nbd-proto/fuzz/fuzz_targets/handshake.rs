//! Fuzz target: arbitrary client bytes through the handshake state machine and, when it
//! reaches transmission, through the request decoder (see `fuzzing::fuzz_handshake`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pairbd_nbd_proto::fuzzing::fuzz_handshake(data);
});
