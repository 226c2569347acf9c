//! Data-plane packet: the fixed, versioned header that precedes every
//! multicast datagram, plus the keyed BLAKE3 tag that trails it.
//!
//! Owns: byte layout, length checks, tag computation and verification.
//! Must not: know about blocks, decoders or sockets. Every length is checked
//! before any byte is read, so once [`parse`] returned `Ok` nothing panics,
//! and raptorq never sees an unvalidated datagram.
//!
//! Layout (big-endian):
//!
//! ```text
//!  0      2    3    4        8        12       16       20     22     24
//!  +------+----+----+--------+--------+--------+--------+------+------+---------+-----+
//!  |magic |ver |kind|session |  seq   | block  |  esi   | len  | rsvd | payload | tag |
//!  +------+----+----+--------+--------+--------+--------+------+------+---------+-----+
//! ```
//!
//! `tag` is the first [`TAG_LEN`] bytes of `blake3::keyed_hash(key, header ||
//! payload)`, with the wave key handed to receivers over TCP.

use thiserror::Error;

/// "RC" — cheap first filter for foreign traffic on the port.
pub const MAGIC: u16 = 0x5243;
/// Bumped on any incompatible change of this layout.
pub const VERSION: u8 = 1;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// Keyed BLAKE3 tag bytes after the payload.
pub const TAG_LEN: usize = 16;
/// Header + tag: what a packet costs beyond its symbol.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// IPv4 + UDP header bytes, for deriving the symbol size from the MTU.
pub const IP_UDP_OVERHEAD: usize = 28;
/// RaptorQ encoding symbol ids are 24-bit.
pub const MAX_ESI: u32 = (1 << 24) - 1;
/// Session key length (BLAKE3 key).
pub const KEY_LEN: usize = 32;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One RaptorQ encoding symbol of `block`.
    Symbol,
    /// No payload: advances `seq` while the sender is idle, so receivers can
    /// tell "lost" from "not sent yet" for the last symbols of a block.
    Probe,
    /// XOR of several source symbols of `block`; the `esi` field holds the
    /// combination id announced over TCP (`control::Msg::Coded`).
    Coded,
}

impl Kind {
    fn to_u8(self) -> u8 {
        match self {
            Kind::Symbol => 0,
            Kind::Probe => 1,
            Kind::Coded => 2,
        }
    }
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            0 => Some(Kind::Symbol),
            1 => Some(Kind::Probe),
            2 => Some(Kind::Coded),
            _ => None,
        }
    }
}

/// Parsed header. `payload_len` bytes of payload follow it in the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// The wave session's random id (from the TCP session): packets of
    /// another session are dropped before their tag is checked.
    pub session: u32,
    /// Sender-wide packet counter; receivers derive loss from its gaps.
    pub seq: u32,
    /// The image block the payload belongs to.
    pub block: u32,
    /// Encoding symbol id (24 bits), or a coded datagram's combination id.
    pub esi: u32,
    /// Payload bytes after the header.
    pub payload_len: u16,
}

/// Why a datagram was rejected. Each variant has its own counter.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than header + tag, or than header + payload_len + tag.
    #[error("datagram truncated: {got} bytes, need {need}")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the header promised.
        need: usize,
    },
    /// Longer than header + payload_len + tag.
    #[error("datagram has {extra} trailing bytes")]
    Trailing {
        /// Bytes past the tag.
        extra: usize,
    },
    /// Not ours at all.
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    /// Ours, but a version we do not speak.
    #[error("unsupported packet version {0}")]
    BadVersion(u8),
    /// A kind byte this version does not define.
    #[error("unknown packet kind {0}")]
    BadKind(u8),
    /// Reserved field not zero: a newer sender or garbage.
    #[error("reserved field is {0:#06x}, expected 0")]
    Reserved(u16),
    /// An ESI beyond RaptorQ's 24 bits.
    #[error("encoding symbol id {0} exceeds 24 bits")]
    EsiRange(u32),
    /// Probes carry no payload.
    #[error("probe packet with {0} payload bytes")]
    ProbePayload(u16),
    /// The keyed tag did not match: wrong key or tampered packet.
    #[error("authentication tag mismatch")]
    BadTag,
    /// Emitting: the payload is not as long as the header says.
    #[error("payload is {got} bytes, header says {header}")]
    PayloadLength {
        /// Payload bytes given.
        got: usize,
        /// What the header says.
        header: u16,
    },
}

