//! Control-plane messages of a wave session (TCP, one connection per
//! receiver): manifest and key out, feedback and verdicts back.
//!
//! Owns: the message set, its binary encoding (postcard inside a
//! length-delimited frame with a bounded size) and validation of what came
//! off the wire. Must not: do I/O (see `io::conn`).

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::image::manifest::Manifest;
use crate::wire::packet::KEY_LEN;

/// Spoken in `Hello`/`Welcome`; a mismatch closes the connection with a
/// clear error on both sides.
pub const PROTOCOL_VERSION: u16 = 5;
/// Longest receiver name.
pub const MAX_NAME: usize = 128;
/// Largest first frame (`Hello`) a sender accepts from a receiver it has
/// not admitted yet.
pub const HELLO_MAX_FRAME: usize = 1024;
/// Largest frame a sender accepts from an admitted receiver (a `Status`
/// with its gap bitmaps).
pub const RECEIVER_MAX_FRAME: usize = 4 << 20;
/// Largest frame accepted (64 MiB), refused before allocation. A manifest
/// costs ~34 bytes per block, so this bounds one image to ~1.9 TiB in 1 MiB
/// blocks; larger images use larger blocks.
pub const MAX_FRAME: usize = 64 << 20;

/// A receiver reports exactly which source symbols a block misses while
/// there are at most this many (beyond, it would need most of the block).
pub const MAX_GAP_SYMBOLS: u32 = 512;
/// Largest gap bitmap accepted (K'max = 56403 bits).
pub const MAX_GAP_BITMAP: usize = 56_403usize.div_ceil(8);
/// Most combinations one `Coded` message may announce.
pub const MAX_COMBOS: usize = 65_536;
/// Upper bound of symbols in one combination (and of a plan entry): bounds
/// the XOR work per datagram at both ends.
pub const MAX_COMBO: usize = 16;

/// Session parameters handed to a receiver once it said hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionParams {
    /// Random per wave: the data-plane header's `session`.
    pub session_id: u32,
    /// The multicast group and port to join.
    pub group: SocketAddrV4,
    /// The wave's packet-tag key.
    pub key: [u8; KEY_LEN],
    /// What the image is: size, block digests, zero blocks.
    pub manifest: Manifest,
    /// How often the receiver reports its state.
    pub feedback_ms: u32,
}

/// Aggregated receiver feedback. Blocks not listed in `missing` or
/// `partial` are complete (decoded, hash-checked, written) or being
/// written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Highest packet sequence number seen (valid packets only).
    pub seq_hi: u32,
    /// Any packet of this session seen yet.
    pub seen_any: bool,
    /// Valid packets received since joining.
    pub received: u64,
    /// Packets the sequence range says were sent since joining.
    pub expected: u64,
    /// Blocks decoded, checked and written (or being written).
    pub blocks_done: u32,
    /// Runs `(first, len)` of blocks with no symbol at all.
    pub missing: Vec<(u32, u32)>,
    /// `(block, symbols short)` for blocks with some symbols.
    pub partial: Vec<(u32, u32)>,
    /// For partial blocks missing at most [`MAX_GAP_SYMBOLS`] source
    /// symbols: which ones, as a bitmap over ESIs `0..K` (bit `e % 8` of
    /// byte `e / 8` set = missing). Lets the sender resend exactly those
    /// source symbols so the receiver never has to decode.
    pub source_gaps: Vec<(u32, Vec<u8>)>,
    /// Datagrams whose tag did not verify.
    pub auth_failures: u64,
    /// Datagrams that did not parse.
    pub malformed: u64,
    /// Blocks whose decode failed or whose hash did not match (retried).
    pub decode_failures: u64,
}

/// A receiver's last word on the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The written image hashes to this (the manifest's) BLAKE3.
    Verified {
        /// The BLAKE3 of what was written.
        image_hash: [u8; 32],
    },
    /// The image could not be written or verified.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A wave-session message, either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    // receiver -> sender
    /// The receiver's first message.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol: u16,
        /// The receiver's name (the device id in appliance waves).
        name: String,
        /// The device's credential (appliance waves admit a member only
        /// with it; a lab `rackcast send` admits anyone).
        credential: Option<[u8; 32]>,
        /// A relay on another segment (no multicast routing between):
        /// send a unicast copy of every datagram to this UDP port at the
        /// address this connection comes from. A sender grants it to
        /// relays only (an appliance wave: members it names as relays),
        /// and to a few at most.
        relay_port: Option<u16>,
    },
    /// Joined the group; `resumed_blocks` were already on disk.
    Ready {
        /// Blocks found verified on the output at start.
        resumed_blocks: u32,
    },
    /// The receiver's periodic report.
    Status(Status),
    /// The receiver's verdict; the session ends.
    Done(Verdict),
    // sender -> receiver
    /// The answer to `Hello`: the session.
    Welcome {
        /// [`PROTOCOL_VERSION`].
        protocol: u16,
        /// The receiver's id in the sender.
        receiver_id: u32,
        /// Group, key and manifest.
        session: SessionParams,
    },
    /// Coded resends of `block` about to be sent: combination `first + i`
    /// is the XOR of source symbols `combos[i]` (2 to
    /// [`MAX_COMBO`] ESIs). The datagrams carry
    /// the id in place of an ESI.
    Coded {
        /// The block.
        block: u32,
        /// The id of the first combination.
        first: u32,
        /// Source ESIs of each combination.
        combos: Vec<Vec<u32>>,
    },
    /// The sender ends the session (all done, or giving up on this receiver).
    Finish {
        /// Why.
        reason: String,
    },
    // either way
    /// Something is wrong; the connection closes.
    Error {
        /// What.
        message: String,
    },
}

