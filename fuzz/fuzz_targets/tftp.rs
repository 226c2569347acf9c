//! TFTP packets: parse must never panic; what parses re-encodes to the
//! same packet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::wire::tftp::{emit, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data) {
        let mut buf = Vec::new();
        emit(&p, &mut buf).expect("emit");
        assert_eq!(parse(&buf).expect("reparse"), p);
    }
});
