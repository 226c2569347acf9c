//! The receiver core: validates datagrams, collects symbols per block,
//! decides when a block can be decoded, and says what is still missing.
//!
//! Owns: the per-block state (empty, collecting, decoding, done), packet
//! validation order (header, session, tag, block range, symbol length),
//! loss accounting from sequence numbers and the aggregated [`Status`].
//! Must not: touch sockets, files or clocks. Decoding and BLAKE3 checking of
//! a block are pure functions here ([`decode_block`]); writing is the
//! driver's (`io::receive`).

use std::collections::{BTreeMap, VecDeque};

use crate::image::fec::{Added, BlockAssembly};
use crate::image::manifest::{Manifest, Wire};
use crate::image::packed::{unpack, UnpackError};
use crate::wire::control::{Status, MAX_GAP_SYMBOLS};
use crate::wire::packet::{self, Header, Kind, PacketError, KEY_LEN};

/// Why a datagram was dropped (each has a counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Did not parse.
    Malformed(PacketError),
    /// Another wave's session id.
    WrongSession,
    /// The keyed tag did not verify.
    BadTag,
    /// Block number outside the manifest, or a zero block.
    BadBlock,
    /// A payload that is not the session's symbol size.
    BadLength,
    /// A symbol the block already has.
    Duplicate,
    /// Symbol of a block already complete.
    Late,
    /// Coded datagram with more than one symbol missing here (or its
    /// plan never came): cannot be solved.
    CodedUnusable,
    /// A first symbol of a block while the window of blocks being
    /// assembled is full: the block stays missing and is asked for again.
    Window,
}

/// What the receiver saw, for its report and the sender's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams handed to the core.
    pub packets: u64,
    /// Symbols taken (new to their block).
    pub symbols: u64,
    /// Probes.
    pub probes: u64,
    /// Dropped: did not parse.
    pub malformed: u64,
    /// Dropped: another session.
    pub wrong_session: u64,
    /// Dropped: bad tag.
    pub auth_failures: u64,
    /// Dropped: block outside the image, or a zero block.
    pub bad_block: u64,
    /// Dropped: wrong payload length.
    pub bad_length: u64,
    /// Symbols the block already had.
    pub duplicates: u64,
    /// Symbols of finished blocks.
    pub late: u64,
    /// Coded datagrams that gave a missing symbol.
    pub coded: u64,
    /// Coded datagrams that could not be solved here.
    pub coded_unusable: u64,
    /// Decodes that needed more symbols.
    pub decode_retries: u64,
    /// Decoded blocks whose digest did not match (asked for again).
    pub hash_failures: u64,
    /// First symbols of blocks dropped while the assembly window was full.
    pub window_full: u64,
}

enum Slot {
    Empty,
    Collecting { asm: BlockAssembly, min_count: u32 },
    Decoding,
    Done,
}

/// A block ready to be decoded, handed to a worker.
pub struct DecodeJob {
    /// The block.
    pub block: u32,
    /// Its symbols.
    pub asm: BlockAssembly,
}

/// Outcome of [`decode_block`].
pub enum DecodeOutcome {
    /// Decoded (and decompressed) and its digest
    /// (`manifest::block_digest`) matches the manifest; the digest goes
    /// into the whole-image hash.
    Good {
        /// The block's bytes.
        data: Vec<u8>,
        /// Their digest.
        digest: [u8; 32],
    },
    /// raptorq needs more symbols; the assembly comes back.
    NeedMore(BlockAssembly),
    /// Decoded but the frame's or the block's digest is wrong: the
    /// symbols were bad (a wrong key cannot get here; a broken sender or
    /// image source can). Asking for the block again may fix it.
    HashMismatch,
    /// The wire bytes are the manifest's own, yet they do not give the
    /// block (a frame that expands past the block, or to other bytes):
    /// the manifest is wrong and no resend can help.
    Undecodable(String),
}

/// Decode a ready block, decompress it when it travels compressed, and
/// check it against the manifest. Runs on any thread: it is where the
/// receiver spends its CPU.
pub fn decode_block(manifest: &Manifest, job: DecodeJob) -> DecodeOutcome {
    decode_block_keeping(manifest, job, false).0
}

