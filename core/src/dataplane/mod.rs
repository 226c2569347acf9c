//! The multicast data plane's sans-IO cores: one image to every receiver
//! of a wave at once.
//!
//! Owns: the wave sender core ([`sender`]: membership, per-block state,
//! repair planning, the send schedule), the rendering of its transmits
//! into datagram bytes ([`render`], shared by the real driver and the
//! simulation), the receiver core ([`receiver`]), the XOR coding of coded
//! resends ([`coding`]) and the rate controller ([`pacing`]). Must not:
//! touch sockets, threads or clocks; `crate::io::{send, receive}` drive
//! these cores with events and `now`.

pub mod coding;
pub mod pacing;
pub mod receiver;
pub mod render;
pub mod sender;
/// Whole-wave simulation on a simulated clock (tests, and the
/// `wave-sim` scaling tool with the `sim` feature).
#[cfg(any(test, feature = "sim"))]
pub mod sim;
