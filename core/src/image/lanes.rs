//! Keyed BLAKE3 of many equal-length messages at once: eight messages side
//! by side in AVX2 lanes, the same 32 bytes `blake3::keyed_hash` gives.
//!
//! Why it exists: every multicast datagram carries a keyed BLAKE3 tag over
//! its ~1.5 KB body. The `blake3` crate's SIMD paths parallelise across the
//! chunks of *one* long input; a datagram has two chunks, so each tag was
//! hashed one compression at a time and the tag was half of the receive
//! thread's CPU. A `recvmmsg` batch (and a `sendmmsg` batch) holds many
//! bodies of one length, so hashing them in lanes does the same work with
//! 8-wide vectors. The crate has no public multi-message API, hence this.
//!
//! Owns: the lane layout and the BLAKE3 compression, chunk and tree rules
//! for one message length. Must not: know about packets (the `packet`
//! module decides what is hashed). Without AVX2 (checked at run time) or
//! when fewer than two messages share a length it calls
//! `blake3::keyed_hash`; the property tests check every path against it.

/// `keyed_hash(key, msgs[i])` into `out[i]` for every `i`
/// (`out.len() >= msgs.len()`); runs of equal-length messages are hashed
/// eight at a time.
pub fn keyed_hash_many(key: &[u8; 32], msgs: &[&[u8]], out: &mut [[u8; 32]]) {
    let mut i = 0;
    while i < msgs.len() {
        let len = msgs[i].len();
        let mut run = 1;
        while run < LANES && i + run < msgs.len() && msgs[i + run].len() == len {
            run += 1;
        }
        if run >= 2 && len > 0 && avx2::available() {
            avx2::hash8(key, &msgs[i..i + run], &mut out[i..i + run]);
        } else {
            for k in 0..run {
                out[i + k] = *blake3::keyed_hash(key, msgs[i + k]).as_bytes();
            }
        }
        i += run;
    }
}

const LANES: usize = 8;
const CHUNK_LEN: usize = 1024;
const BLOCK_LEN: usize = 64;
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const PARENT: u32 = 4;
const ROOT: u32 = 8;
const KEYED_HASH: u32 = 16;
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const MSG_PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];