/// [`decode_block`], and with `keep_frame` the checked compressed frame
/// of a good block that travels compressed: a relay sends its own wave
/// the wire bytes it received, never compressing again.
pub fn decode_block_keeping(
    manifest: &Manifest,
    job: DecodeJob,
    keep_frame: bool,
) -> (DecodeOutcome, Option<Vec<u8>>) {
    let b = job.block;
    let wire = match job.asm.decode(&manifest.block_oti(b), manifest.wire_len(b)) {
        Ok(wire) => wire,
        Err(asm) => return (DecodeOutcome::NeedMore(asm), None),
    };
    let compressed = matches!(manifest.blocks[b as usize].wire, Wire::Zstd { .. });
    let frame = (keep_frame && compressed).then(|| wire.clone());
    let data = match unpack(manifest, b, wire) {
        Ok(d) => d,
        Err(UnpackError::FrameDigest(_)) => return (DecodeOutcome::HashMismatch, None),
        Err(e @ UnpackError::BadFrame { .. }) => {
            return (DecodeOutcome::Undecodable(e.to_string()), None)
        }
    };
    let digest = manifest.digest_block(b, &data);
    if digest == manifest.blocks[b as usize].hash {
        (DecodeOutcome::Good { data, digest }, frame)
    } else if compressed {
        // The frame matched its digest, so these are the manifest's own
        // bytes: they decompress to something else for every receiver.
        (
            DecodeOutcome::Undecodable(format!(
                "block {b}: its compressed frame decompresses to bytes that fail the block's digest"
            )),
            None,
        )
    } else {
        (DecodeOutcome::HashMismatch, None)
    }
}

/// Coded datagrams kept while their plan is on its way (~1.5 MB).
const MAX_UNPLANNED: usize = 1024;
/// Announced combinations kept at once.
const MAX_PLANS: usize = 1 << 16;
/// Block buffers kept for reuse.
const MAX_SPARE: usize = 8;
/// Bytes of blocks being assembled at once: whatever arrives (a sender
/// far ahead, a compromised member's tagged junk), a receiver's memory for
/// partial blocks stays under this; blocks past it stay missing and are
/// asked for again.
pub const ASSEMBLY_WINDOW_BYTES: u64 = 256 << 20;
/// The window in blocks, whatever the block size.
const MIN_WINDOW_BLOCKS: usize = 64;

/// The receiver core: datagrams in, assembled blocks (decode jobs) and
/// status reports out; no sockets, no clock of its own.
pub struct ReceiverCore {
    manifest: Manifest,
    /// Announced combinations by (block, id).
    plans: BTreeMap<(u32, u32), Vec<u32>>,
    /// Coded datagrams that arrived before their plan: (block, id, payload).
    unplanned: VecDeque<(u32, u32, Vec<u8>)>,
    /// Buffers of written blocks, for the next blocks' assemblies: a fresh
    /// 1 MiB buffer per block would be zeroed each time.
    spare: Vec<Vec<u8>>,
    session: u32,
    key: [u8; KEY_LEN],
    slots: Vec<Slot>,
    /// Slots in `Collecting` (the assembly window's use).
    collecting: usize,
    /// Most slots in `Collecting` at once.
    window: usize,
    done: u32,
    first_seq: Option<u32>,
    seq_hi: u32,
    valid: u64,
    /// What it saw so far.
    pub counters: Counters,
}

impl ReceiverCore {
    /// A receiver of `manifest`'s image in session `session`, tags under
    /// `key`.
    pub fn new(manifest: Manifest, session: u32, key: [u8; KEY_LEN]) -> ReceiverCore {
        let n = manifest.block_count() as usize;
        let block = u64::from(manifest.block_size.max(1));
        let window = usize::try_from(ASSEMBLY_WINDOW_BYTES / block)
            .unwrap_or(usize::MAX)
            .max(MIN_WINDOW_BLOCKS);
        ReceiverCore {
            slots: (0..n).map(|_| Slot::Empty).collect(),
            collecting: 0,
            window,
            plans: BTreeMap::new(),
            unplanned: VecDeque::new(),
            spare: Vec::new(),
            manifest,
            session,
            key,
            done: 0,
            first_seq: None,
            seq_hi: 0,
            valid: 0,
            counters: Counters::default(),
        }
    }

