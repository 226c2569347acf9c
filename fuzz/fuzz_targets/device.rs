//! Device control messages, both directions: parse must never panic; what
//! parses re-encodes to a frame that parses to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::wire::device::{AgentMsg, ApplianceMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = AgentMsg::parse(data) {
        let again = m.emit().expect("emit");
        assert_eq!(AgentMsg::parse(&again).expect("reparse"), m);
    }
    if let Ok(m) = ApplianceMsg::parse(data) {
        let again = m.emit().expect("emit");
        assert_eq!(ApplianceMsg::parse(&again).expect("reparse"), m);
    }
});
