//! RaptorQ glue: one encoder/decoder per image block (never one for the
//! whole image), and the receiver-side assembly of one block's symbols.
//!
//! Owns: mapping between our (block, ESI) space and raptorq's, the
//! systematic fast path (all source symbols arrived: no decoding at all),
//! and handing raptorq only symbols whose length we already checked.
//! Must not: parse datagrams (see `wire::packet`) or touch files.
//!
//! ESI space per block: `0..K` are source symbols (slices of the block,
//! the last one zero-padded), `K..` are repair symbols, `repair id = ESI - K`
//! exactly as raptorq numbers them. raptorq caches encoding plans per K
//! internally (`SourceBlockEncoder::new`), so equal-sized blocks share one.

use raptorq::SourceBlockEncoder;
use raptorq::{EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder};

/// Copy source symbol `esi` of `block` into `out` (length = symbol size),
/// zero-padding past the end of the block.
pub fn source_symbol(block: &[u8], esi: u32, out: &mut [u8]) {
    let t = out.len();
    let start = (esi as usize * t).min(block.len());
    let end = (start + t).min(block.len());
    let n = end - start;
    out[..n].copy_from_slice(&block[start..end]);
    out[n..].fill(0);
}

/// Repair-symbol generator for one block. Building it solves the block's
/// intermediate symbols (the costly part); each repair symbol after that is
/// a handful of XORs.
pub struct BlockEncoder {
    inner: SourceBlockEncoder,
    k: u32,
}

impl BlockEncoder {
    /// The encoder of one block, with the block's transmission parameters.
    pub fn new(oti: &ObjectTransmissionInformation, block: &[u8]) -> BlockEncoder {
        let t = oti.symbol_size() as usize;
        let k = block.len().div_ceil(t);
        // raptorq wants whole symbols; the padding is what receivers assume.
        let inner = if block.len() == k * t {
            SourceBlockEncoder::new(0, oti, block)
        } else {
            let mut padded = vec![0u8; k * t];
            padded[..block.len()].copy_from_slice(block);
            SourceBlockEncoder::new(0, oti, &padded)
        };
        BlockEncoder { inner, k: k as u32 }
    }

    /// K: source symbols of the block.
    pub fn source_symbols(&self) -> u32 {
        self.k
    }

    /// Symbols with ESIs `first..first+count`, all of them `>= K`.
    pub fn repair(&self, first_esi: u32, count: u32) -> Vec<Vec<u8>> {
        debug_assert!(first_esi >= self.k);
        self.inner
            .repair_packets(first_esi.saturating_sub(self.k), count)
            .into_iter()
            .map(|p| p.split().1)
            .collect()
    }
}

/// Symbols of one block collected so far. Source symbols land in place in
/// a block-sized buffer; repair symbols are kept aside for raptorq.
pub struct BlockAssembly {
    k: u32,
    symbol_size: usize,
    buf: Vec<u8>,
    have: Vec<u64>,
    have_source: u32,
    repair: Vec<(u32, Vec<u8>)>,
}

/// What adding one symbol did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A symbol the block did not have.
    New,
    /// Already had it.
    Duplicate,
    /// Wrong payload length for this block: dropped.
    BadLength,
}

impl BlockAssembly {
    /// An empty assembly of a block of `k` source symbols.
    pub fn new(k: u32, symbol_size: u16) -> BlockAssembly {
        BlockAssembly::with_buffer(k, symbol_size, Vec::new())
    }

    /// Like [`Self::new`], reusing `buf` (a finished block's) for the
    /// symbols: its old bytes need no clearing, since a source symbol is
    /// only ever read after it was received into its slot.
    pub fn with_buffer(k: u32, symbol_size: u16, mut buf: Vec<u8>) -> BlockAssembly {
        buf.resize(k as usize * symbol_size as usize, 0);
        BlockAssembly {
            k,
            symbol_size: symbol_size as usize,
            buf,
            have: vec![0u64; (k as usize).div_ceil(64)],
            have_source: 0,
            repair: Vec::new(),
        }
    }

    /// Take symbol `esi`.
    pub fn add(&mut self, esi: u32, payload: &[u8]) -> Added {
        if payload.len() != self.symbol_size {
            return Added::BadLength;
        }
        if esi < self.k {
            let (w, bit) = ((esi / 64) as usize, esi % 64);
            if self.have[w] & (1 << bit) != 0 {
                return Added::Duplicate;
            }
            self.have[w] |= 1 << bit;
            self.have_source += 1;
            let at = esi as usize * self.symbol_size;
            self.buf[at..at + self.symbol_size].copy_from_slice(payload);
        } else {
            if self.repair.iter().any(|(e, _)| *e == esi) {
                return Added::Duplicate;
            }
            self.repair.push((esi, payload.to_vec()));
        }
        Added::New
    }

    /// Whether source symbol `esi` is held.
    pub fn has_source(&self, esi: u32) -> bool {
        esi < self.k && self.have[(esi / 64) as usize] & (1 << (esi % 64)) != 0
    }

    /// Source symbol `esi`, if held.
    pub fn source(&self, esi: u32) -> Option<&[u8]> {
        if !self.has_source(esi) {
            return None;
        }
        let at = esi as usize * self.symbol_size;
        Some(&self.buf[at..at + self.symbol_size])
    }

