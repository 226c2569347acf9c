//! A TFTP read transfer as a sans-IO state machine: option negotiation
//! (blksize, tsize, timeout, windowsize: RFC 2347/2348/2349/7440), sending
//! a window of blocks, ACK handling with block-number rollover, timeouts
//! and retransmission.
//!
//! Owns: which block goes next and when a transfer has ended. Must not:
//! read files or touch sockets; the driver (`tftp_server`) reads the bytes
//! each [`TxAction::SendBlock`] names and sends them. Duplicate ACKs never
//! trigger a resend (no Sorcerer's Apprentice syndrome): only a timeout does.

use crate::workflow::Millis;

/// What a transfer may negotiate, and how long it waits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `blksize` granted.
    pub max_blksize: usize,
    /// Largest `windowsize` granted.
    pub max_window: u16,
    /// Resends of a window before the transfer fails.
    pub retries: u32,
    /// Timeout when the client asks for none.
    pub default_timeout_ms: Millis,
    /// Longest `timeout` option acknowledged (RFC 2349: one asked for
    /// beyond it is not acknowledged, and the default applies), so a
    /// stalled transfer ends within `retries` x this.
    pub max_timeout_ms: Millis,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blksize: 1468,
            max_window: 64,
            retries: 5,
            default_timeout_ms: 1000,
            max_timeout_ms: 5000,
        }
    }
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxAction {
    /// The accepted options.
    SendOack(Vec<(String, String)>),
    /// Block `block` (1-based, absolute; on the wire modulo 65536): bytes
    /// `offset..offset+len` of the file.
    SendBlock {
        /// Block number.
        block: u64,
        /// Where in the file.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// The last block was acknowledged.
    Finished,
    /// The transfer gave up; send an error with this text.
    Fail(String),
}

/// One read transfer (RRQ), sans-IO: acks and timeouts in, blocks out.
#[derive(Debug)]
pub struct ReadTransfer {
    size: u64,
    blksize: usize,
    window: u64,
    timeout_ms: Millis,
    total: u64,
    acked: u64,
    sent: u64,
    oack_pending: bool,
    last_send: Millis,
    retries: u32,
    limit: u32,
    done: bool,
}

impl ReadTransfer {
    /// Start a read of a `size`-byte file with the client's options.
    pub fn start(
        options: &[(String, String)],
        size: u64,
        lim: &Limits,
        now: Millis,
    ) -> (ReadTransfer, Vec<TxAction>) {
        let mut blksize = 512usize;
        let mut window = 1u64;
        let mut timeout_ms = lim.default_timeout_ms;
        let mut accepted = Vec::new();
        for (k, v) in options {
            let n: Option<u64> = v.parse().ok();
            match (k.as_str(), n) {
                ("blksize", Some(b)) if (8..=65464).contains(&b) => {
                    blksize = (b as usize).min(lim.max_blksize);
                    accepted.push((k.clone(), blksize.to_string()));
                }
                ("windowsize", Some(w)) if (1..=65535).contains(&w) => {
                    window = w.min(u64::from(lim.max_window));
                    accepted.push((k.clone(), window.to_string()));
                }
                ("timeout", Some(t))
                    if (1..=255).contains(&t) && t as Millis * 1000 <= lim.max_timeout_ms =>
                {
                    timeout_ms = t as Millis * 1000;
                    accepted.push((k.clone(), t.to_string()));
                }
                ("tsize", Some(_)) => accepted.push((k.clone(), size.to_string())),
                _ => {} // unknown or invalid: not acknowledged (RFC 2347)
            }
        }
        let mut t = ReadTransfer {
            size,
            blksize,
            window,
            timeout_ms,
            total: size / blksize as u64 + 1,
            acked: 0,
            sent: 0,
            oack_pending: !accepted.is_empty(),
            last_send: now,
            retries: 0,
            limit: lim.retries,
            done: false,
        };
        let acts = if t.oack_pending {
            vec![TxAction::SendOack(accepted)]
        } else {
            t.send_window(now)
        };
        (t, acts)
    }

    /// The negotiated block size.
    pub fn blksize(&self) -> usize {
        self.blksize
    }

    /// Finished or failed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// When `on_timeout` is due.
    pub fn deadline(&self) -> Millis {
        self.last_send + self.timeout_ms
    }

    fn block(&self, b: u64) -> TxAction {
        let offset = (b - 1) * self.blksize as u64;
        let len = self.size.saturating_sub(offset).min(self.blksize as u64) as usize;
        TxAction::SendBlock {
            block: b,
            offset,
            len,
        }
    }

    fn send_window(&mut self, now: Millis) -> Vec<TxAction> {
        let upto = (self.acked + self.window).min(self.total);
        let acts: Vec<TxAction> = (self.acked + 1..=upto).map(|b| self.block(b)).collect();
        self.sent = self.sent.max(upto);
        self.last_send = now;
        acts
    }

    /// An ACK of block `wire` (16-bit, as on the wire).
    pub fn on_ack(&mut self, wire: u16, now: Millis) -> Vec<TxAction> {
        if self.done {
            return Vec::new();
        }
        if self.oack_pending {
            if wire == 0 {
                self.oack_pending = false;
                self.retries = 0;
                return self.send_window(now);
            }
            return Vec::new();
        }
        // Which absolute block does this ACK name? Only blocks already
        // sent and not yet acknowledged count (rollover-safe).
        let delta = u64::from(wire.wrapping_sub(self.acked as u16));
        if delta == 0 || delta > self.sent - self.acked {
            return Vec::new(); // duplicate or stale: wait for the timeout
        }
        self.acked += delta;
        self.retries = 0;
        if self.acked == self.total {
            self.done = true;
            return vec![TxAction::Finished];
        }
        // Window-based: send the next window once the current one is
        // acknowledged (RFC 7440), or fill it as ACKs arrive for window 1.
        if self.acked == self.sent {
            self.send_window(now)
        } else {
            Vec::new()
        }
    }

    /// The deadline passed: resend, or give up after the retries.
    pub fn on_timeout(&mut self, now: Millis) -> Vec<TxAction> {
        if self.done || now < self.deadline() {
            return Vec::new();
        }
        self.retries += 1;
        if self.retries > self.limit {
            self.done = true;
            return vec![TxAction::Fail(format!(
                "no acknowledgement after {} retries",
                self.limit
            ))];
        }
        if self.oack_pending {
            self.last_send = now;
            return Vec::new(); // the driver resends its OACK
        }
        // Resend what is unacknowledged.
        self.sent = self.acked;
        self.send_window(now)
    }

    /// The OACK is not acknowledged yet (the driver resends it).
    pub fn oack_pending(&self) -> bool {
        self.oack_pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn blocks(a: &[TxAction]) -> Vec<u64> {
        a.iter()
            .filter_map(|x| match x {
                TxAction::SendBlock { block, .. } => Some(*block),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plain_rfc1350_lockstep_with_final_short_block() {
        let (mut t, a) = ReadTransfer::start(&[], 1024, &Limits::default(), 0);
        assert_eq!(
            a,
            vec![TxAction::SendBlock {
                block: 1,
                offset: 0,
                len: 512
            }]
        );
        assert_eq!(blocks(&t.on_ack(1, 1)), vec![2]);
        // A file that is a multiple of the block size ends with an empty block.
        assert_eq!(
            t.on_ack(2, 2),
            vec![TxAction::SendBlock {
                block: 3,
                offset: 1024,
                len: 0
            }]
        );
        assert_eq!(t.on_ack(3, 3), vec![TxAction::Finished]);
        assert!(t.is_done());
    }

    #[test]
    fn options_are_negotiated_then_windows_flow() {
        let o = opts(&[
            ("blksize", "1428"),
            ("tsize", "0"),
            ("windowsize", "4"),
            ("bogus", "1"),
        ]);
        let (mut t, a) = ReadTransfer::start(&o, 10_000, &Limits::default(), 0);
        assert_eq!(
            a,
            vec![TxAction::SendOack(opts(&[
                ("blksize", "1428"),
                ("tsize", "10000"),
                ("windowsize", "4")
            ]))]
        );
        assert!(t.on_ack(3, 1).is_empty(), "only ACK 0 answers an OACK");
        assert_eq!(blocks(&t.on_ack(0, 1)), vec![1, 2, 3, 4]);
        // Partial ACK inside the window: wait; full window ACK: next window.
        assert!(t.on_ack(2, 2).is_empty());
        assert_eq!(blocks(&t.on_ack(4, 3)), vec![5, 6, 7, 8]);
        assert_eq!(t.on_ack(8, 4), vec![TxAction::Finished]); // 10000/1428 -> 8 blocks
                                                              // blksize above the limit is capped, below 8 refused.
        let (t, _) = ReadTransfer::start(&opts(&[("blksize", "65464")]), 1, &Limits::default(), 0);
        assert_eq!(t.blksize(), 1468);
        let (t, a) = ReadTransfer::start(&opts(&[("blksize", "4")]), 1, &Limits::default(), 0);
        assert_eq!(t.blksize(), 512);
        assert!(matches!(a[0], TxAction::SendBlock { .. }));
    }

    #[test]
    fn duplicate_acks_do_not_resend_timeouts_do_and_give_up() {
        let (mut t, _) = ReadTransfer::start(&[], 5000, &Limits::default(), 0);
        t.on_ack(1, 10);
        assert!(t.on_ack(1, 20).is_empty(), "duplicate ACK: no resend");
        assert!(t.on_timeout(500).is_empty(), "not due yet");
        assert_eq!(blocks(&t.on_timeout(1_011)), vec![2]);
        for i in 2..=5 {
            assert_eq!(blocks(&t.on_timeout(1_011 + i * 1_001)), vec![2]);
        }
        assert!(matches!(t.on_timeout(10_000)[0], TxAction::Fail(_)));
    }

    /// A `timeout` past the server's bound is not acknowledged (RFC
    /// 2349), so a stalled client cannot hold a transfer for minutes; one
    /// within it is.
    #[test]
    fn long_timeouts_are_not_acknowledged() {
        let lim = Limits::default();
        let (t, acts) =
            ReadTransfer::start(&opts(&[("timeout", "255"), ("tsize", "0")]), 100, &lim, 0);
        assert_eq!(
            acts,
            vec![TxAction::SendOack(vec![("tsize".into(), "100".into())])]
        );
        assert_eq!(t.deadline(), lim.default_timeout_ms);
        let (t, acts) = ReadTransfer::start(&opts(&[("timeout", "3")]), 100, &lim, 0);
        assert_eq!(
            acts,
            vec![TxAction::SendOack(vec![("timeout".into(), "3".into())])]
        );
        assert_eq!(t.deadline(), 3000);
    }

    #[test]
    fn block_numbers_roll_over() {
        // 70,000 blocks of 8 bytes: past 65535 the wire number wraps.
        let lim = Limits {
            max_blksize: 8,
            ..Default::default()
        };
        let (mut t, _) = ReadTransfer::start(&opts(&[("blksize", "8")]), 8 * 70_000, &lim, 0);
        t.on_ack(0, 0);
        for b in 1..=70_000u64 {
            let a = t.on_ack(b as u16, 0);
            if b < 70_000 {
                assert_eq!(blocks(&a), vec![b + 1]);
            }
        }
        assert_eq!(t.on_ack(70_001u64 as u16, 0), vec![TxAction::Finished]);
    }
}