/// Why a wave-control frame was refused.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Does not decode.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error("protocol version {got} not supported (this side speaks {PROTOCOL_VERSION})")]
    Version {
        /// The version the peer speaks.
        got: u16,
    },
    /// Decodes, but the session or a field is out of bounds.
    #[error("invalid session parameters: {0}")]
    Invalid(String),
    /// Longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversize(usize),
}

/// Decode and check a frame (lengths, counts, the manifest's sums).
pub fn parse(frame: &[u8]) -> Result<Msg, ControlError> {
    if frame.len() > MAX_FRAME {
        return Err(ControlError::Oversize(frame.len()));
    }
    let msg: Msg =
        postcard::from_bytes(frame).map_err(|e| ControlError::Malformed(e.to_string()))?;
    match &msg {
        Msg::Hello { protocol, .. } | Msg::Welcome { protocol, .. }
            if *protocol != PROTOCOL_VERSION =>
        {
            return Err(ControlError::Version { got: *protocol });
        }
        Msg::Hello { name, .. } if name.is_empty() || name.len() > MAX_NAME => {
            return Err(ControlError::Invalid(format!(
                "receiver name of {} bytes (1 to {MAX_NAME})",
                name.len()
            )));
        }
        Msg::Hello {
            relay_port: Some(0),
            ..
        } => {
            return Err(ControlError::Invalid("relay port 0".into()));
        }
        Msg::Welcome { session, .. } => {
            session
                .manifest
                .validate()
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
            if !crate::is_lab_or_admin_group(*session.group.ip()) {
                return Err(ControlError::Invalid(format!(
                    "group {} is outside 239.0.0.0/8",
                    session.group
                )));
            }
        }
        Msg::Status(s) => check_status(s)?,
        Msg::Coded { first, combos, .. } => check_coded(*first, combos)?,
        _ => {}
    }
    Ok(msg)
}

