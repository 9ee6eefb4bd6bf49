//! Fuzz target: any bytes through the metadata slot decoder, as a node
//! reading a damaged or foreign metadata area would; a record that decodes
//! must encode back to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(record) = pairbd_meta::decode_slot(data) {
        assert_eq!(&pairbd_meta::encode_slot(&record)[..], data);
    }
});
