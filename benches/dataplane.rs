//! Data-plane micro-benchmarks: block encode, block decode at 0/5/20 %
//! loss, packetize + tag (one datagram at a time beside a 64-datagram batch
//! in SIMD lanes), a block's digest, and the receiver path per block
//! (parse, verify, assemble, decode, hash). Throughput is reported per
//! byte of image so the numbers read as GB/s; `receiver_path` at 1 GB of
//! image is `1 GB / throughput` seconds of one core. `sender_core` is the
//! sender core alone at a 10 Gbit/s wave with N receivers each reporting
//! every 20 ms (gaps of ~2 % of each block): the time per datagram,
//! reports included; one core carries a 10 Gbit/s wave if it is under
//! 1.2 µs (~830,000 datagrams/s).
//!
//! Baseline comparisons (`ratio` lines): `cargo bench --bench dataplane --
//! --save-baseline before` on one commit, `--baseline before` on the next;
//! criterion prints the change side by side.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, RngCore, SeedableRng};

use rackcast_core::dataplane::receiver::{decode_block, DecodeOutcome, ReceiverCore};
use rackcast_core::image::fec::{source_symbol, BlockAssembly, BlockEncoder};
use rackcast_core::image::manifest::{block_digest, BlockInfo, Manifest};
use rackcast_core::wire::packet::{datagram_len, emit, parse, verify, verify_many, Header, Kind};

const T: u16 = 1432;
const BLOCK: usize = 1 << 20;
const KEY: [u8; 32] = [3; 32];

fn block(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = vec![0u8; BLOCK];
    rng.fill_bytes(&mut b);
    b
}

fn manifest_for(data: &[u8]) -> Manifest {
    Manifest {
        image_size: data.len() as u64,
        image_hash: *blake3::hash(data).as_bytes(),
        block_size: BLOCK as u32,
        symbol_size: T,
        blocks: vec![BlockInfo {
            hash: *blake3::hash(data).as_bytes(),
            zero: false,
            wire: rackcast_core::image::manifest::Wire::Raw,
        }],
    }
}

/// Symbols a receiver holds after `loss` on the source round plus enough
/// repair to be decodable (K symbols in total).
fn assembly(data: &[u8], m: &Manifest, enc: &BlockEncoder, loss: f64, seed: u64) -> BlockAssembly {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let k = m.source_symbols(0);
    let mut asm = BlockAssembly::new(k, T);
    let mut sym = vec![0u8; T as usize];
    for esi in 0..k {
        if rng.random::<f64>() >= loss {
            source_symbol(data, esi, &mut sym);
            asm.add(esi, &sym);
        }
    }
    let short = asm.shortfall();
    for (i, s) in enc.repair(k, short).into_iter().enumerate() {
        asm.add(k + i as u32, &s);
    }
    asm
}

