//! Unit tests of the wave sender core: no sockets, no sleeps.

use super::*;
use crate::image::manifest::{BlockInfo, Wire};
use crate::wire::control::Verdict;

fn manifest(blocks: usize, zero: &[usize]) -> Manifest {
    Manifest {
        image_size: blocks as u64 * 4096,
        image_hash: [9; 32],
        block_size: 4096,
        symbol_size: 1024,
        blocks: (0..blocks)
            .map(|i| BlockInfo {
                hash: [0; 32],
                zero: zero.contains(&i),
                wire: Wire::Raw,
            })
            .collect(),
    }
}

fn cfg(expected: usize) -> SenderConfig {
    SenderConfig {
        expected,
        interleave: 2,
        rate_bps: 1_000_000_000,
        ..Default::default()
    }
}

/// Run the sender's actions the way the driver would: loads and
/// encoders complete at once.
fn pump(s: &mut WaveSender) -> Vec<Action> {
    let mut seen = Vec::new();
    while let Some(a) = s.poll_action() {
        match a {
            Action::Load(b) => {
                s.on_block_loaded(b);
            }
            Action::BuildEncoder(b) => s.on_encoder_ready(b),
            _ => {}
        }
        seen.push(a);
    }
    seen
}

fn drain(s: &mut WaveSender, now: Instant) -> Vec<Tx> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        pump(s);
        let before = out.len();
        s.poll_transmit(now, 64, &mut out);
        if out.len() == before || matches!(out.last(), Some(Tx::Probe { .. })) {
            break;
        }
    }
    out
}

/// A receiver that holds most blocks (delta re-imaging, resume) reports
/// them before Ready: the wave's source pass sends only what it lacks,
/// from the first datagram on, even when the wave starts on the report
/// (which makes the receiver ready) before its Ready is read.
#[test]
fn blocks_reported_in_place_before_ready_are_never_sent() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(1), manifest(6, &[]), 1100, t0);
    pump(&mut s);
    let a = s.on_hello("a", t0);
    let st = Status {
        blocks_done: 5,
        missing: vec![(4, 1)],
        ..Default::default()
    };
    s.on_message(a, Msg::Status(st), t0);
    let mut txs = Vec::new();
    for ms in 1..50 {
        txs.extend(drain(&mut s, t0 + Duration::from_millis(ms)));
    }
    let blocks: std::collections::BTreeSet<u32> = txs
        .iter()
        .filter_map(|t| match t {
            Tx::Symbol { block, .. } => Some(*block),
            _ => None,
        })
        .collect();
    assert_eq!(blocks, [4].into_iter().collect(), "{txs:?}");
}

#[test]
fn waits_for_expected_receivers_then_interleaves_source() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), manifest(5, &[3]), 1100, t0);
    pump(&mut s);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    let mut out = Vec::new();
    s.poll_transmit(t0 + Duration::from_secs(1), 64, &mut out);
    // Only a keep-alive probe while waiting, no symbols.
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        matches!(out[0], Tx::Probe { .. }),
        "sent before all receivers were ready"
    );
    let b = s.on_hello("b", t0);
    s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
    let txs = drain(&mut s, t0 + Duration::from_millis(1));
    let syms: Vec<(u32, u32)> = txs
        .iter()
        .filter_map(|t| match t {
            Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
            _ => None,
        })
        .collect();
    // Groups of 2 blocks, round-robin inside a group, zero block 3 skipped.
    assert_eq!(
        &syms[..8],
        &[
            (0, 0),
            (1, 0),
            (0, 1),
            (1, 1),
            (0, 2),
            (1, 2),
            (0, 3),
            (1, 3)
        ]
    );
    assert_eq!(syms.len(), 16);
    assert!(!syms.iter().any(|(b, _)| *b == 3));
    // Sequence numbers are consecutive.
    for (i, t) in txs.iter().enumerate() {
        if let Tx::Symbol { seq, .. } = t {
            assert_eq!(*seq, i as u32 + 1, "probe sent while waiting took seq 0");
        }
    }
}