/// Word of the original block each round reads at position `i`.
const fn schedule() -> [[usize; 16]; 7] {
    let mut s = [[0usize; 16]; 7];
    let mut i = 0;
    while i < 16 {
        s[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            s[r][i] = s[r - 1][MSG_PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    s
}
const SCHEDULE: [[usize; 16]; 7] = schedule();

/// Leaves in the left subtree of a BLAKE3 tree of `n >= 2` equal leaves
/// (chunks, or power-of-two blocks of chunks): the largest power of two
/// below `n`. Shared with `manifest::merge_block_digests`.
pub(crate) fn left_subtree_leaves(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// Hash `msgs` (2..=8 of them, equal non-zero length) into `out`.
    pub fn hash8(key: &[u8; 32], msgs: &[&[u8]], out: &mut [[u8; 32]]) {
        debug_assert!(available() && (1..=LANES).contains(&msgs.len()));
        // Idle lanes repeat the first message; their results are dropped.
        let mut lanes: [&[u8]; LANES] = [msgs[0]; LANES];
        lanes[..msgs.len()].copy_from_slice(msgs);
        let mut words = [[0u8; 32]; LANES];
        // SAFETY: `available()` checked AVX2 at run time (callers go
        // through `keyed_hash_many`, which checks it); every load below
        // reads inside a slice whose length was checked first.
        unsafe { hash_lanes(key, &lanes, &mut words) };
        out[..msgs.len()].copy_from_slice(&words[..msgs.len()]);
    }

    type Words = [__m256i; 8];

    #[inline(always)]
    unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn xor(a: __m256i, b: __m256i) -> __m256i {
        _mm256_xor_si256(a, b)
    }
    #[inline(always)]
    unsafe fn rot16(x: __m256i) -> __m256i {
        _mm256_shuffle_epi8(
            x,
            _mm256_setr_epi8(
                2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10,
                11, 8, 9, 14, 15, 12, 13,
            ),
        )
    }
    #[inline(always)]
    unsafe fn rot12(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20))
    }
    #[inline(always)]
    unsafe fn rot8(x: __m256i) -> __m256i {
        _mm256_shuffle_epi8(
            x,
            _mm256_setr_epi8(
                1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7, 4, 9,
                10, 11, 8, 13, 14, 15, 12,
            ),
        )
    }
    #[inline(always)]
    unsafe fn rot7(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25))
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn g(
        v: &mut [__m256i; 16],
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        x: __m256i,
        y: __m256i,
    ) {
        v[a] = add(add(v[a], v[b]), x);
        v[d] = rot16(xor(v[d], v[a]));
        v[c] = add(v[c], v[d]);
        v[b] = rot12(xor(v[b], v[c]));
        v[a] = add(add(v[a], v[b]), y);
        v[d] = rot8(xor(v[d], v[a]));
        v[c] = add(v[c], v[d]);
        v[b] = rot7(xor(v[b], v[c]));
    }

    /// One compression in every lane: all lanes share counter, length and
    /// flags (equal-length messages walk the same tree).
    #[target_feature(enable = "avx2")]
    unsafe fn compress(cv: &Words, m: &[__m256i; 16], counter: u64, len: u32, flags: u32) -> Words {
        let mut v = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            _mm256_set1_epi32(IV[0] as i32),
            _mm256_set1_epi32(IV[1] as i32),
            _mm256_set1_epi32(IV[2] as i32),
            _mm256_set1_epi32(IV[3] as i32),
            _mm256_set1_epi32(counter as u32 as i32),
            _mm256_set1_epi32((counter >> 32) as u32 as i32),
            _mm256_set1_epi32(len as i32),
            _mm256_set1_epi32(flags as i32),
        ];
        for s in &SCHEDULE {
            g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
            g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
            g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
            g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
            g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
            g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
            g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
            g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
        }
        let mut out = *cv;
        for i in 0..8 {
            out[i] = xor(v[i], v[i + 8]);
        }
        out
    }

    /// 8x8 transpose of 32-bit words: row `i` (lane `i`'s eight words)
    /// becomes column `i` (word `i` of every lane), and back.
    #[target_feature(enable = "avx2")]
    unsafe fn transpose(r: &mut Words) {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
        r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
        r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
        r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
        r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
        r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
        r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
        r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
    }

    /// The 64-byte block at `at` of every lane, word-transposed. `n` bytes
    /// are real (`at + n <= len`); a short last block is zero-padded.
    #[target_feature(enable = "avx2")]
    unsafe fn load_block(lanes: &[&[u8]; LANES], at: usize, n: usize) -> [__m256i; 16] {
        let mut lo = [_mm256_setzero_si256(); 8];
        let mut hi = [_mm256_setzero_si256(); 8];
        for (l, msg) in lanes.iter().enumerate() {
            let mut pad = [0u8; BLOCK_LEN];
            let src: &[u8] = if n == BLOCK_LEN {
                &msg[at..at + BLOCK_LEN]
            } else {
                pad[..n].copy_from_slice(&msg[at..at + n]);
                &pad
            };
            lo[l] = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
            hi[l] = _mm256_loadu_si256(src[32..].as_ptr() as *const __m256i);
        }
        transpose(&mut lo);
        transpose(&mut hi);
        let mut m = [_mm256_setzero_si256(); 16];
        m[..8].copy_from_slice(&lo);
        m[8..].copy_from_slice(&hi);
        m
    }

    /// Chaining value of chunk `c` in every lane (`ROOT` on its last block
    /// when it is the only chunk).
    #[target_feature(enable = "avx2")]
    unsafe fn chunk(key_cv: &Words, lanes: &[&[u8]; LANES], c: usize, len: usize) -> Words {
        let start = c * CHUNK_LEN;
        let end = (start + CHUNK_LEN).min(len);
        let blocks = (end - start).div_ceil(BLOCK_LEN).max(1);
        let only = len <= CHUNK_LEN;
        let mut cv = *key_cv;
        for b in 0..blocks {
            let at = start + b * BLOCK_LEN;
            let n = (end - at).min(BLOCK_LEN);
            let m = load_block(lanes, at, n);
            let mut flags = KEYED_HASH;
            if b == 0 {
                flags |= CHUNK_START;
            }
            if b + 1 == blocks {
                flags |= CHUNK_END;
                if only {
                    flags |= ROOT;
                }
            }
            cv = compress(&cv, &m, c as u64, n as u32, flags);
        }
        cv
    }

    /// Chaining value of the subtree over `cvs` (chunk chaining values).
    #[target_feature(enable = "avx2")]
    unsafe fn subtree(key_cv: &Words, cvs: &[Words], root: bool) -> Words {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let (l, r) = cvs.split_at(left_subtree_leaves(cvs.len()));
        let left = subtree(key_cv, l, false);
        let right = subtree(key_cv, r, false);
        let mut m = [_mm256_setzero_si256(); 16];
        m[..8].copy_from_slice(&left);
        m[8..].copy_from_slice(&right);
        let flags = KEYED_HASH | PARENT | if root { ROOT } else { 0 };
        compress(key_cv, &m, 0, BLOCK_LEN as u32, flags)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hash_lanes(key: &[u8; 32], lanes: &[&[u8]; LANES], out: &mut [[u8; 32]; LANES]) {
        let len = lanes[0].len();
        let mut key_cv = [_mm256_setzero_si256(); 8];
        for (i, w) in key_cv.iter_mut().enumerate() {
            let word =
                u32::from_le_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]]);
            *w = _mm256_set1_epi32(word as i32);
        }
        let chunks = len.div_ceil(CHUNK_LEN);
        let mut cvs = Vec::with_capacity(chunks);
        for c in 0..chunks {
            cvs.push(chunk(&key_cv, lanes, c, len));
        }
        let mut root = if chunks == 1 {
            cvs[0]
        } else {
            subtree(&key_cv, &cvs, true)
        };
        transpose(&mut root);
        for (l, o) in out.iter_mut().enumerate() {
            _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, root[l]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub fn available() -> bool {
        false
    }
    pub fn hash8(_: &[u8; 32], _: &[&[u8]], _: &mut [[u8; 32]]) {
        unreachable!("no lanes off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(key: &[u8; 32], msgs: &[Vec<u8>]) {
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        let mut out = vec![[0u8; 32]; msgs.len()];
        keyed_hash_many(key, &refs, &mut out);
        for (m, o) in msgs.iter().zip(&out) {
            assert_eq!(
                o,
                blake3::keyed_hash(key, m).as_bytes(),
                "length {}",
                m.len()
            );
        }
    }

    #[test]
    fn lanes_are_used_here() {
        // The CI machines have AVX2; if not, the tests below only check
        // the fallback and this says so.
        assert!(avx2::available(), "no AVX2: lane path untested");
    }

    /// Every length around the block, chunk and tree boundaries up to five
    /// chunks, 8 lanes and 3 lanes, distinct contents per lane.
    #[test]
    fn matches_blake3_at_every_boundary() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let mut lens: Vec<usize> = (1..=130).collect();
        for edge in [1024usize, 2048, 3072, 4096, 5120] {
            lens.extend(edge - 65..=edge + 65);
        }
        lens.extend([1456, 1472, 8972, 9000, 16384, 16385]);
        for len in lens {
            for lanes in [8usize, 3] {
                let msgs: Vec<Vec<u8>> = (0..lanes)
                    .map(|l| (0..len).map(|i| (i * 31 + l * 101 + len) as u8).collect())
                    .collect();
                check(&key, &msgs);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Mixed runs: lengths change mid-batch, more than 8 of one length,
        /// singletons between them.
        #[test]
        fn mixed_batches_match_blake3(
            key in any::<[u8; 32]>(),
            spec in proptest::collection::vec((0usize..2200, 1usize..12, any::<u8>()), 1..6),
        ) {
            let mut msgs = Vec::new();
            for (len, count, seed) in spec {
                for c in 0..count {
                    msgs.push((0..len).map(|i| seed.wrapping_add((i * 13 + c) as u8)).collect::<Vec<u8>>());
                }
            }
            check(&key, &msgs);
        }
    }
}
