//! A compressed block's frame as a receiver gets it: arbitrary bytes that
//! the manifest vouches for (their digest is the frame digest) must unpack
//! to exactly the block or fail with an error, never panic, and never
//! produce more than the block's length whatever the frame claims.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::image::manifest::{merge_block_digests, BlockInfo, Manifest, Wire};
use rackcast_core::image::packed::unpack;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() >= 4096 {
        return;
    }
    let m = Manifest {
        image_size: 4096,
        image_hash: merge_block_digests(&[[1; 32]]),
        block_size: 4096,
        symbol_size: 1024,
        blocks: vec![BlockInfo {
            hash: [1; 32],
            zero: false,
            wire: Wire::Zstd {
                len: data.len() as u32,
                digest: *blake3::hash(data).as_bytes(),
            },
        }],
    };
    if let Ok(block) = unpack(&m, 0, data.to_vec()) {
        assert_eq!(block.len(), 4096);
    }
    // Any other frame is refused by its digest before decompression.
    let mut forged = data.to_vec();
    forged[0] ^= 1;
    assert!(unpack(&m, 0, forged).is_err());
});
