//! The receiver core fed arbitrary datagrams, and correctly tagged symbol,
//! coded and probe datagrams with arbitrary headers and payloads mixed with
//! arbitrary coded plans (so the fuzzer gets past the tag): never panics,
//! never counts a block done without its decode being reported, and the
//! decode jobs it hands out name real blocks.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::dataplane::receiver::ReceiverCore;
use rackcast_core::image::manifest::{merge_block_digests, BlockInfo, Manifest};
use rackcast_core::wire::packet::{datagram_len, emit, Header, Kind};

const KEY: [u8; 32] = [2; 32];

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let m = Manifest {
        image_size: 8192,
        image_hash: merge_block_digests(&[[0; 32]; 2]),
        block_size: 4096,
        symbol_size: 64,
        blocks: vec![BlockInfo { hash: [0; 32], zero: false, wire: rackcast_core::image::manifest::Wire::Raw }; 2],
    };
    let mut rx = ReceiverCore::new(m, 1, KEY);
    let mut c = Cursor(data);
    let mut jobs = Vec::new();
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u32;
    while let Some(op) = c.u8() {
        match op % 4 {
            0 => {
                let n = c.u8().unwrap_or(0) as usize;
                batch.push(c.take(n).to_vec());
            }
            1 | 2 => {
                let (Some(block), Some(esi), Some(len)) = (c.u8(), c.u16(), c.u8()) else {
                    break;
                };
                let payload = c.take(len as usize).to_vec();
                let kind = match (op % 4, block % 8) {
                    (_, 7) => Kind::Probe,
                    (1, _) => Kind::Symbol,
                    _ => Kind::Coded,
                };
                let payload = if kind == Kind::Probe { Vec::new() } else { payload };
                let h = Header {
                    kind,
                    session: 1,
                    seq,
                    block: u32::from(block % 4),
                    esi: u32::from(esi),
                    payload_len: payload.len() as u16,
                };
                seq = seq.wrapping_add(1);
                let mut out = vec![0u8; datagram_len(payload.len())];
                if emit(&h, &payload, &KEY, &mut out).is_ok() {
                    batch.push(out);
                }
            }
            _ => {
                let (Some(block), Some(first), Some(n)) = (c.u8(), c.u16(), c.u8()) else {
                    break;
                };
                let combos: Vec<Vec<u32>> = (0..n % 8)
                    .map(|_| {
                        let k = c.u8().unwrap_or(0) % 5;
                        (0..k).map(|_| u32::from(c.u8().unwrap_or(0) % 70)).collect()
                    })
                    .collect();
                rx.on_coded_plan(u32::from(block % 4), u32::from(first), combos, &mut jobs);
            }
        }
        if batch.len() >= 16 || op & 0x80 != 0 {
            let refs: Vec<&[u8]> = batch.iter().map(|d| d.as_slice()).collect();
            rx.on_datagrams(&refs, &mut jobs);
            batch.clear();
        }
    }
    for d in &batch {
        if let Ok(Some(j)) = rx.on_datagram(d) {
            jobs.push(j);
        }
    }
    assert_eq!(rx.blocks_done(), 0);
    assert!(jobs.iter().all(|j| j.block < 2));
    let _ = rx.status();
});
