//! Coded resends: which lost source symbols of a block to XOR together so
//! that one datagram repairs a different loss at each receiver.
//!
//! Receivers report exactly which source symbols of a block they miss. With
//! independent losses those sets barely overlap, so resending their union
//! costs about N times one receiver's loss. A datagram carrying
//! `s_a ^ s_b ^ s_c` repairs receiver A (which holds `s_b`, `s_c`), B and C
//! at once, as long as each of them misses exactly one symbol of the
//! combination. A round then costs about the largest single loss (like
//! fountain repair) while a receiver spends a few XORs instead of a RaptorQ
//! decode.
//!
//! Owns: the greedy combination rule and the XOR of symbols. Must not: know
//! about sockets, packets or receivers beyond their ids.

use std::collections::BTreeMap;

pub use crate::wire::control::MAX_COMBO;
/// Most receivers one block's plan pairs up (a bit each in a `u64`): with
/// more receivers short on the same block, fountain repair is cheaper.
pub const MAX_RECEIVERS: usize = 64;

/// Combinations for one block. `needs` maps a receiver id to the source
/// ESIs it misses. Every needed ESI lands in exactly one combination, and
/// no receiver misses two ESIs of the same combination (so each can solve
/// its one unknown). ESIs missing at several receivers serve all of them.
/// Combinations of one ESI are plain resends. `None` when more than
/// [`MAX_RECEIVERS`] receivers need the block. Cost: O(distinct ESIs x
/// combinations), each step one mask test.
pub fn plan(needs: &BTreeMap<u32, Vec<u32>>) -> Option<Vec<Vec<u32>>> {
    if needs.len() > MAX_RECEIVERS {
        return None;
    }
    // ESI -> mask of the receivers missing it, in ESI order (deterministic).
    let mut missing: BTreeMap<u32, u64> = BTreeMap::new();
    for (bit, esis) in needs.values().enumerate() {
        for e in esis {
            *missing.entry(*e).or_default() |= 1u64 << bit;
        }
    }
    let everyone = needs
        .values()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .fold(0u64, |m, (bit, _)| m | 1 << bit);
    let mut left: Vec<(u32, u64)> = missing.into_iter().collect();
    let mut combos = Vec::new();
    while !left.is_empty() {
        let mut combo = Vec::new();
        let mut used = 0u64;
        let mut rest = Vec::with_capacity(left.len());
        for (e, who) in left.drain(..) {
            if combo.len() < MAX_COMBO && used != everyone && who & used == 0 {
                combo.push(e);
                used |= who;
            } else {
                rest.push((e, who));
            }
        }
        combos.push(combo);
        left = rest;
    }
    Some(combos)
}

/// `acc ^= sym`, both one symbol long.
pub fn xor_into(acc: &mut [u8], sym: &[u8]) {
    // u64 words: the compiler vectorises this; byte loops it does not
    // always.
    let n = acc.len().min(sym.len());
    let (a8, a_tail) = acc[..n].split_at_mut(n / 8 * 8);
    let (s8, s_tail) = sym[..n].split_at(n / 8 * 8);
    for (a, s) in a8.chunks_exact_mut(8).zip(s8.chunks_exact(8)) {
        let mut x = [0u8; 8];
        x.copy_from_slice(a);
        let mut y = [0u8; 8];
        y.copy_from_slice(s);
        a.copy_from_slice(&(u64::from_ne_bytes(x) ^ u64::from_ne_bytes(y)).to_ne_bytes());
    }
    for (a, s) in a_tail.iter_mut().zip(s_tail) {
        *a ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn disjoint_losses_pair_up() {
        let needs: BTreeMap<u32, Vec<u32>> = [
            (1, vec![3, 9, 40]),
            (2, vec![5, 41]),
            (3, vec![7]),
            (4, vec![]),
        ]
        .into_iter()
        .collect();
        let c = plan(&needs).unwrap();
        // Three datagrams instead of the union's six.
        assert_eq!(c, vec![vec![3, 5, 7], vec![9, 41], vec![40]]);
    }

    #[test]
    fn shared_loss_serves_everyone_missing_it() {
        let needs: BTreeMap<u32, Vec<u32>> = [(1, vec![2, 8]), (2, vec![2]), (3, vec![2, 5])]
            .into_iter()
            .collect();
        let c = plan(&needs).unwrap();
        assert_eq!(c, vec![vec![2], vec![5, 8]]);
    }

    #[test]
    fn too_many_receivers_is_left_to_fountain_repair() {
        let needs: BTreeMap<u32, Vec<u32>> =
            (0..=MAX_RECEIVERS as u32).map(|r| (r, vec![r])).collect();
        assert_eq!(plan(&needs), None);
        let fits: BTreeMap<u32, Vec<u32>> =
            (0..MAX_RECEIVERS as u32).map(|r| (r, vec![r])).collect();
        // 64 receivers, one distinct loss each: 4 datagrams of 16.
        assert_eq!(plan(&fits).map(|c| c.len()), Some(4));
    }

    proptest! {
        /// Every needed ESI is sent once; each receiver misses at most one
        /// ESI per combination; no combination exceeds MAX_COMBO; the count
        /// is at least the largest single need (can't do better) and never
        /// more than the union (never worse than plain resends).
        #[test]
        fn plans_are_solvable_and_complete(
            needs in proptest::collection::btree_map(0u32..12, proptest::collection::vec(0u32..200, 0..40), 1..10)
        ) {
            let c = plan(&needs).unwrap();
            let mut union: Vec<u32> = needs.values().flatten().copied().collect();
            union.sort_unstable();
            union.dedup();
            let mut sent: Vec<u32> = c.iter().flatten().copied().collect();
            sent.sort_unstable();
            prop_assert_eq!(&sent, &union);
            for combo in &c {
                prop_assert!(!combo.is_empty() && combo.len() <= MAX_COMBO);
                for esis in needs.values() {
                    let unknown = combo.iter().filter(|e| esis.contains(e)).count();
                    prop_assert!(unknown <= 1);
                }
            }
            let largest = needs.values().map(|v| { let mut v = v.clone(); v.sort_unstable(); v.dedup(); v.len() }).max().unwrap_or(0);
            prop_assert!(c.len() >= largest && c.len() <= union.len());
        }

        #[test]
        fn xor_twice_is_identity(a in proptest::collection::vec(any::<u8>(), 0..100), seed: u8) {
            let b: Vec<u8> = a.iter().enumerate().map(|(i, _)| seed.wrapping_mul(i as u8 + 1)).collect();
            let mut x = a.clone();
            xor_into(&mut x, &b);
            for (i, v) in x.iter().enumerate() {
                prop_assert_eq!(*v, a[i] ^ b[i]);
            }
            xor_into(&mut x, &b);
            prop_assert_eq!(x, a);
        }
    }
}
