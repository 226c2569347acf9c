//! Rendering of the sender core's transmits ([`Tx`]) into datagram bytes:
//! one function for the real send driver (`io::send`) and the whole-wave
//! simulation alike, so the simulation tests the bytes the wire carries.
//!
//! Owns: a batch buffer of equal-sized datagrams (the layout UDP GSO
//! needs), the payload of each kind (a source symbol cut from the loaded
//! block, a RaptorQ repair symbol from the block's encoder, the XOR of a
//! coded combination), the header, and the batch's tags (side by side in
//! SIMD lanes). Must not: send anything, or decide what is sent.

use thiserror::Error;

use super::coding::xor_into;
use super::sender::Tx;
use crate::image::fec::{source_symbol, BlockEncoder};
use crate::image::manifest::Manifest;
use crate::wire::packet::{self, Header, Kind, PacketError, KEY_LEN};

/// Where a transmit's payload comes from: the blocks and encoders the
/// driver holds for the core.
pub trait SymbolSource {
    /// Block `b`'s source data, if loaded.
    fn block(&self, b: u32) -> Option<&[u8]>;
    /// Block `b`'s repair encoder, if built.
    fn encoder(&self, b: u32) -> Option<&BlockEncoder>;
}

/// Why a transmit was not rendered; the datagram is skipped (receivers
/// recover it like a loss) and the driver counts it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    /// The core asked for a source symbol of a block not in memory.
    #[error("block {0}: source data not loaded")]
    NotLoaded(u32),
    /// The core asked for a repair symbol of a block with no encoder.
    #[error("block {0}: repair encoder missing")]
    NoEncoder(u32),
    /// The encoder gave no symbol of the session's size.
    #[error("block {block}: no repair symbol {esi} of the session's size")]
    BadRepair {
        /// The block.
        block: u32,
        /// The repair ESI asked for.
        esi: u32,
    },
    /// The batch holds its maximum of datagrams.
    #[error("datagram batch is full")]
    BatchFull,
    /// The header could not be written.
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// What [`Packetizer::render`] did with a transmit.
#[derive(Debug, PartialEq, Eq)]
pub enum Rendered<'a> {
    /// Appended to the batch; tagged by [`Packetizer::seal`].
    Batched,
    /// A probe: its own small, tagged datagram, to send now.
    Probe(&'a [u8]),
}

/// Datagram builder of a send loop: one contiguous buffer of equal-sized
/// datagrams and the session's key.
pub struct Packetizer {
    key: [u8; KEY_LEN],
    session: u32,
    symbol_size: usize,
    dlen: usize,
    capacity: usize,
    buf: Vec<u8>,
    count: usize,
    scratch: Vec<u8>,
    probe: [u8; packet::OVERHEAD],
}

impl Packetizer {
    /// A builder of batches of up to `capacity` datagrams of `symbol_size`
    /// payload bytes.
    pub fn new(key: [u8; KEY_LEN], session: u32, symbol_size: usize, capacity: usize) -> Self {
        let dlen = packet::datagram_len(symbol_size);
        Packetizer {
            key,
            session,
            symbol_size,
            dlen,
            capacity,
            buf: vec![0u8; capacity * dlen],
            count: 0,
            scratch: vec![0u8; symbol_size],
            probe: [0u8; packet::OVERHEAD],
        }
    }

    /// Empty the batch.
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of each datagram of the batch.
    pub fn datagram_len(&self) -> usize {
        self.dlen
    }

    /// The batch: `len()` datagrams of `datagram_len()` bytes, back to
    /// back (tagged once [`Self::seal`] ran).
    pub fn batch(&self) -> &[u8] {
        &self.buf[..self.count * self.dlen]
    }

