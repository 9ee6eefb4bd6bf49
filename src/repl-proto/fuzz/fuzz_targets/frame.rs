//! Fuzz target: any bytes through the replication frame decoder, frame after
//! frame, as a receiving node would read them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((_, used)) = pairbd_repl_proto::decode_all(rest) {
        rest = &rest[used..];
    }
});