    /// Bytes it holds (its block buffer and the repair symbols kept).
    pub fn bytes(&self) -> usize {
        self.buf.len() + self.repair.iter().map(|(_, p)| p.len()).sum::<usize>()
    }

    /// Distinct symbols held.
    pub fn count(&self) -> u32 {
        self.have_source + self.repair.len() as u32
    }

    /// Symbols still needed before a decode can be attempted.
    pub fn shortfall(&self) -> u32 {
        self.k.saturating_sub(self.count())
    }

    /// Bitmap of source ESIs not yet received (bit `e % 8` of byte `e / 8`),
    /// if at least one and at most `cap` are missing.
    pub fn missing_source(&self, cap: u32) -> Option<Vec<u8>> {
        let missing = self.k - self.have_source;
        if missing == 0 || missing > cap {
            return None;
        }
        let mut out = vec![0u8; (self.k as usize).div_ceil(8)];
        for esi in 0..self.k {
            if self.have[(esi / 64) as usize] & (1 << (esi % 64)) == 0 {
                out[(esi / 8) as usize] |= 1 << (esi % 8);
            }
        }
        Some(out)
    }

    /// Enough symbols to try decoding (at least K).
    pub fn ready(&self) -> bool {
        self.count() >= self.k
    }

    /// Recover the block (`block_len` bytes). `None` when raptorq could not
    /// solve with what we have (rare with K symbols; one or two more fix it).
    pub fn decode(
        self,
        oti: &ObjectTransmissionInformation,
        block_len: usize,
    ) -> Result<Vec<u8>, BlockAssembly> {
        if self.have_source == self.k {
            let mut buf = self.buf;
            buf.truncate(block_len);
            return Ok(buf);
        }
        let mut dec = SourceBlockDecoder::new(0, oti, block_len as u64);
        let t = self.symbol_size;
        let mut packets = Vec::with_capacity(self.count() as usize);
        for esi in 0..self.k {
            if self.have[(esi / 64) as usize] & (1 << (esi % 64)) != 0 {
                let at = esi as usize * t;
                packets.push(EncodingPacket::new(
                    PayloadId::new(0, esi),
                    self.buf[at..at + t].to_vec(),
                ));
            }
        }
        for (esi, data) in &self.repair {
            packets.push(EncodingPacket::new(PayloadId::new(0, *esi), data.clone()));
        }
        match dec.decode(packets) {
            Some(mut out) => {
                out.truncate(block_len);
                Ok(out)
            }
            None => Err(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn oti(len: usize, t: u16) -> ObjectTransmissionInformation {
        ObjectTransmissionInformation::new(len as u64, t, 1, 1, 8)
    }

    /// Sends source then repair symbols through a seeded random loss of
    /// `loss`, as the sender does (shortfall-driven repair rounds), and
    /// checks the decoded block is exact.
    fn run(len: usize, t: u16, loss: f64, seed: u64) -> u32 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let oti = oti(len, t);
        let enc = BlockEncoder::new(&oti, &data);
        let k = enc.source_symbols();
        let mut asm = BlockAssembly::new(k, t);
        let mut sym = vec![0u8; t as usize];
        for esi in 0..k {
            source_symbol(&data, esi, &mut sym);
            if rng.random::<f64>() >= loss {
                asm.add(esi, &sym);
            }
        }
        let mut next = k;
        let mut rounds = 0;
        loop {
            if asm.ready() {
                match asm.decode(&oti, len) {
                    Ok(out) => {
                        assert_eq!(out, data);
                        return rounds;
                    }
                    Err(a) => asm = a,
                }
            }
            rounds += 1;
            assert!(rounds < 50, "no convergence");
            let n = asm.shortfall() + 2;
            for s in enc.repair(next, n) {
                if rng.random::<f64>() >= loss {
                    asm.add(next, &s);
                }
                next += 1;
            }
        }
    }

    #[test]
    fn decodes_under_loss_sweep() {
        for (i, loss) in [0.0, 0.01, 0.05, 0.1, 0.2, 0.3].iter().enumerate() {
            for seed in 0..3 {
                run(64 * 1024 + 77, 1432, *loss, seed * 10 + i as u64);
            }
        }
    }

    #[test]
    fn lossless_needs_no_repair() {
        assert_eq!(run(100_000, 1024, 0.0, 1), 0);
    }

    #[test]
    fn duplicate_and_bad_length() {
        let mut a = BlockAssembly::new(4, 16);
        assert_eq!(a.add(1, &[0; 16]), Added::New);
        assert_eq!(a.add(1, &[0; 16]), Added::Duplicate);
        assert_eq!(a.add(9, &[0; 16]), Added::New);
        assert_eq!(a.add(9, &[0; 16]), Added::Duplicate);
        assert_eq!(a.add(2, &[0; 15]), Added::BadLength);
        assert_eq!(a.count(), 2);
        assert_eq!(a.shortfall(), 2);
    }

    #[test]
    fn source_symbol_pads_tail() {
        let block = [1u8, 2, 3, 4, 5];
        let mut out = [9u8; 4];
        source_symbol(&block, 1, &mut out);
        assert_eq!(out, [5, 0, 0, 0]);
        source_symbol(&block, 7, &mut out);
        assert_eq!(out, [0, 0, 0, 0]);
    }
}
