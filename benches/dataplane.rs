//! Data-plane micro-benchmarks: block encode, block decode at 0/5/20 %
//! loss, packetize + tag (one datagram at a time beside a 64-datagram batch
//! in SIMD lanes), a block's digest, and the receiver path per block
//! (parse, verify, assemble, decode, hash). Throughput is reported per
//! byte of image so the numbers read as GB/s; `receiver_path` at 1 GB of
//! image is `1 GB / throughput` seconds of one core.
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

criterion_group!(
    benches,
    bench_encode,
    bench_decode,
    bench_packetize,
    bench_digest,
    bench_receiver_path
);
criterion_main!(benches);
