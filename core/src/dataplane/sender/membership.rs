//! Wave membership: who may join (named members, or anyone for the CLI),
//! hellos and reconnects under the same name, verdicts, failures, and the
//! set of live receivers a coded-resend plan waits for.
//!
//! Owns: [`ReceiverInfo`] state changes and the `members`/`dropped` lists.
//! Must not: decide what is sent (the schedule and repair planning do).

use std::collections::BTreeMap;
use std::time::Instant;

use super::{
    Action, ReceiverInfo, RxState, WaveSender, MIN_STALE, STALE_REPORTS, WAIT_SET_MAX_AGE,
};
use crate::wire::control::{Msg, Status, Verdict};

impl WaveSender {
    /// Restrict the wave to named members and expect `name` (a device the
    /// scheduler put in this wave; late members join a running wave). The
    /// wave does not end while an expected member has not connected, until
    /// the receiver timeout drops it.
    pub fn expect_member(&mut self, name: &str, now: Instant) {
        let members = self.members.get_or_insert_with(BTreeMap::new);
        members.entry(name.to_string()).or_insert(now);
    }

    /// Whether `name` may join.
    pub fn admits(&self, name: &str) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains_key(name))
    }

    /// Members dropped because they never connected, since the last call.
    pub fn take_dropped(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.dropped)
    }

    /// Expected members with no connection yet. O(members + receivers):
    /// it runs on every tick of a long wave, and a walk of the receivers
    /// per member was a million name comparisons per tick at 1,000.
    pub(super) fn pending_members(&self) -> usize {
        self.members.as_ref().map_or(0, |m| {
            let connected = self.receiver_names();
            m.keys().filter(|n| !connected.contains(n.as_str())).count()
        })
    }

    /// The names of the receivers that said hello (any state).
    fn receiver_names(&self) -> std::collections::HashSet<&str> {
        self.receivers.values().map(|r| r.name.as_str()).collect()
    }

    /// A receiver said hello; returns its id. A known name whose receiver
    /// is gone (disconnected or finished) takes its old slot back: a
    /// restarted device. A known name that still looks connected is a
    /// device that came back before its old connection timed out (power
    /// cycle): the newest connection wins, the old one is told and closed.
    pub fn on_hello(&mut self, name: &str, now: Instant) -> u32 {
        let existing = self
            .receivers
            .iter()
            .find(|(_, r)| r.name == name)
            .map(|(id, r)| (*id, r.state.clone()));
        let next_id = self.receivers.keys().next_back().map_or(1, |k| k + 1);
        let id = match existing {
            Some((old, RxState::Joining | RxState::Ready)) => {
                tracing::warn!(
                    receiver = old,
                    name,
                    "same name connected again; replacing the old connection"
                );
                self.receivers.remove(&old);
                self.actions.push_back(Action::Control(
                    old,
                    Msg::Finish {
                        reason: "replaced by a newer connection with the same name".into(),
                    },
                ));
                self.actions.push_back(Action::Disconnect(old));
                next_id
            }
            Some((old, _)) => old,
            None => next_id,
        };
        let info = ReceiverInfo {
            name: name.to_string(),
            state: RxState::Joining,
            joined_at: now,
            ended_at: None,
            resumed_blocks: 0,
            last_heard: now,
            status: Status::default(),
            loss: 0.0,
            behind: false,
            fell_behind: false,
            interval_loss: 0.0,
            loss_samples: 0,
            prev_received: 0,
            prev_expected: 0,
        };
        tracing::info!(
            receiver = id,
            name,
            reconnect = existing.is_some(),
            "receiver connected"
        );
        self.receivers.insert(id, info);
        id
    }

    /// A control message from receiver `id`.
    pub fn on_message(&mut self, id: u32, msg: Msg, now: Instant) {
        let Some(rx) = self.receivers.get_mut(&id) else {
            return;
        };
        rx.last_heard = now;
        if !matches!(msg, Msg::Status(_)) {
            // Ready, a verdict or an error: who a plan waits for changes.
            self.wait_for.0 = None;
        }
        match msg {
            Msg::Ready { resumed_blocks } => {
                // A receiver with blocks in place reports its status just
                // before Ready (which already made it ready).
                if matches!(rx.state, RxState::Joining | RxState::Ready) {
                    rx.state = RxState::Ready;
                    rx.resumed_blocks = resumed_blocks;
                }
            }
            Msg::Status(st) => self.on_status(id, st, now),
            Msg::Done(v) => {
                rx.ended_at = Some(now);
                rx.state = match v {
                    Verdict::Verified { image_hash } if image_hash == self.manifest.image_hash => {
                        RxState::Verified
                    }
                    Verdict::Verified { .. } => {
                        RxState::Failed("reported a hash that is not the manifest's".into())
                    }
                    Verdict::Failed { reason } => RxState::Failed(reason),
                };
                tracing::info!(receiver = id, state = ?rx.state, "receiver finished");
                self.actions.push_back(Action::Control(
                    id,
                    Msg::Finish {
                        reason: "verdict received".into(),
                    },
                ));
                self.actions.push_back(Action::Disconnect(id));
            }
            Msg::Error { message } => {
                self.fail(id, format!("receiver error: {message}"), now);
            }
            // A receiver has no business sending these.
            Msg::Hello { .. } | Msg::Welcome { .. } | Msg::Finish { .. } | Msg::Coded { .. } => {
                self.fail(id, "unexpected message from receiver".into(), now);
            }
        }
        self.maybe_start(now);
        self.maybe_finish(now);
    }

    /// Receiver `id`'s connection closed; it may come back under its name.
    pub fn on_disconnect(&mut self, id: u32, now: Instant) {
        if let Some(rx) = self.receivers.get_mut(&id) {
            if !rx.state.terminal() {
                tracing::warn!(receiver = id, name = %rx.name, "receiver connection lost");
                rx.state = RxState::Disconnected { since: now };
            }
        }
        // Who a plan waits for changed: rebuilt at the next plan.
        self.wait_for.0 = None;
        self.maybe_finish(now);
    }

    pub(super) fn fail(&mut self, id: u32, reason: String, now: Instant) {
        if let Some(rx) = self.receivers.get_mut(&id) {
            if rx.state.terminal() {
                return;
            }
            tracing::warn!(receiver = id, name = %rx.name, %reason, "receiver dropped");
            rx.state = RxState::Failed(reason.clone());
            rx.ended_at = Some(now);
            self.wait_for.0 = None;
            self.actions
                .push_back(Action::Control(id, Msg::Finish { reason }));
            self.actions.push_back(Action::Disconnect(id));
        }
    }

    pub(super) fn wait_set_fresh(&self, now: Instant) -> bool {
        self.wait_for
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < WAIT_SET_MAX_AGE)
    }

    /// Every ready receiver already reported `b` complete (resumed
    /// receivers): its source symbols would help nobody.
    pub(super) fn all_ready_have(&self, b: u32) -> bool {
        let mut any = false;
        for r in self.receivers.values() {
            match r.state {
                RxState::Ready | RxState::Joining | RxState::Disconnected { .. } => {
                    // Nothing heard about its blocks yet (no packet, no
                    // resume, no report of blocks in place): it needs all.
                    if !r.status.seen_any && r.resumed_blocks == 0 && r.status.blocks_done == 0 {
                        return false;
                    }
                    if status_needs(&r.status, b) || r.status.blocks_done == 0 {
                        return false;
                    }
                    any = true;
                }
                _ => {}
            }
        }
        any
    }

    /// Recompute the receivers a plan waits for: ready, receiving, and
    /// reporting within the stale limit.
    pub(super) fn refresh_wait_set(&mut self, now: Instant) {
        let stale = (self.cfg.feedback * STALE_REPORTS).max(MIN_STALE);
        // A receiver that still has not seen a packet well after it
        // joined will need every block anyway: pairing it gains
        // nothing, waiting for it costs.
        let ids = self
            .receivers
            .iter()
            .filter(|(_, r)| {
                r.state == RxState::Ready
                    && !r.behind
                    && (r.status.seen_any || now.saturating_duration_since(r.joined_at) < stale)
                    && now.saturating_duration_since(r.last_heard) < stale
            })
            .map(|(id, _)| *id)
            .collect();
        self.wait_for = (Some(now), ids);
    }

    /// Fail receivers silent (or disconnected) past the receiver timeout,
    /// and drop named members that never connected within it.
    pub(super) fn expire_receivers(&mut self, now: Instant) {
        let timeout = self.cfg.receiver_timeout;
        let stale: Vec<u32> = self
            .receivers
            .iter()
            .filter(|(_, r)| !r.state.terminal())
            .filter(|(_, r)| match r.state {
                RxState::Disconnected { since } => now.saturating_duration_since(since) >= timeout,
                _ => now.saturating_duration_since(r.last_heard) >= timeout,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.fail(id, format!("no report for {} s", timeout.as_secs()), now);
        }
        if let Some(members) = &self.members {
            let overdue: Vec<&String> = members
                .iter()
                .filter(|(_, since)| now.saturating_duration_since(**since) >= timeout)
                .map(|(n, _)| n)
                .collect();
            if overdue.is_empty() {
                return;
            }
            let connected = self.receiver_names();
            let never: Vec<String> = overdue
                .into_iter()
                .filter(|n| !connected.contains(n.as_str()))
                .cloned()
                .collect();
            let Some(members) = &mut self.members else {
                return;
            };
            for n in never {
                members.remove(&n);
                tracing::warn!(name = %n, "wave member never connected; dropped");
                self.dropped
                    .push((n, format!("never joined within {} s", timeout.as_secs())));
            }
        }
    }
}

fn status_needs(st: &Status, b: u32) -> bool {
    st.partial.iter().any(|(x, _)| *x == b)
        || st.missing.iter().any(|(f, l)| b >= *f && (b - f) < *l)
}
