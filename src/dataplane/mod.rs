//! The multicast data plane: one image to every receiver of a wave at once.
//!
//! `sender` and `receiver` are sans-IO cores (events and `now` in, actions
//! out); `send` and `receive` are their thread/tokio drivers; `net` holds
//! the socket calls and `conn` the control-connection framing.

pub mod coding;
pub mod net;
pub mod receive;
pub mod receiver;
pub mod send;
pub mod sender;
#[cfg(test)]
mod wave_sim;