/// Parse and check the header of `datagram`; returns the header and the
/// payload slice. Does not verify the tag (see [`verify`]), so that cheap
/// checks such as the session id run first.
pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), PacketError> {
    if datagram.len() < OVERHEAD {
        return Err(PacketError::Truncated {
            got: datagram.len(),
            need: OVERHEAD,
        });
    }
    let magic = u16::from_be_bytes([datagram[0], datagram[1]]);
    if magic != MAGIC {
        return Err(PacketError::BadMagic(magic));
    }
    if datagram[2] != VERSION {
        return Err(PacketError::BadVersion(datagram[2]));
    }
    let kind = Kind::from_u8(datagram[3]).ok_or(PacketError::BadKind(datagram[3]))?;
    let be32 = |at: usize| {
        u32::from_be_bytes([
            datagram[at],
            datagram[at + 1],
            datagram[at + 2],
            datagram[at + 3],
        ])
    };
    let session = be32(4);
    let seq = be32(8);
    let block = be32(12);
    let esi = be32(16);
    let payload_len = u16::from_be_bytes([datagram[20], datagram[21]]);
    let reserved = u16::from_be_bytes([datagram[22], datagram[23]]);
    if reserved != 0 {
        return Err(PacketError::Reserved(reserved));
    }
    if esi > MAX_ESI {
        return Err(PacketError::EsiRange(esi));
    }
    if kind == Kind::Probe && payload_len != 0 {
        return Err(PacketError::ProbePayload(payload_len));
    }
    let need = OVERHEAD + payload_len as usize;
    if datagram.len() < need {
        return Err(PacketError::Truncated {
            got: datagram.len(),
            need,
        });
    }
    if datagram.len() > need {
        return Err(PacketError::Trailing {
            extra: datagram.len() - need,
        });
    }
    let header = Header {
        kind,
        session,
        seq,
        block,
        esi,
        payload_len,
    };
    Ok((
        header,
        &datagram[HEADER_LEN..HEADER_LEN + payload_len as usize],
    ))
}

