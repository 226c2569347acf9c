//! Control messages: parse must never panic; what parses re-encodes to a
//! frame that parses to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::wire::control::{emit, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse(data) {
        let again = emit(&m).expect("emit");
        assert_eq!(parse(&again).expect("reparse"), m);
    }
});