fn bench_encode(c: &mut Criterion) {
    let data = block(1);
    let m = manifest_for(&data);
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("block_1MiB_plus_40_repair", |b| {
        b.iter(|| {
            let e = BlockEncoder::new(&m.block_oti(0), black_box(&data));
            black_box(e.repair(e.source_symbols(), 40))
        })
    });
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let data = block(2);
    let m = manifest_for(&data);
    let enc = BlockEncoder::new(&m.block_oti(0), &data);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.sample_size(20);
    for loss in [0.0, 0.05, 0.20] {
        g.bench_with_input(
            BenchmarkId::new("block_1MiB", format!("{}pct", (loss * 100.0) as u32)),
            &loss,
            |b, &loss| {
                b.iter_batched(
                    || assembly(&data, &m, &enc, loss, 7),
                    |asm| match asm.decode(&m.block_oti(0), BLOCK) {
                        Ok(out) => black_box(out),
                        Err(_) => Vec::new(),
                    },
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

fn bench_packetize(c: &mut Criterion) {
    let payload = vec![9u8; T as usize];
    let mut buf = vec![0u8; datagram_len(payload.len())];
    let mut g = c.benchmark_group("packetize");
    g.throughput(Throughput::Bytes(T as u64));
    g.bench_function("emit_and_tag", |b| {
        let mut seq = 0u32;
        b.iter(|| {
            seq = seq.wrapping_add(1);
            let h = Header {
                kind: Kind::Symbol,
                session: 1,
                seq,
                block: 3,
                esi: seq & 0xffff,
                payload_len: T,
            };
            black_box(emit(&h, &payload, &KEY, &mut buf))
        })
    });
    g.bench_function("parse_and_verify", |b| {
        b.iter(|| {
            let ok = parse(black_box(&buf)).is_ok() && verify(&KEY, &buf).is_ok();
            black_box(ok)
        })
    });
    // Side by side with the line above: the same check for a 64-datagram
    // recvmmsg batch, tags in AVX2 lanes; throughput is per datagram.
    let batch: Vec<Vec<u8>> = (0..64u32)
        .map(|i| {
            let h = Header {
                kind: Kind::Symbol,
                session: 1,
                seq: i,
                block: 3,
                esi: i,
                payload_len: T,
            };
            let mut d = vec![0u8; datagram_len(T as usize)];
            let _ = emit(&h, &payload, &KEY, &mut d);
            d
        })
        .collect();
    let refs: Vec<&[u8]> = batch.iter().map(|d| d.as_slice()).collect();
    g.throughput(Throughput::Bytes(T as u64 * 64));
    g.bench_function("parse_and_verify_batch64", |b| {
        let mut ok = vec![false; 64];
        b.iter(|| {
            let parsed = refs.iter().filter(|d| parse(black_box(d)).is_ok()).count();
            verify_many(&KEY, &refs, &mut ok);
            black_box((parsed, ok.iter().all(|x| *x)))
        })
    });
    g.finish();
}

/// A block's digest (its subtree of the image hash), as the writer computes
/// it for every block before writing it: the per-byte floor of the
/// receiver's writer thread besides the write itself.
fn bench_digest(c: &mut Criterion) {
    let data = block(5);
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("block_1MiB", |b| {
        b.iter(|| black_box(block_digest(black_box(3 * BLOCK as u64), &data, false)))
    });
    g.finish();
}

/// One block through the receiver core as datagrams: parse, tag check,
/// assembly, decode, block hash. Throughput is image bytes.
fn bench_receiver_path(c: &mut Criterion) {
    let data = block(3);
    let m = manifest_for(&data);
    let enc = BlockEncoder::new(&m.block_oti(0), &data);
    let k = m.source_symbols(0);
    let mut g = c.benchmark_group("receiver_path");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.sample_size(20);
    for loss in [0.0, 0.05] {
        // Pre-build the datagram stream the receiver would see.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut stream = Vec::new();
        let mut sym = vec![0u8; T as usize];
        let mut seq = 0u32;
        let mut got = 0u32;
        let push = |esi: u32, sym: &[u8], seq: &mut u32, stream: &mut Vec<Vec<u8>>| {
            let h = Header {
                kind: Kind::Symbol,
                session: 5,
                seq: *seq,
                block: 0,
                esi,
                payload_len: T,
            };
            *seq += 1;
            let mut d = vec![0u8; datagram_len(T as usize)];
            let _ = emit(&h, sym, &KEY, &mut d);
            stream.push(d);
        };
        for esi in 0..k {
            if rng.random::<f64>() >= loss {
                source_symbol(&data, esi, &mut sym);
                push(esi, &sym, &mut seq, &mut stream);
                got += 1;
            }
        }
        for (i, s) in enc.repair(k, k - got + 2).into_iter().enumerate() {
            push(k + i as u32, &s, &mut seq, &mut stream);
        }
        g.bench_with_input(
            BenchmarkId::new("block_1MiB", format!("{}pct", (loss * 100.0) as u32)),
            &stream,
            |b, stream| {
                b.iter(|| {
                    let mut rx = ReceiverCore::new(m.clone(), 5, KEY);
                    for d in stream {
                        if let Ok(Some(job)) = rx.on_datagram(d) {
                            return black_box(matches!(
                                decode_block(&m, job),
                                DecodeOutcome::Good { .. }
                            ));
                        }
                    }
                    false
                })
            },
        );
    }
    g.finish();
}

/// The sender core driven as the send thread drives it (loads and
/// encoders complete at once), at a simulated 10 Gbit/s with `n`
/// receivers, each reporting every 20 ms of simulated time the blocks
/// whose source ended since its last report with ~2 % of their source
/// symbols missing (exact gap bitmaps): its losses are then repaired by
/// coded resends or fountain repair, as in a real wave.
struct SenderRig {
    s: rackcast_core::dataplane::sender::WaveSender,
    ids: Vec<u32>,
    now: std::time::Instant,
    /// Blocks whose last source symbol went out, with that symbol's seq.
    finished: Vec<(u32, u32)>,
    /// Per receiver: next report time, cursor into `finished`, counters.
    next: Vec<(std::time::Instant, usize, u64)>,
    seq_hi: u32,
    /// Datagrams and reports the core handled (a check that the rig
    /// measures a wave in flow, printed with the result).
    sent: u64,
    reports: u64,
    gaps: Vec<Vec<u8>>,
    k: u32,
    blocks: u32,
    rng: rand::rngs::StdRng,
}

const RIG_FRAME: usize = 1500 + 14;
const RIG_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

impl SenderRig {
    fn new(n: usize) -> SenderRig {
        use rackcast_core::dataplane::sender::{SenderConfig, WaveSender};
        use rackcast_core::wire::control::Msg;
        let blocks = 1024usize;
        let m = Manifest {
            image_size: (blocks * BLOCK) as u64,
            image_hash: [1; 32],
            block_size: BLOCK as u32,
            symbol_size: T,
            blocks: (0..blocks)
                .map(|_| BlockInfo {
                    hash: [2; 32],
                    zero: false,
                    wire: rackcast_core::image::manifest::Wire::Raw,
                })
                .collect(),
        };
        let k = m.source_symbols(0);
        let t0 = std::time::Instant::now();
        let cfg = SenderConfig {
            expected: n,
            rate_bps: 10_000_000_000,
            feedback: RIG_INTERVAL,
            ..Default::default()
        };
        let mut s = WaveSender::new(cfg, m, RIG_FRAME, t0);
        let mut ids = Vec::new();
        let mut next = Vec::new();
        for i in 0..n {
            let id = s.on_hello(&format!("r{i}"), t0);
            s.on_message(id, Msg::Ready { resumed_blocks: 0 }, t0);
            ids.push(id);
            // Staggered: reports spread over the interval, as real ones.
            next.push((t0 + RIG_INTERVAL * i as u32 / n as u32, 0, 0));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let gaps = (0..64)
            .map(|_| {
                let mut g = vec![0u8; (k as usize).div_ceil(8)];
                for e in 0..k {
                    if rng.random::<f64>() < 0.02 {
                        g[(e / 8) as usize] |= 1 << (e % 8);
                    }
                }
                g
            })
            .collect();
        let mut rig = SenderRig {
            s,
            ids,
            now: t0,
            finished: Vec::new(),
            next,
            seq_hi: 0,
            sent: 0,
            reports: 0,
            gaps,
            k,
            blocks: blocks as u32,
            rng,
        };
        rig.pump();
        rig
    }

    fn pump(&mut self) {
        use rackcast_core::dataplane::sender::Action;
        while let Some(a) = self.s.poll_action() {
            match a {
                Action::Load(b) => {
                    self.s.on_block_loaded(b);
                }
                Action::BuildEncoder(b) => self.s.on_encoder_ready(b),
                _ => {}
            }
        }
    }

    /// One batch of up to 64 datagrams and the reports due meanwhile;
    /// returns the time spent in the core and whether the wave went on.
    fn step(&mut self) -> (std::time::Duration, bool) {
        use rackcast_core::dataplane::sender::Tx;
        use rackcast_core::wire::control::{Msg, Status};
        let mut out = Vec::with_capacity(64);
        let t = std::time::Instant::now();
        self.s.poll_transmit(self.now, 64, &mut out);
        self.pump();
        let mut spent = t.elapsed();
        self.sent += out.len() as u64;
        for tx in &out {
            if let Tx::Symbol { seq, block, esi } = tx {
                if *esi + 1 == self.k {
                    self.finished.push((*block, *seq));
                }
            }
            let (Tx::Symbol { seq, .. } | Tx::Coded { seq, .. } | Tx::Probe { seq }) = tx;
            self.seq_hi = self.seq_hi.max(*seq);
        }
        self.now += std::time::Duration::from_nanos(
            (64 * RIG_FRAME as u64 * 8 * 1_000_000_000) / 10_000_000_000,
        );
        for i in 0..self.ids.len() {
            if self.next[i].0 > self.now {
                continue;
            }
            let (_, from, received) = self.next[i];
            let new = &self.finished[from..];
            let mut st = Status {
                seq_hi: self.seq_hi,
                seen_any: true,
                received: received + u64::from(self.seq_hi) * 98 / 100,
                expected: u64::from(self.seq_hi),
                blocks_done: from as u32,
                ..Default::default()
            };
            // Blocks not listed count as complete: list the ones whose
            // source has not ended yet as missing.
            let hi = self.finished.iter().map(|(b, _)| b + 1).max().unwrap_or(0);
            st.missing.push((hi, self.blocks - hi));
            for (b, _) in new {
                let g = self.gaps[self.rng.random_range(0..self.gaps.len())].clone();
                let short = g.iter().map(|x| x.count_ones()).sum::<u32>();
                st.partial.push((*b, short));
                st.source_gaps.push((*b, g));
            }
            self.next[i] = (self.now + RIG_INTERVAL, self.finished.len(), received);
            self.reports += 1;
            let t = std::time::Instant::now();
            self.s.on_message(self.ids[i], Msg::Status(st), self.now);
            self.pump();
            spent += t.elapsed();
        }
        (spent, !out.is_empty() && self.finished.len() < 900)
    }
}

fn bench_sender_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("sender_core");
    g.throughput(Throughput::Elements(64));
    g.sample_size(20);
    for n in [8usize, 100, 1000] {
        g.bench_function(BenchmarkId::new("10gbit_64_datagrams", n), |b| {
            let mut rig = SenderRig::new(n);
            // Past the first second's start-up: a wave in full flow.
            for _ in 0..2_000 {
                rig.step();
            }
            let (mut steps, mut sent, mut reports) = (0u64, 0u64, 0u64);
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let (s0, r0) = (rig.sent, rig.reports);
                    let (t, more) = rig.step();
                    steps += 1;
                    sent += rig.sent - s0;
                    reports += rig.reports - r0;
                    total += t;
                    if !more {
                        rig = SenderRig::new(n);
                        for _ in 0..2_000 {
                            rig.step();
                        }
                    }
                }
                total
            });
            eprintln!(
                "  {n} receivers: {:.1} datagrams and {:.2} reports per step",
                sent as f64 / steps.max(1) as f64,
                reports as f64 / steps.max(1) as f64
            );
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_sender_core,
    bench_encode,
    bench_decode,
    bench_packetize,
    bench_digest,
    bench_receiver_path
);
criterion_main!(benches);