/// Check the trailing tag of a datagram that [`parse`] accepted.
pub fn verify(key: &[u8; KEY_LEN], datagram: &[u8]) -> Result<(), PacketError> {
    if datagram.len() < OVERHEAD {
        return Err(PacketError::Truncated {
            got: datagram.len(),
            need: OVERHEAD,
        });
    }
    let (body, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    let full = blake3::keyed_hash(key, body);
    if tags_equal(&full.as_bytes()[..TAG_LEN], tag) {
        Ok(())
    } else {
        Err(PacketError::BadTag)
    }
}

/// Datagrams checked per call of [`verify_many`] / [`seal_many`] lane group.
const LANE_GROUP: usize = 8;

/// [`verify`] for many datagrams at once: `ok[i]` says whether datagram
/// `i` carries a good tag. Equal-length datagrams (every symbol of a wave)
/// are hashed side by side (`image::lanes`), several times cheaper per
/// datagram than one at a time.
pub fn verify_many(key: &[u8; KEY_LEN], datagrams: &[&[u8]], ok: &mut [bool]) {
    for (group, ok) in datagrams.chunks(LANE_GROUP).zip(ok.chunks_mut(LANE_GROUP)) {
        let mut bodies: [&[u8]; LANE_GROUP] = [&[]; LANE_GROUP];
        let mut at = [0usize; LANE_GROUP];
        let mut n = 0;
        for (i, d) in group.iter().enumerate() {
            ok[i] = false;
            if d.len() >= OVERHEAD {
                bodies[n] = &d[..d.len() - TAG_LEN];
                at[n] = i;
                n += 1;
            }
        }
        let mut tags = [[0u8; 32]; LANE_GROUP];
        crate::image::lanes::keyed_hash_many(key, &bodies[..n], &mut tags);
        for k in 0..n {
            let d = group[at[k]];
            ok[at[k]] = tags_equal(&tags[k][..TAG_LEN], &d[d.len() - TAG_LEN..]);
        }
    }
}

/// Constant-time comparison of a computed and a received tag.
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fill in the tags of datagrams whose header and payload [`emit_body`]
/// wrote (each slice is exactly one datagram).
pub fn seal_many(key: &[u8; KEY_LEN], datagrams: &mut [&mut [u8]]) {
    for group in datagrams.chunks_mut(LANE_GROUP) {
        let mut tags = [[0u8; 32]; LANE_GROUP];
        {
            let mut bodies: [&[u8]; LANE_GROUP] = [&[]; LANE_GROUP];
            let mut n = 0;
            for d in group.iter() {
                bodies[n] = &d[..d.len().saturating_sub(TAG_LEN)];
                n += 1;
            }
            crate::image::lanes::keyed_hash_many(key, &bodies[..n], &mut tags);
        }
        for (d, t) in group.iter_mut().zip(&tags) {
            if d.len() >= OVERHEAD {
                let end = d.len();
                d[end - TAG_LEN..].copy_from_slice(&t[..TAG_LEN]);
            }
        }
    }
}

/// Total datagram length for a payload of `payload_len` bytes.
pub const fn datagram_len(payload_len: usize) -> usize {
    OVERHEAD + payload_len
}

/// Write header, payload and tag into `out`; returns the datagram length.
/// `out` must hold [`datagram_len`]`(payload.len())` bytes and `payload`
/// must fit the 16-bit length field; both are the caller's invariants
/// (the sender sizes its buffers from the symbol size), so violations are
/// reported as errors rather than trusted.
pub fn emit(
    header: &Header,
    payload: &[u8],
    key: &[u8; KEY_LEN],
    out: &mut [u8],
) -> Result<usize, PacketError> {
    let need = emit_body(header, payload, out)?;
    let body_end = need - TAG_LEN;
    let tag = blake3::keyed_hash(key, &out[..body_end]);
    out[body_end..need].copy_from_slice(&tag.as_bytes()[..TAG_LEN]);
    Ok(need)
}

/// [`emit`] without the tag: header and payload only, the tag bytes left
/// for [`seal_many`] (which tags a whole batch at once). Returns the
/// datagram length including the tag.
pub fn emit_body(header: &Header, payload: &[u8], out: &mut [u8]) -> Result<usize, PacketError> {
    if payload.len() != header.payload_len as usize {
        return Err(PacketError::PayloadLength {
            got: payload.len(),
            header: header.payload_len,
        });
    }
    let need = emit_header(header, out)?;
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    Ok(need)
}

/// The header alone; the caller writes the `header.payload_len` payload
/// bytes after it in place (the sender copies a symbol straight into its
/// send buffer) and [`seal_many`] adds the tag. Returns the datagram
/// length including the tag.
pub fn emit_header(header: &Header, out: &mut [u8]) -> Result<usize, PacketError> {
    let plen = header.payload_len as usize;
    let need = datagram_len(plen);
    if out.len() < need {
        return Err(PacketError::Truncated {
            got: out.len(),
            need,
        });
    }
    if header.esi > MAX_ESI {
        return Err(PacketError::EsiRange(header.esi));
    }
    out[0..2].copy_from_slice(&MAGIC.to_be_bytes());
    out[2] = VERSION;
    out[3] = header.kind.to_u8();
    out[4..8].copy_from_slice(&header.session.to_be_bytes());
    out[8..12].copy_from_slice(&header.seq.to_be_bytes());
    out[12..16].copy_from_slice(&header.block.to_be_bytes());
    out[16..20].copy_from_slice(&header.esi.to_be_bytes());
    out[20..22].copy_from_slice(&header.payload_len.to_be_bytes());
    out[22..24].copy_from_slice(&0u16.to_be_bytes());
    Ok(need)
}

/// Largest symbol size (a multiple of the RaptorQ alignment, 8) that fits in
/// one datagram of an IPv4 path with this MTU.
pub fn symbol_size_for_mtu(mtu: usize) -> Option<u16> {
    let room = mtu.checked_sub(IP_UDP_OVERHEAD + OVERHEAD)?;
    let aligned = room / 8 * 8;
    if aligned < 8 || aligned > u16::MAX as usize {
        None
    } else {
        Some(aligned as u16)
    }
}

/// `a >= b` in the header's sequence space (wrapping, window of 2^31):
/// sender and receiver compare sequence numbers the same way.
pub fn seq_ge(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    fn sample() -> (Header, Vec<u8>) {
        let payload: Vec<u8> = (0..64u8).collect();
        let h = Header {
            kind: Kind::Symbol,
            session: 0xdead_beef,
            seq: 42,
            block: 3,
            esi: 777,
            payload_len: payload.len() as u16,
        };
        (h, payload)
    }

    #[test]
    fn fixture_layout() {
        let (h, p) = sample();
        let mut buf = vec![0u8; datagram_len(p.len())];
        let n = emit(&h, &p, &KEY, &mut buf).unwrap();
        assert_eq!(n, 24 + 64 + 16);
        assert_eq!(
            &buf[..24],
            &[
                0x52, 0x43, 1, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 42, 0, 0, 0, 3, 0, 0, 3, 9, 0,
                64, 0, 0
            ]
        );
    }

    #[test]
    fn wrong_key_is_rejected() {
        let (h, p) = sample();
        let mut buf = vec![0u8; datagram_len(p.len())];
        emit(&h, &p, &KEY, &mut buf).unwrap();
        assert!(verify(&KEY, &buf).is_ok());
        assert_eq!(verify(&[8; KEY_LEN], &buf), Err(PacketError::BadTag));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let (h, p) = sample();
        let mut buf = vec![0u8; datagram_len(p.len())];
        emit(&h, &p, &KEY, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(parse(&buf[..cut]).is_err(), "accepted {cut} bytes");
        }
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(parse(&long), Err(PacketError::Trailing { extra: 1 }));
    }

    #[test]
    fn field_checks() {
        let (h, p) = sample();
        let mut buf = vec![0u8; datagram_len(p.len())];
        emit(&h, &p, &KEY, &mut buf).unwrap();
        let mut b = buf.clone();
        b[0] = 0;
        assert!(matches!(parse(&b), Err(PacketError::BadMagic(_))));
        let mut b = buf.clone();
        b[2] = 9;
        assert_eq!(parse(&b), Err(PacketError::BadVersion(9)));
        let mut b = buf.clone();
        b[3] = 5;
        assert_eq!(parse(&b), Err(PacketError::BadKind(5)));
        let mut b = buf.clone();
        b[16] = 1;
        assert!(matches!(parse(&b), Err(PacketError::EsiRange(_))));
        let mut b = buf.clone();
        b[23] = 1;
        assert_eq!(parse(&b), Err(PacketError::Reserved(1)));
    }

    #[test]
    fn mtu_symbol_size() {
        assert_eq!(symbol_size_for_mtu(1500), Some(1432));
        assert_eq!(symbol_size_for_mtu(9000), Some(8928));
        assert_eq!(symbol_size_for_mtu(60), None);
    }

    proptest! {
        #[test]
        fn round_trip(kind in 0u8..2, session: u32, seq: u32, block: u32,
                      esi in 0u32..=MAX_ESI, payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let kind = Kind::from_u8(kind).unwrap();
            let payload = if kind == Kind::Probe { Vec::new() } else { payload };
            let h = Header { kind, session, seq, block, esi, payload_len: payload.len() as u16 };
            let mut buf = vec![0u8; datagram_len(payload.len())];
            let n = emit(&h, &payload, &KEY, &mut buf).unwrap();
            let (h2, p2) = parse(&buf[..n]).unwrap();
            prop_assert_eq!(h, h2);
            prop_assert_eq!(p2, &payload[..]);
            prop_assert!(verify(&KEY, &buf[..n]).is_ok());
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if let Ok((h, p)) = parse(&data) {
                prop_assert_eq!(p.len(), h.payload_len as usize);
            }
            let _ = verify(&KEY, &data);
        }

        /// A batch sealed at once carries the same tags as one-by-one
        /// `emit`; batch verification accepts exactly the untouched ones
        /// (one tampered or truncated datagram fails only itself).
        #[test]
        fn batch_seal_and_verify_match_single(
            n in 1usize..20, len in 0usize..1500, tamper in any::<prop::sample::Index>(),
            cut in any::<bool>(), seed: u8,
        ) {
            let mut single = Vec::new();
            let mut batch = Vec::new();
            for i in 0..n {
                let payload: Vec<u8> = (0..len).map(|k| seed.wrapping_add((k + i) as u8)).collect();
                let h = Header { kind: Kind::Symbol, session: 9, seq: i as u32, block: 1, esi: i as u32, payload_len: len as u16 };
                let mut a = vec![0u8; datagram_len(len)];
                emit(&h, &payload, &KEY, &mut a).unwrap();
                let mut b = vec![0u8; datagram_len(len)];
                emit_body(&h, &payload, &mut b).unwrap();
                single.push(a);
                batch.push(b);
            }
            {
                let mut refs: Vec<&mut [u8]> = batch.iter_mut().map(|b| b.as_mut_slice()).collect();
                seal_many(&KEY, &mut refs);
            }
            prop_assert_eq!(&single, &batch);
            let bad = tamper.index(n);
            if cut {
                batch[bad].truncate(OVERHEAD - 1);
            } else {
                let at = batch[bad].len() / 2;
                batch[bad][at] ^= 0x40;
            }
            let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
            let mut ok = vec![true; n];
            verify_many(&KEY, &refs, &mut ok);
            for (i, good) in ok.iter().enumerate() {
                prop_assert_eq!(*good, i != bad, "datagram {}", i);
                prop_assert_eq!(*good, verify(&KEY, &batch[i]).is_ok());
            }
        }

        #[test]
        fn any_flipped_bit_fails_auth(pos in 0usize..(24 + 64 + 16), bit in 0u8..8) {
            let (h, p) = sample();
            let mut buf = vec![0u8; datagram_len(p.len())];
            emit(&h, &p, &KEY, &mut buf).unwrap();
            buf[pos] ^= 1 << bit;
            let ok = parse(&buf).is_ok() && verify(&KEY, &buf).is_ok();
            prop_assert!(!ok);
        }
    }
}