    /// Render `tx`: a symbol or coded datagram is appended to the batch, a
    /// probe is returned on its own.
    pub fn render(
        &mut self,
        tx: &Tx,
        m: &Manifest,
        src: &impl SymbolSource,
    ) -> Result<Rendered<'_>, RenderError> {
        let (kind, seq, block, esi) = match *tx {
            Tx::Probe { seq } => return Ok(Rendered::Probe(self.probe(seq)?)),
            Tx::Symbol { seq, block, esi } => (Kind::Symbol, seq, block, esi),
            Tx::Coded { seq, block, id, .. } => (Kind::Coded, seq, block, id),
        };
        if self.count >= self.capacity {
            return Err(RenderError::BatchFull);
        }
        let h = Header {
            kind,
            session: self.session,
            seq,
            block,
            esi,
            payload_len: self.symbol_size as u16,
        };
        let at = self.count * self.dlen;
        let out = &mut self.buf[at..at + self.dlen];
        packet::emit_header(&h, out)?;
        let payload = &mut out[packet::HEADER_LEN..packet::HEADER_LEN + self.symbol_size];
        match tx {
            Tx::Probe { .. } => {}
            Tx::Symbol { esi, .. } if *esi < m.source_symbols(block) => {
                let d = src.block(block).ok_or(RenderError::NotLoaded(block))?;
                source_symbol(d, *esi, payload);
            }
            Tx::Symbol { esi, .. } => {
                let e = src.encoder(block).ok_or(RenderError::NoEncoder(block))?;
                match e.repair(*esi, 1).pop() {
                    Some(s) if s.len() == payload.len() => payload.copy_from_slice(&s),
                    _ => return Err(RenderError::BadRepair { block, esi: *esi }),
                }
            }
            Tx::Coded { esis, .. } => {
                let d = src.block(block).ok_or(RenderError::NotLoaded(block))?;
                payload.fill(0);
                for &e in esis {
                    source_symbol(d, e, &mut self.scratch);
                    xor_into(payload, &self.scratch);
                }
            }
        }
        self.count += 1;
        Ok(Rendered::Batched)
    }

    /// Tag every datagram of the batch (side by side in SIMD lanes).
    pub fn seal(&mut self) {
        let mut all: Vec<&mut [u8]> = self.buf[..self.count * self.dlen]
            .chunks_mut(self.dlen)
            .collect();
        packet::seal_many(&self.key, &mut all);
    }

    fn probe(&mut self, seq: u32) -> Result<&[u8], RenderError> {
        let h = Header {
            kind: Kind::Probe,
            session: self.session,
            seq,
            block: 0,
            esi: 0,
            payload_len: 0,
        };
        let n = packet::emit(&h, &[], &self.key, &mut self.probe)?;
        Ok(&self.probe[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fec::BlockAssembly;
    use crate::wire::packet::{parse, verify};

    struct One<'a> {
        data: &'a [u8],
        enc: Option<BlockEncoder>,
    }

    impl SymbolSource for One<'_> {
        fn block(&self, b: u32) -> Option<&[u8]> {
            (b == 0).then_some(self.data)
        }
        fn encoder(&self, b: u32) -> Option<&BlockEncoder> {
            if b == 0 {
                self.enc.as_ref()
            } else {
                None
            }
        }
    }

    const KEY: [u8; 32] = [3; 32];

    #[test]
    fn every_kind_renders_to_a_tagged_datagram_a_receiver_accepts() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let m = Manifest::of_bytes(&data, 4096, 512).unwrap();
        let src = One {
            enc: Some(BlockEncoder::new(&m.block_oti(0), &data)),
            data: &data,
        };
        let mut pk = Packetizer::new(KEY, 5, 512, 4);
        let txs = [
            Tx::Symbol {
                seq: 1,
                block: 0,
                esi: 2,
            },
            Tx::Symbol {
                seq: 2,
                block: 0,
                esi: 9,
            },
            Tx::Coded {
                seq: 3,
                block: 0,
                id: 4,
                esis: vec![0, 1, 5],
            },
        ];
        for tx in &txs {
            assert_eq!(pk.render(tx, &m, &src), Ok(Rendered::Batched));
        }
        pk.seal();
        let dl = pk.datagram_len();
        let got: Vec<&[u8]> = pk.batch().chunks(dl).collect();
        assert_eq!(got.len(), 3);
        let mut sym = vec![0u8; 512];
        for (d, tx) in got.iter().zip(&txs) {
            let (h, payload) = parse(d).unwrap();
            assert_eq!(verify(&KEY, d), Ok(()), "tag");
            assert_eq!(h.session, 5);
            match tx {
                Tx::Symbol { esi: 2, .. } => {
                    source_symbol(&data, 2, &mut sym);
                    assert_eq!(payload, &sym[..]);
                }
                Tx::Symbol { esi, .. } => {
                    // A repair symbol: with the other source symbols it
                    // decodes the block.
                    let mut a = BlockAssembly::new(8, 512);
                    for e in 0..8u32 {
                        if e != 3 {
                            source_symbol(&data, e, &mut sym);
                            a.add(e, &sym);
                        }
                    }
                    a.add(*esi, payload);
                    let decoded = a.decode(&m.block_oti(0), data.len()).ok();
                    assert_eq!(decoded.as_deref(), Some(&data[..]));
                }
                Tx::Coded { esis, .. } => {
                    let mut x = vec![0u8; 512];
                    for e in esis {
                        source_symbol(&data, *e, &mut sym);
                        xor_into(&mut x, &sym);
                    }
                    assert_eq!(payload, &x[..]);
                    assert_eq!(h.kind, Kind::Coded);
                    assert_eq!(h.esi, 4, "a coded datagram carries its combination id");
                }
                Tx::Probe { .. } => unreachable!(),
            }
        }
        match pk.render(&Tx::Probe { seq: 9 }, &m, &src) {
            Ok(Rendered::Probe(p)) => {
                let (h, payload) = parse(p).unwrap();
                assert_eq!((h.kind, h.seq, payload.len()), (Kind::Probe, 9, 0));
                assert_eq!(verify(&KEY, p), Ok(()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_data_or_encoder_and_a_full_batch_are_errors_not_garbage() {
        // Two blocks; the source holds only block 0.
        let data = vec![1u8; 8192];
        let m = Manifest::of_bytes(&data, 4096, 512).unwrap();
        let none = One {
            data: &data[..4096],
            enc: None,
        };
        let mut pk = Packetizer::new(KEY, 5, 512, 1);
        let repair = Tx::Symbol {
            seq: 1,
            block: 0,
            esi: 8,
        };
        assert_eq!(
            pk.render(&repair, &m, &none),
            Err(RenderError::NoEncoder(0))
        );
        let other = Tx::Symbol {
            seq: 1,
            block: 1,
            esi: 0,
        };
        assert_eq!(pk.render(&other, &m, &none), Err(RenderError::NotLoaded(1)));
        assert!(pk.is_empty(), "a failed render leaves nothing in the batch");
        let src = Tx::Symbol {
            seq: 2,
            block: 0,
            esi: 0,
        };
        assert_eq!(pk.render(&src, &m, &none), Ok(Rendered::Batched));
        assert_eq!(pk.render(&src, &m, &none), Err(RenderError::BatchFull));
        assert_eq!(pk.len(), 1);
    }
}
