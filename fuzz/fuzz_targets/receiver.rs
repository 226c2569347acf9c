//! The receiver core fed arbitrary datagrams: never panics, never counts a
//! block done from garbage.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast::dataplane::receiver::ReceiverCore;
use rackcast::manifest::{BlockInfo, Manifest};

fuzz_target!(|data: &[u8]| {
    let m = Manifest {
        image_size: 8192,
        image_hash: [0; 32],
        block_size: 4096,
        symbol_size: 64,
        blocks: vec![BlockInfo { hash: [0; 32], zero: false }; 2],
    };
    let mut rx = ReceiverCore::new(m, 1, [2; 32]);
    for chunk in data.split(|b| *b == 0xff) {
        let _ = rx.on_datagram(chunk);
    }
    assert_eq!(rx.blocks_done(), 0);
    let _ = rx.status();
});