    /// At most `blocks` blocks assembled at once (tests; the default is
    /// [`ASSEMBLY_WINDOW_BYTES`] worth).
    pub fn with_window(mut self, blocks: usize) -> ReceiverCore {
        self.window = blocks.max(1);
        self
    }

    /// Blocks being assembled now.
    pub fn assembling(&self) -> usize {
        self.collecting
    }

    /// The image it receives.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Blocks written (or on the output from the start).
    pub fn blocks_done(&self) -> u32 {
        self.done
    }

    /// Every block done.
    pub fn is_complete(&self) -> bool {
        self.done == self.manifest.block_count()
    }

    /// Whether block `b` is done.
    pub fn is_done(&self, b: u32) -> bool {
        matches!(self.slots.get(b as usize), Some(Slot::Done))
    }

    /// Block already on disk (resume bitmap, or a zero block written).
    pub fn mark_done(&mut self, b: u32) {
        if let Some(s) = self.slots.get_mut(b as usize) {
            if !matches!(s, Slot::Done) {
                if matches!(s, Slot::Collecting { .. }) {
                    self.collecting -= 1;
                }
                *s = Slot::Done;
                self.done += 1;
            }
        }
    }

    /// Take one datagram. Returns a block ready for decoding, if this
    /// symbol completed one.
    pub fn on_datagram(&mut self, data: &[u8]) -> Result<Option<DecodeJob>, Drop> {
        let r = self.check_unauthenticated(data).and_then(|(h, payload)| {
            packet::verify(&self.key, data).map_err(|_| Drop::BadTag)?;
            self.accept(h, payload)
        });
        self.count(&r);
        r
    }

    /// Take a batch of datagrams (one `recvmmsg`); blocks they completed
    /// are pushed to `jobs`. Same checks and counters as [`Self::on_datagram`],
    /// but the tags of the batch are verified together (in SIMD lanes).
    pub fn on_datagrams(&mut self, batch: &[&[u8]], jobs: &mut Vec<DecodeJob>) {
        const GROUP: usize = 16;
        for group in batch.chunks(GROUP) {
            let mut checked: [Option<(Header, &[u8])>; GROUP] = [None; GROUP];
            let mut cand: [&[u8]; GROUP] = [&[]; GROUP];
            let mut at = [0usize; GROUP];
            let mut n = 0;
            for (i, d) in group.iter().enumerate() {
                match self.check_unauthenticated(d) {
                    Ok(hp) => {
                        checked[i] = Some(hp);
                        cand[n] = d;
                        at[n] = i;
                        n += 1;
                    }
                    Err(e) => self.count(&Err(e)),
                }
            }
            let mut ok = [false; GROUP];
            packet::verify_many(&self.key, &cand[..n], &mut ok[..n]);
            for k in 0..n {
                let Some((h, payload)) = checked[at[k]] else {
                    continue;
                };
                let r = if ok[k] {
                    self.accept(h, payload)
                } else {
                    Err(Drop::BadTag)
                };
                self.count(&r);
                if let Ok(Some(job)) = r {
                    jobs.push(job);
                }
            }
        }
    }

    fn count(&mut self, r: &Result<Option<DecodeJob>, Drop>) {
        self.counters.packets += 1;
        match r {
            Err(Drop::Malformed(_)) => self.counters.malformed += 1,
            Err(Drop::WrongSession) => self.counters.wrong_session += 1,
            Err(Drop::BadTag) => self.counters.auth_failures += 1,
            Err(Drop::BadBlock) => self.counters.bad_block += 1,
            Err(Drop::BadLength) => self.counters.bad_length += 1,
            Err(Drop::Duplicate) => self.counters.duplicates += 1,
            Err(Drop::Late) => self.counters.late += 1,
            Err(Drop::CodedUnusable) => self.counters.coded_unusable += 1,
            Err(Drop::Window) => self.counters.window_full += 1,
            Ok(_) => {}
        }
    }