#[test]
fn repair_is_max_shortfall_plus_margin_and_only_after_seen() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), manifest(2, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    let b = s.on_hello("b", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
    let txs = drain(&mut s, t0);
    assert_eq!(
        txs.iter()
            .filter(|t| matches!(t, Tx::Symbol { .. }))
            .count(),
        8
    );
    // Receiver a's report predates the last symbol of block 1: ignored.
    let early = Status {
        seq_hi: 5,
        seen_any: true,
        partial: vec![(1, 2)],
        ..Default::default()
    };
    s.on_message(a, Msg::Status(early), t0);
    pump(&mut s);
    assert!(drain(&mut s, t0)
        .iter()
        .all(|t| matches!(t, Tx::Probe { .. })));
    let st = |short| Status {
        seq_hi: 8,
        seen_any: true,
        partial: vec![(0, short)],
        ..Default::default()
    };
    s.on_message(a, Msg::Status(st(1)), t0);
    s.on_message(b, Msg::Status(st(3)), t0);
    let txs = drain(&mut s, t0 + Duration::from_millis(1));
    let rep: Vec<_> = txs
        .iter()
        .filter_map(|t| match t {
            Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
            _ => None,
        })
        .collect();
    // max(1, 3) + 2 fixed + ceil(3 * 0.05) = 6 fresh ESIs from K=4.
    assert_eq!(rep, (4..10).map(|e| (0, e)).collect::<Vec<_>>());
    // A stale repeat of the same report does not trigger more.
    s.on_message(b, Msg::Status(st(3)), t0);
    assert!(drain(&mut s, t0 + Duration::from_millis(2))
        .iter()
        .all(|t| matches!(t, Tx::Probe { .. })));
}

#[test]
fn ends_when_all_verified_or_dropped() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), manifest(2, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    let b = s.on_hello("b", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(
        a,
        Msg::Done(Verdict::Verified {
            image_hash: [9; 32],
        }),
        t0,
    );
    assert!(!s.is_finished());
    // b goes silent: dropped after the timeout, and the wave ends.
    s.on_tick(t0 + Duration::from_secs(16));
    assert!(s.is_finished());
    let sum = s.summary();
    assert_eq!(sum[0].1.state, RxState::Verified);
    assert!(matches!(sum[1].1.state, RxState::Failed(_)));
}

#[test]
fn same_name_again_replaces_a_live_connection_and_reclaims_a_dead_one() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), manifest(1, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    pump(&mut s);
    // Still "connected" (a power-cycled device's old TCP session):
    // the new connection gets a new slot, the old one is closed.
    let a2 = s.on_hello("a", t0);
    assert_ne!(a, a2);
    let acts = pump(&mut s);
    assert!(acts.contains(&Action::Disconnect(a)), "{acts:?}");
    assert_eq!(s.receivers().len(), 1);
    // Messages still arriving on the old connection are ignored.
    s.on_message(
        a,
        Msg::Done(Verdict::Verified {
            image_hash: [9; 32],
        }),
        t0,
    );
    assert!(s.receivers().values().all(|r| r.state == RxState::Joining));
    // After a clean disconnect the same name takes its slot back.
    s.on_disconnect(a2, t0);
    assert_eq!(s.on_hello("a", t0), a2);
}

#[test]
fn wrong_hash_verdict_is_a_failure() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(1), manifest(1, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(
        a,
        Msg::Done(Verdict::Verified {
            image_hash: [1; 32],
        }),
        t0,
    );
    assert!(s.is_finished());
    assert!(matches!(s.summary()[0].1.state, RxState::Failed(_)));
}