/// Ids must stay within the packet's 24-bit ESI field; every combination
/// names 2..=MAX_COMBO distinct symbols (a receiver XORs at most that many).
fn check_coded(first: u32, combos: &[Vec<u32>]) -> Result<(), ControlError> {
    use crate::wire::packet::MAX_ESI;
    if combos.is_empty() || combos.len() > MAX_COMBOS {
        return Err(ControlError::Invalid("coded plan empty or too long".into()));
    }
    if first as u64 + combos.len() as u64 - 1 > MAX_ESI as u64 {
        return Err(ControlError::Invalid("coded ids beyond 24 bits".into()));
    }
    for c in combos {
        if c.len() < 2 || c.len() > MAX_COMBO {
            return Err(ControlError::Invalid(format!(
                "combination of {} symbols",
                c.len()
            )));
        }
        if c.iter().any(|e| *e > MAX_ESI) {
            return Err(ControlError::Invalid("ESI beyond 24 bits".into()));
        }
        for (i, e) in c.iter().enumerate() {
            if c[..i].contains(e) {
                return Err(ControlError::Invalid(
                    "symbol twice in a combination".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Block lists must be strictly ascending and non-overlapping (as the
/// receiver builds them), so handling a report costs at most one pass over
/// the image's blocks, whatever a peer sends.
fn check_status(s: &Status) -> Result<(), ControlError> {
    let mut next = 0u64;
    for &(first, len) in &s.missing {
        if len == 0 || (first as u64) < next {
            return Err(ControlError::Invalid(
                "missing-block runs not ascending".into(),
            ));
        }
        next = first as u64 + len as u64;
    }
    let mut prev: Option<u32> = None;
    for &(b, _) in &s.partial {
        if prev.is_some_and(|p| b <= p) {
            return Err(ControlError::Invalid("partial blocks not ascending".into()));
        }
        prev = Some(b);
    }
    let mut prev: Option<u32> = None;
    for (b, bits) in &s.source_gaps {
        if prev.is_some_and(|p| *b <= p) {
            return Err(ControlError::Invalid(
                "source-gap blocks not ascending".into(),
            ));
        }
        prev = Some(*b);
        if bits.is_empty() || bits.len() > MAX_GAP_BITMAP {
            return Err(ControlError::Invalid(
                "source-gap bitmap empty or too long".into(),
            ));
        }
    }
    Ok(())
}

/// Encode for a frame.
pub fn emit(msg: &Msg) -> Result<Vec<u8>, ControlError> {
    let v = postcard::to_stdvec(msg).map_err(|e| ControlError::Malformed(e.to_string()))?;
    if v.len() > MAX_FRAME {
        return Err(ControlError::Oversize(v.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::BlockInfo;
    use proptest::prelude::*;

    fn welcome() -> Msg {
        Msg::Welcome {
            protocol: PROTOCOL_VERSION,
            receiver_id: 3,
            session: SessionParams {
                session_id: 9,
                group: "239.255.1.1:9000".parse().unwrap(),
                key: [1; 32],
                manifest: Manifest {
                    image_size: 5000,
                    image_hash: crate::image::manifest::merge_block_digests(&[[3; 32]; 2]),
                    block_size: 4096,
                    symbol_size: 1024,
                    blocks: vec![
                        BlockInfo {
                            hash: [3; 32],
                            zero: false,
                            wire: crate::image::manifest::Wire::Raw,
                        };
                        2
                    ],
                },
                feedback_ms: 50,
            },
        }
    }

    #[test]
    fn round_trip_and_version_check() {
        let m = welcome();
        assert_eq!(parse(&emit(&m).unwrap()).unwrap(), m);
        let bad = Msg::Hello {
            protocol: 99,
            name: "x".into(),
            credential: None,
            relay_port: None,
        };
        assert!(matches!(
            parse(&emit(&bad).unwrap()),
            Err(ControlError::Version { got: 99 })
        ));
    }

    #[test]
    fn welcome_with_broken_manifest_is_refused() {
        let mut m = welcome();
        if let Msg::Welcome { session, .. } = &mut m {
            session.manifest.blocks.pop();
        }
        assert!(matches!(
            parse(&emit(&m).unwrap()),
            Err(ControlError::Invalid(_))
        ));
        let mut m = welcome();
        if let Msg::Welcome { session, .. } = &mut m {
            session.group = "198.18.0.9:9".parse().unwrap();
        }
        assert!(matches!(
            parse(&emit(&m).unwrap()),
            Err(ControlError::Invalid(_))
        ));
    }

    #[test]
    fn unordered_status_lists_are_refused() {
        let st = |missing: Vec<(u32, u32)>, partial: Vec<(u32, u32)>| {
            parse(
                &emit(&Msg::Status(Status {
                    missing,
                    partial,
                    ..Default::default()
                }))
                .unwrap(),
            )
        };
        assert!(st(vec![(0, 5), (5, 2)], vec![(9, 1), (10, 1)]).is_ok());
        assert!(st(vec![(0, 5), (4, 2)], vec![]).is_err());
        assert!(st(vec![(3, 0)], vec![]).is_err());
        assert!(st(vec![], vec![(9, 1), (9, 1)]).is_err());
        let gaps = |g: Vec<(u32, Vec<u8>)>| {
            parse(
                &emit(&Msg::Status(Status {
                    source_gaps: g,
                    ..Default::default()
                }))
                .unwrap(),
            )
        };
        assert!(gaps(vec![(1, vec![0b1000_1000]), (2, vec![1, 0])]).is_ok());
        assert!(gaps(vec![(2, vec![1]), (1, vec![1])]).is_err());
        assert!(gaps(vec![(1, vec![])]).is_err());
        assert!(gaps(vec![(1, vec![0xff; MAX_GAP_BITMAP + 1])]).is_err());
    }

    #[test]
    fn truncations_are_errors() {
        let bytes = emit(&welcome()).unwrap();
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_err());
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&data);
        }

        #[test]
        fn status_round_trip(seq: u32, received: u64, done: u32,
                             starts in proptest::collection::btree_set(0u32..1_000_000, 0..20),
                             blocks in proptest::collection::btree_set(any::<u32>(), 0..20)) {
            let missing: Vec<(u32, u32)> = starts.iter().map(|s| (s * 4, 3)).collect();
            let partial: Vec<(u32, u32)> = blocks.iter().map(|b| (*b, 5)).collect();
            let m = Msg::Status(Status { seq_hi: seq, seen_any: true, received, expected: received,
                blocks_done: done, missing, partial, source_gaps: vec![(3, vec![1, 9])], auth_failures: 1, malformed: 2, decode_failures: 3 });
            prop_assert_eq!(parse(&emit(&m).unwrap()).unwrap(), m);
        }
    }
}