    /// The checks that cost nothing and run before the tag: header layout
    /// and session id.
    fn check_unauthenticated<'a>(&self, data: &'a [u8]) -> Result<(Header, &'a [u8]), Drop> {
        let (h, payload) = packet::parse(data).map_err(Drop::Malformed)?;
        if h.session != self.session {
            return Err(Drop::WrongSession);
        }
        Ok((h, payload))
    }

    /// An authentic datagram (its tag checked).
    fn accept(&mut self, h: Header, payload: &[u8]) -> Result<Option<DecodeJob>, Drop> {
        // Authentic from here on: account its sequence number.
        self.valid += 1;
        match self.first_seq {
            None => {
                self.first_seq = Some(h.seq);
                self.seq_hi = h.seq;
            }
            Some(_) => {
                if crate::wire::packet::seq_ge(h.seq, self.seq_hi) {
                    self.seq_hi = h.seq;
                }
            }
        }
        if h.kind == Kind::Probe {
            self.counters.probes += 1;
            return Ok(None);
        }
        let b = h.block as usize;
        if b >= self.slots.len() || self.manifest.blocks[b].zero {
            return Err(Drop::BadBlock);
        }
        if payload.len() != self.manifest.symbol_size as usize {
            return Err(Drop::BadLength);
        }
        if h.kind == Kind::Coded {
            return self.on_coded(h.block, h.esi, payload);
        }
        self.add_symbol(h.block, h.esi, payload)
    }

    /// Add one symbol of block `b` (in range, not a zero block).
    fn add_symbol(&mut self, b: u32, esi: u32, payload: &[u8]) -> Result<Option<DecodeJob>, Drop> {
        let k = self.manifest.source_symbols(b);
        let slot = &mut self.slots[b as usize];
        if let Slot::Empty = slot {
            if self.collecting >= self.window {
                return Err(Drop::Window);
            }
            self.collecting += 1;
            *slot = Slot::Collecting {
                asm: BlockAssembly::with_buffer(
                    k,
                    self.manifest.symbol_size,
                    self.spare.pop().unwrap_or_default(),
                ),
                min_count: k,
            };
        }
        match slot {
            Slot::Done | Slot::Decoding => Err(Drop::Late),
            Slot::Empty => Ok(None),
            Slot::Collecting { asm, min_count } => match asm.add(esi, payload) {
                Added::BadLength => Err(Drop::BadLength),
                Added::Duplicate => Err(Drop::Duplicate),
                Added::New => {
                    self.counters.symbols += 1;
                    if asm.count() >= *min_count {
                        self.collecting -= 1;
                        let taken = std::mem::replace(slot, Slot::Decoding);
                        if let Slot::Collecting { asm, .. } = taken {
                            self.forget_plans(b);
                            return Ok(Some(DecodeJob { block: b, asm }));
                        }
                    }
                    Ok(None)
                }
            },
        }
    }

    /// A coded datagram: XOR of the symbols of combination `id` of block
    /// `b`. Usable when exactly one of them is missing here.
    fn on_coded(&mut self, b: u32, id: u32, payload: &[u8]) -> Result<Option<DecodeJob>, Drop> {
        let asm = match &self.slots[b as usize] {
            Slot::Done | Slot::Decoding => return Err(Drop::Late),
            // Nothing of the block here: every symbol of it is unknown.
            Slot::Empty => return Err(Drop::CodedUnusable),
            Slot::Collecting { asm, .. } => asm,
        };
        let Some(esis) = self.plans.get(&(b, id)) else {
            // Its plan (TCP) may still be on the way.
            if self.unplanned.len() >= MAX_UNPLANNED {
                self.unplanned.pop_front();
                self.counters.coded_unusable += 1;
            }
            self.unplanned.push_back((b, id, payload.to_vec()));
            return Ok(None);
        };
        let mut unknown = esis.iter().filter(|e| !asm.has_source(**e));
        let (Some(&target), None) = (unknown.next(), unknown.next()) else {
            let none_missing = esis.iter().all(|e| asm.has_source(*e));
            self.plans.remove(&(b, id));
            return Err(if none_missing {
                Drop::Duplicate
            } else {
                Drop::CodedUnusable
            });
        };
        let mut sym = payload.to_vec();
        for e in esis {
            if let Some(s) = asm.source(*e) {
                super::coding::xor_into(&mut sym, s);
            }
        }
        self.plans.remove(&(b, id));
        self.counters.coded += 1;
        self.add_symbol(b, target, &sym)
    }

    /// Combinations `first..` of block `b`, announced by the sender before
    /// their datagrams. Datagrams that came first are used now; completed
    /// blocks go to `jobs`.
    pub fn on_coded_plan(
        &mut self,
        b: u32,
        first: u32,
        combos: Vec<Vec<u32>>,
        jobs: &mut Vec<DecodeJob>,
    ) {
        let k = match self.slots.get(b as usize) {
            Some(Slot::Collecting { .. } | Slot::Empty)
                if !self.manifest.blocks[b as usize].zero =>
            {
                self.manifest.source_symbols(b)
            }
            _ => return,
        };
        for (i, c) in combos.into_iter().enumerate() {
            if self.plans.len() >= MAX_PLANS {
                break;
            }
            if c.iter().all(|e| *e < k) {
                self.plans.insert((b, first.wrapping_add(i as u32)), c);
            }
        }
        let waiting: Vec<(u32, u32, Vec<u8>)> = self
            .unplanned
            .iter()
            .filter(|(ub, id, _)| *ub == b && self.plans.contains_key(&(b, *id)))
            .cloned()
            .collect();
        if waiting.is_empty() {
            return;
        }
        self.unplanned
            .retain(|(ub, id, _)| !(*ub == b && self.plans.contains_key(&(b, *id))));
        for (_, id, payload) in waiting {
            let r = self.on_coded(b, id, &payload);
            match &r {
                Err(Drop::Duplicate) => self.counters.duplicates += 1,
                Err(Drop::CodedUnusable) => self.counters.coded_unusable += 1,
                Err(Drop::Late) => self.counters.late += 1,
                _ => {}
            }
            if let Ok(Some(job)) = r {
                jobs.push(job);
            }
        }
    }

    fn forget_plans(&mut self, b: u32) {
        let ids: Vec<(u32, u32)> = self
            .plans
            .range((b, 0)..=(b, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in ids {
            self.plans.remove(&k);
        }
        self.unplanned.retain(|(ub, _, _)| *ub != b);
    }

    /// A written block's buffer, to be reused (a few are kept).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(buf);
        }
    }

    /// Result of a decode job for `block`.
    pub fn on_decoded(&mut self, block: u32, outcome: Result<(), Option<BlockAssembly>>) {
        let Some(slot) = self.slots.get_mut(block as usize) else {
            return;
        };
        match outcome {
            Ok(()) => {
                if !matches!(slot, Slot::Done) {
                    if matches!(slot, Slot::Collecting { .. }) {
                        self.collecting -= 1;
                    }
                    *slot = Slot::Done;
                    self.done += 1;
                }
            }
            Err(Some(asm)) => {
                self.counters.decode_retries += 1;
                let min_count = asm.count() + 1;
                if matches!(slot, Slot::Decoding) {
                    // Back in the window it left (may briefly exceed it:
                    // its symbols are kept, not dropped).
                    self.collecting += 1;
                    *slot = Slot::Collecting { asm, min_count };
                }
            }
            Err(None) => {
                self.counters.hash_failures += 1;
                if matches!(slot, Slot::Collecting { .. }) {
                    self.collecting -= 1;
                }
                *slot = Slot::Empty;
            }
        }
    }

    /// Feedback for the sender (see [`Status`]).
    pub fn status(&self) -> Status {
        let mut missing: Vec<(u32, u32)> = Vec::new();
        let mut partial = Vec::new();
        let mut source_gaps = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let b = i as u32;
            match s {
                Slot::Empty if !self.manifest.blocks[i].zero => match missing.last_mut() {
                    Some((first, len)) if *first + *len == b => *len += 1,
                    _ => missing.push((b, 1)),
                },
                Slot::Collecting { asm, min_count } => {
                    let short = min_count.saturating_sub(asm.count()).max(1);
                    partial.push((b, short));
                    if let Some(g) = asm.missing_source(MAX_GAP_SYMBOLS) {
                        source_gaps.push((b, g));
                    }
                }
                _ => {}
            }
        }
        let expected = match self.first_seq {
            Some(f) => self.seq_hi.wrapping_sub(f) as u64 + 1,
            None => 0,
        };
        Status {
            seq_hi: self.seq_hi,
            seen_any: self.first_seq.is_some(),
            received: self.valid,
            expected,
            blocks_done: self.done,
            missing,
            partial,
            source_gaps,
            auth_failures: self.counters.auth_failures,
            malformed: self.counters.malformed + self.counters.bad_block + self.counters.bad_length,
            decode_failures: self.counters.decode_retries + self.counters.hash_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fec::{source_symbol, BlockEncoder};
    use crate::wire::packet::{datagram_len, emit, Header};
    use rand::{Rng, SeedableRng};

    const KEY: [u8; 32] = [5; 32];

    fn image(n_blocks: usize, bs: usize, seed: u64) -> (Vec<u8>, Manifest) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut data: Vec<u8> = (0..n_blocks * bs - 100).map(|_| rng.random()).collect();
        // Block 1 all zero.
        data[bs..2 * bs].fill(0);
        let m = Manifest::of_bytes(&data, bs as u32, 512).unwrap();
        (data, m)
    }

    fn pkt(
        seq: u32,
        block: u32,
        esi: u32,
        payload: &[u8],
        key: &[u8; 32],
        session: u32,
    ) -> Vec<u8> {
        let h = Header {
            kind: Kind::Symbol,
            session,
            seq,
            block,
            esi,
            payload_len: payload.len() as u16,
        };
        let mut buf = vec![0u8; datagram_len(payload.len())];
        emit(&h, payload, key, &mut buf).unwrap();
        buf
    }

    /// A seeded loss sweep through the whole receiver core with a simple
    /// repair loop driven by its own status reports: no sockets, no sleeps.
    #[test]
    fn loss_sweep_reassembles_image() {
        for (i, loss) in [0.0, 0.05, 0.2, 0.3].iter().enumerate() {
            let (data, m) = image(4, 8192, i as u64);
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
            let mut rx = ReceiverCore::new(m.clone(), 7, KEY);
            rx.mark_done(1);
            let mut out = vec![0u8; data.len()];
            let mut seq = 0;
            let mut next_esi: Vec<u32> = (0..4).map(|b| m.source_symbols(b)).collect();
            let mut deliver = |rx: &mut ReceiverCore,
                               b: u32,
                               esi: u32,
                               sym: &[u8],
                               seq: &mut u32,
                               out: &mut Vec<u8>| {
                let p = pkt(*seq, b, esi, sym, &KEY, 7);
                *seq += 1;
                if rng.random::<f64>() < *loss {
                    return;
                }
                if let Ok(Some(job)) = rx.on_datagram(&p) {
                    match decode_block(&m, job) {
                        DecodeOutcome::Good { data: d, .. } => {
                            let off = m.block_offset(b) as usize;
                            out[off..off + d.len()].copy_from_slice(&d);
                            rx.on_decoded(b, Ok(()));
                        }
                        DecodeOutcome::NeedMore(a) => rx.on_decoded(b, Err(Some(a))),
                        DecodeOutcome::HashMismatch => rx.on_decoded(b, Err(None)),
                        DecodeOutcome::Undecodable(why) => panic!("raw block: {why}"),
                    }
                }
            };
            let mut sym = vec![0u8; 512];
            for b in m.data_blocks() {
                let blk = &data[m.block_offset(b) as usize..][..m.block_len(b)];
                for esi in 0..m.source_symbols(b) {
                    source_symbol(blk, esi, &mut sym);
                    deliver(&mut rx, b, esi, &sym, &mut seq, &mut out);
                }
            }
            for _round in 0..40 {
                if rx.is_complete() {
                    break;
                }
                let st = rx.status();
                let mut needs: Vec<(u32, u32)> = st.partial.clone();
                for (f, l) in &st.missing {
                    for b in *f..f + l {
                        needs.push((b, m.source_symbols(b)));
                    }
                }
                for (b, short) in needs {
                    let blk = &data[m.block_offset(b) as usize..][..m.block_len(b)];
                    let enc = BlockEncoder::new(&m.block_oti(b), blk);
                    for s in enc.repair(next_esi[b as usize], short + 2) {
                        let e = next_esi[b as usize];
                        next_esi[b as usize] += 1;
                        deliver(&mut rx, b, e, &s, &mut seq, &mut out);
                    }
                }
            }
            assert!(rx.is_complete(), "loss {loss}: not complete");
            assert_eq!(out, data, "loss {loss}");
        }
    }

    /// Whatever arrives, at most `window` blocks are being assembled:
    /// the first symbol of one more is dropped and counted, the block
    /// stays missing in the status (asked for again), and a block that
    /// completes frees its place.
    #[test]
    fn blocks_in_assembly_are_bounded_by_the_window() {
        let (data, m) = image(6, 8192, 9);
        let mut rx = ReceiverCore::new(m.clone(), 7, KEY).with_window(2);
        let mut sym = vec![0u8; 512];
        let blocks: Vec<u32> = m.data_blocks().collect();
        assert!(blocks.len() >= 4);
        let mut seq = 0;
        let mut send = |rx: &mut ReceiverCore, b: u32, esi: u32| {
            let blk = &data[m.block_offset(b) as usize..][..m.block_len(b)];
            source_symbol(blk, esi, &mut sym);
            seq += 1;
            rx.on_datagram(&pkt(seq, b, esi, &sym, &KEY, 7))
        };
        // One symbol each of the first two blocks: the window is full.
        assert!(send(&mut rx, blocks[0], 0).is_ok());
        assert!(send(&mut rx, blocks[1], 0).is_ok());
        assert_eq!(rx.assembling(), 2);
        assert!(matches!(send(&mut rx, blocks[2], 0), Err(Drop::Window)));
        assert_eq!(rx.counters.window_full, 1);
        assert_eq!(rx.assembling(), 2);
        let st = rx.status();
        assert!(
            st.missing
                .iter()
                .any(|(f, l)| (*f..f + l).contains(&blocks[2])),
            "the dropped block is asked for again: {st:?}"
        );
        // Blocks already in the window keep taking symbols; the first one
        // completes, decodes and frees its place.
        let mut job = None;
        for esi in 1..m.source_symbols(blocks[0]) {
            if let Ok(Some(j)) = send(&mut rx, blocks[0], esi) {
                job = Some(j);
            }
        }
        let job = job.expect("block complete");
        assert_eq!(rx.assembling(), 1);
        match decode_block(&m, job) {
            DecodeOutcome::Good { .. } => rx.on_decoded(blocks[0], Ok(())),
            _ => panic!("a whole block of source symbols decodes"),
        }
        assert!(send(&mut rx, blocks[2], 0).is_ok(), "a place came free");
        assert_eq!(rx.assembling(), 2);
    }

    #[test]
    fn bad_packets_are_counted_not_used() {
        let (_, m) = image(3, 4096, 1);
        let mut rx = ReceiverCore::new(m, 7, KEY);
        let sym = vec![1u8; 512];
        assert_eq!(
            rx.on_datagram(&pkt(100, 0, 0, &sym, &[6; 32], 7)).err(),
            Some(Drop::BadTag)
        );
        assert_eq!(
            rx.on_datagram(&pkt(0, 0, 0, &sym, &KEY, 8)).err(),
            Some(Drop::WrongSession)
        );
        assert_eq!(
            rx.on_datagram(&pkt(0, 9, 0, &sym, &KEY, 7)).err(),
            Some(Drop::BadBlock)
        );
        assert_eq!(
            rx.on_datagram(&pkt(0, 1, 0, &sym, &KEY, 7)).err(),
            Some(Drop::BadBlock)
        );
        assert_eq!(
            rx.on_datagram(&pkt(0, 0, 0, &sym[..100], &KEY, 7)).err(),
            Some(Drop::BadLength)
        );
        assert!(matches!(
            rx.on_datagram(&[1, 2, 3]),
            Err(Drop::Malformed(_))
        ));
        assert_eq!(rx.on_datagram(&pkt(1, 0, 0, &sym, &KEY, 7)).err(), None);
        assert_eq!(
            rx.on_datagram(&pkt(2, 0, 0, &sym, &KEY, 7)).err(),
            Some(Drop::Duplicate)
        );
        let c = &rx.counters;
        assert_eq!(
            (
                c.auth_failures,
                c.wrong_session,
                c.bad_block,
                c.bad_length,
                c.malformed,
                c.duplicates
            ),
            (1, 1, 2, 1, 1, 1)
        );
        // The forged packet (seq 100) did not advance the sequence
        // accounting; the five authentic ones did.
        let st = rx.status();
        assert_eq!((st.seq_hi, st.received), (2, 5));
    }

    fn coded_pkt(
        seq: u32,
        block: u32,
        id: u32,
        esis: &[u32],
        data: &[u8],
        m: &Manifest,
    ) -> Vec<u8> {
        let t = m.symbol_size as usize;
        let blk = &data[m.block_offset(block) as usize..][..m.block_len(block)];
        let mut x = vec![0u8; t];
        let mut sym = vec![0u8; t];
        for e in esis {
            source_symbol(blk, *e, &mut sym);
            crate::dataplane::coding::xor_into(&mut x, &sym);
        }
        let h = Header {
            kind: Kind::Coded,
            session: 7,
            seq,
            block,
            esi: id,
            payload_len: t as u16,
        };
        let mut buf = vec![0u8; datagram_len(t)];
        emit(&h, &x, &KEY, &mut buf).unwrap();
        buf
    }

    /// Coded datagrams: one unknown is solved by XOR, whether the plan
    /// came before or after the datagram; two unknowns cannot be; none is
    /// a duplicate. The block then completes without RaptorQ and is exact.
    #[test]
    fn coded_resends_complete_a_block_without_decoding() {
        let (data, m) = image(3, 8192, 3);
        let k = m.source_symbols(0);
        let mut rx = ReceiverCore::new(m.clone(), 7, KEY);
        let blk = &data[..m.block_len(0)];
        let mut sym = vec![0u8; 512];
        let lost = [2u32, 5, 6];
        for esi in (0..k).filter(|e| !lost.contains(e)) {
            source_symbol(blk, esi, &mut sym);
            assert!(rx
                .on_datagram(&pkt(esi, 0, esi, &sym, &KEY, 7))
                .unwrap()
                .is_none());
        }
        let mut jobs = Vec::new();
        // Plan first: id 0 = 2 ^ 9 (9 is here: solves 2).
        rx.on_coded_plan(0, 0, vec![vec![2, 9], vec![5, 6], vec![1, 3]], &mut jobs);
        assert!(rx
            .on_datagram(&coded_pkt(100, 0, 0, &[2, 9], &data, &m))
            .unwrap()
            .is_none());
        assert_eq!(
            rx.on_datagram(&coded_pkt(101, 0, 1, &[5, 6], &data, &m))
                .err(),
            Some(Drop::CodedUnusable)
        );
        assert_eq!(
            rx.on_datagram(&coded_pkt(102, 0, 2, &[1, 3], &data, &m))
                .err(),
            Some(Drop::Duplicate)
        );
        // Datagram before its plan: kept, used when the plan arrives.
        let early = coded_pkt(103, 0, 3, &[5, 0], &data, &m);
        assert!(rx.on_datagram(&early).unwrap().is_none());
        rx.on_coded_plan(0, 3, vec![vec![5, 0]], &mut jobs);
        assert!(jobs.is_empty());
        // Last one plain: the block is complete, no repair symbol used.
        source_symbol(blk, 6, &mut sym);
        let job = rx
            .on_datagram(&pkt(104, 0, 6, &sym, &KEY, 7))
            .unwrap()
            .expect("complete");
        match decode_block(&m, job) {
            DecodeOutcome::Good { data: d, .. } => assert_eq!(d, blk),
            _ => panic!("block not good"),
        }
        let c = &rx.counters;
        assert_eq!((c.coded, c.coded_unusable, c.duplicates), (2, 1, 1));
    }

    #[test]
    fn corrupt_symbols_fail_the_hash_and_reset_the_block() {
        let (_, m) = image(3, 4096, 2);
        let mut rx = ReceiverCore::new(m.clone(), 7, KEY);
        let sym = vec![0xAAu8; 512];
        let mut job = None;
        for esi in 0..m.source_symbols(0) {
            if let Ok(Some(j)) = rx.on_datagram(&pkt(esi, 0, esi, &sym, &KEY, 7)) {
                job = Some(j);
            }
        }
        let job = job.expect("block ready");
        assert!(matches!(decode_block(&m, job), DecodeOutcome::HashMismatch));
        rx.on_decoded(0, Err(None));
        assert!(!rx.is_done(0));
        assert_eq!(rx.status().missing[0], (0, 1));
    }
}