#[test]
fn start_timeout_starts_with_present_and_never_waits_forever() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(3), manifest(1, &[]), 1100, t0);
    s.on_tick(t0 + Duration::from_secs(61));
    assert!(s.is_finished(), "nobody came: must end");
    let mut s = WaveSender::new(cfg(3), manifest(1, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(
        a,
        Msg::Status(Status::default()),
        t0 + Duration::from_secs(55),
    );
    s.on_tick(t0 + Duration::from_secs(61));
    assert!(!drain(&mut s, t0 + Duration::from_secs(61)).is_empty());
}

#[test]
fn reconnect_keeps_identity_and_late_joiner_gets_source_again() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(1), manifest(2, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    drain(&mut s, t0);
    s.on_disconnect(a, t0);
    let a2 = s.on_hello("a", t0);
    assert_eq!(a, a2);
    s.on_message(a2, Msg::Ready { resumed_blocks: 1 }, t0);
    let st = Status {
        seq_hi: 0,
        seen_any: false,
        blocks_done: 1,
        missing: vec![(1, 1)],
        ..Default::default()
    };
    s.on_message(a2, Msg::Status(st), t0);
    // A whole block missing at one receiver: its source symbols again
    // (no encoder, no decoding at the receiver).
    assert_eq!(
        symbols(&drain(&mut s, t0 + Duration::from_millis(1))),
        vec![(1, 0), (1, 1), (1, 2), (1, 3)]
    );
    assert_eq!(s.stats.resent_source_packets, 4);
}

fn symbols(txs: &[Tx]) -> Vec<(u32, u32)> {
    txs.iter()
        .filter_map(|t| match t {
            Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
            _ => None,
        })
        .collect()
}

fn two_ready(s: &mut WaveSender, t0: Instant) -> (u32, u32) {
    let a = s.on_hello("a", t0);
    let b = s.on_hello("b", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
    drain(s, t0);
    s.on_message(a, behind(), t0);
    s.on_message(b, behind(), t0);
    (a, b)
}

/// A report from a receiver still working through the first packets.
fn behind() -> Msg {
    Msg::Status(Status {
        seq_hi: 1,
        seen_any: true,
        partial: vec![(0, 62)],
        ..Default::default()
    })
}

fn bitmap(esis: &[u32], k: u32) -> Vec<u8> {
    let mut b = vec![0u8; (k as usize).div_ceil(8)];
    for e in esis {
        b[(*e / 8) as usize] |= 1 << (e % 8);
    }
    b
}

fn gap_report(block: u32, gaps: Vec<u32>) -> Msg {
    Msg::Status(Status {
        seq_hi: 100,
        seen_any: true,
        partial: vec![(block, gaps.len() as u32)],
        source_gaps: vec![(block, bitmap(&gaps, 64))],
        ..Default::default()
    })
}

fn coded(txs: &[Tx]) -> Vec<(u32, u32, Vec<u32>)> {
    txs.iter()
        .filter_map(|t| match t {
            Tx::Coded {
                block, id, esis, ..
            } => Some((*block, *id, esis.clone())),
            _ => None,
        })
        .collect()
}

fn big_block() -> Manifest {
    Manifest {
        image_size: 64 * 1024,
        image_hash: [9; 32],
        block_size: 64 * 1024,
        symbol_size: 1024,
        blocks: vec![BlockInfo {
            hash: [0; 32],
            zero: false,
            wire: Wire::Raw,
        }],
    }
}

#[test]
fn losses_are_resent_coded_once_every_receiver_reported() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
    let (a, b) = two_ready(&mut s, t0);
    s.on_message(a, gap_report(0, vec![3, 9]), t0);
    // One report in: the block waits for the other receiver's, which
    // runs far behind but keeps reporting.
    for ms in [1, 60, 120, 180] {
        let at = t0 + Duration::from_millis(ms);
        s.on_message(b, behind(), at);
        let txs = drain(&mut s, at);
        assert!(symbols(&txs).is_empty() && coded(&txs).is_empty());
    }
    s.on_message(
        b,
        gap_report(0, vec![9, 40]),
        t0 + Duration::from_millis(200),
    );
    let plans: Vec<_> = pump(&mut s)
        .into_iter()
        .filter_map(|a| match a {
            Action::Control(
                id,
                Msg::Coded {
                    block,
                    first,
                    combos,
                },
            ) => Some((id, block, first, combos)),
            _ => None,
        })
        .collect();
    // 3 ^ 40 repairs a (has 40) and b (has 3); 9, lost at both, goes
    // plain. Two datagrams instead of the union's three; both
    // receivers learn the combination before it is sent.
    assert_eq!(
        plans,
        vec![(a, 0, 0, vec![vec![3, 40]]), (b, 0, 0, vec![vec![3, 40]])]
    );
    let txs = drain(&mut s, t0 + Duration::from_millis(202));
    assert_eq!(coded(&txs), vec![(0, 0, vec![3, 40])]);
    assert_eq!(symbols(&txs), vec![(0, 9)]);
    assert_eq!(
        (s.stats.resent_source_packets, s.stats.coded_packets),
        (2, 1)
    );
}

/// Reports keep coming while a round is on the wire; they must not
/// queue the same symbols again (a late joiner's whole-block needs
/// once starved the source that way).
#[test]
fn reports_during_a_queued_round_do_not_requeue_it() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(1), big_block(), 1100, t0);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    drain(&mut s, t0);
    s.on_message(a, gap_report(0, vec![3, 9]), t0);
    pump(&mut s);
    let mut first = Vec::new();
    s.poll_transmit(t0 + Duration::from_millis(1), 1, &mut first);
    assert_eq!(symbols(&first), vec![(0, 3)]);
    s.on_message(a, gap_report(0, vec![3, 9]), t0);
    let rest = drain(&mut s, t0 + Duration::from_millis(2));
    assert_eq!(symbols(&rest), vec![(0, 9)]);
    assert_eq!(s.stats.resent_source_packets, 2);
}

