//! Data-plane header: parse must never panic, and what parses must emit
//! back to the same bytes (tag recomputed with the same key).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::wire::packet::{datagram_len, emit, parse, verify};

fuzz_target!(|data: &[u8]| {
    let key = [1u8; 32];
    let _ = verify(&key, data);
    if let Ok((h, payload)) = parse(data) {
        assert_eq!(payload.len(), h.payload_len as usize);
        let mut out = vec![0u8; datagram_len(payload.len())];
        let n = emit(&h, payload, &key, &mut out).expect("emit of a parsed header");
        assert_eq!(&out[..n - 16], &data[..n - 16]);
        assert!(verify(&key, &out[..n]).is_ok());
    }
});