/// A receiver that lost whole blocks (a late joiner) gets them
/// resent, but the rest of the image keeps flowing to everybody.
#[test]
fn a_backlog_of_resends_shares_the_wire_with_the_source() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(1), manifest(8, &[]), 1100, t0);
    let a = s.on_hello("a", t0);
    s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
    pump(&mut s);
    let mut first = Vec::new();
    s.poll_transmit(t0, 8, &mut first);
    assert_eq!(symbols(&first).len(), 8, "{first:?}");
    // Blocks 0 and 1 (the first group) never arrived.
    let st = Status {
        seq_hi: 8,
        seen_any: true,
        missing: vec![(0, 8)],
        ..Default::default()
    };
    s.on_message(a, Msg::Status(st), t0);
    pump(&mut s);
    let mut next = Vec::new();
    s.poll_transmit(t0 + Duration::from_millis(1), 8, &mut next);
    let (old, new): (Vec<_>, Vec<_>) = symbols(&next).into_iter().partition(|(b, _)| *b < 2);
    assert_eq!((old.len(), new.len()), (4, 4), "{next:?}");
}

#[test]
fn a_silent_receiver_is_waited_for_only_a_few_report_intervals() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
    let (a, _b) = two_ready(&mut s, t0);
    s.on_message(a, gap_report(0, vec![3, 9]), t0);
    assert!(symbols(&drain(&mut s, t0 + Duration::from_millis(100))).is_empty());
    assert!(symbols(&drain(&mut s, t0 + Duration::from_millis(499))).is_empty());
    // b has not reported for 25 intervals (500 ms at least): stale, seen
    // when the wait set is next rebuilt (at most `WAIT_SET_MAX_AGE` on).
    let txs = drain(&mut s, t0 + Duration::from_millis(521));
    assert_eq!(symbols(&txs), vec![(0, 3), (0, 9)]);
}

#[test]
fn a_receiver_reporting_but_never_past_the_block_holds_it_only_until_the_hold() {
    let t0 = Instant::now();
    let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
    let (a, b) = two_ready(&mut s, t0);
    s.on_message(a, gap_report(0, vec![3, 9]), t0);
    let mut sent = Vec::new();
    for ms in (20..=2100).step_by(20) {
        let at = t0 + Duration::from_millis(ms);
        s.on_message(b, behind(), at);
        let txs = drain(&mut s, at);
        if !symbols(&txs).is_empty() {
            sent.push((ms, symbols(&txs)));
        }
    }
    assert_eq!(sent, vec![(2000, vec![(0, 3), (0, 9)])]);
}

#[test]
fn conflicting_losses_beyond_the_factor_get_fountain_repair() {
    // a, b, c each miss two symbols, every pair shared: no two can go
    // in one datagram, 3 resends > factor 1 x max shortfall 2 + 0.
    let t0 = Instant::now();
    let mut c = cfg(3);
    c.source_resend_factor = 1.0;
    c.repair_margin = 0;
    let mut s = WaveSender::new(c, big_block(), 1100, t0);
    let ids: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let id = s.on_hello(n, t0);
            s.on_message(id, Msg::Ready { resumed_blocks: 0 }, t0);
            id
        })
        .collect();
    drain(&mut s, t0);
    for (id, gaps) in ids.iter().zip([vec![1, 2], vec![2, 3], vec![3, 1]]) {
        s.on_message(*id, gap_report(0, gaps), t0);
    }
    let sent = symbols(&drain(&mut s, t0 + Duration::from_millis(1)));
    assert!(sent.iter().all(|(_, esi)| *esi >= 64), "{sent:?}");
    // max shortfall 2 + 0 + ceil(0.1) = 3 fresh repair symbols.
    assert_eq!(sent.len(), 3);
}

mod membership_tests {
    use crate::dataplane::sender::*;
    use crate::image::manifest::BlockInfo;
    use crate::wire::control::Verdict;

    fn manifest() -> Manifest {
        Manifest {
            image_size: 4096,
            image_hash: [9; 32],
            block_size: 4096,
            symbol_size: 1024,
            blocks: vec![BlockInfo {
                hash: [0; 32],
                zero: false,
                wire: crate::image::manifest::Wire::Raw,
            }],
        }
    }

    #[test]
    fn named_members_only_and_a_member_that_never_joins_is_dropped() {
        let t0 = Instant::now();
        let cfg = SenderConfig {
            expected: 1,
            receiver_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let mut s = WaveSender::new(cfg, manifest(), 1100, t0);
        assert!(s.admits("anyone"), "open wave without members");
        s.expect_member("d-1", t0);
        s.expect_member("d-2", t0);
        assert!(s.admits("d-2"));
        assert!(!s.admits("intruder"));
        let a = s.on_hello("d-1", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_tick(t0);
        s.on_message(
            a,
            Msg::Done(Verdict::Verified {
                image_hash: [9; 32],
            }),
            t0,
        );
        s.on_tick(t0 + Duration::from_secs(1));
        assert!(!s.is_finished(), "d-2 is still expected");
        s.on_tick(t0 + Duration::from_secs(6));
        assert_eq!(s.take_dropped().len(), 1);
        s.on_tick(t0 + Duration::from_secs(6));
        assert!(s.is_finished());
    }

    #[test]
    fn rate_ceiling_changes_the_pacing_rate() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(SenderConfig::default(), manifest(), 1100, t0);
        s.set_rate_ceiling(20_000_000, t0);
        assert_eq!(s.current_rate(), 20_000_000);
    }
}

/// Reports stay within the budget whatever the wave's size: the base
/// interval up to 400 receivers (at 20 ms), longer beyond.
#[test]
fn the_report_interval_grows_with_the_wave_past_the_budget() {
    use super::{report_interval, REPORT_BUDGET};
    let base = Duration::from_millis(20);
    assert_eq!(report_interval(base, 8), base);
    assert_eq!(report_interval(base, 400), base);
    assert_eq!(report_interval(base, 1000), Duration::from_millis(50));
    assert_eq!(report_interval(base, 5000), Duration::from_millis(250));
    for n in [1usize, 50, 401, 999, 1000, 4321, 20_000] {
        let per_s = n as f64 / report_interval(base, n).as_secs_f64();
        assert!(per_s <= f64::from(REPORT_BUDGET) + 1.0, "{n}: {per_s}");
    }
}
