//! Caps on things held at once (connections, transfers), in total and per
//! source address, released when what holds them is dropped.
//!
//! Owns: the counts. Must not: decide what is refused beyond the count
//! (callers answer, count and log the refusal).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// A cap in total and per source.
#[derive(Clone)]
pub struct Caps {
    state: Arc<Mutex<State>>,
    total: usize,
    per_source: u32,
}

#[derive(Default)]
struct State {
    active: usize,
    by_source: HashMap<IpAddr, u32>,
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every slot is taken.
    Total,
    /// This source holds its share.
    Source,
}

impl Full {
    /// For logs and refusals.
    pub fn reason(self) -> &'static str {
        match self {
            Full::Total => "too many at once",
            Full::Source => "too many from this address",
        }
    }
}

/// One held place; given back on drop.
pub struct Slot {
    caps: Caps,
    ip: IpAddr,
}

impl Caps {
    /// At most `total` at once, `per_source` of them from one address.
    pub fn new(total: usize, per_source: u32) -> Caps {
        Caps {
            state: Arc::new(Mutex::new(State::default())),
            total,
            per_source,
        }
    }

    /// A place for `ip`, if there is one.
    pub fn take(&self, ip: IpAddr) -> Result<Slot, Full> {
        let mut st = self.state.lock().map_err(|_| Full::Total)?;
        if st.active >= self.total {
            return Err(Full::Total);
        }
        let n = st.by_source.entry(ip).or_insert(0);
        if *n >= self.per_source {
            return Err(Full::Source);
        }
        *n += 1;
        st.active += 1;
        Ok(Slot {
            caps: self.clone(),
            ip,
        })
    }

    /// Places held now.
    pub fn active(&self) -> usize {
        self.state.lock().map_or(0, |s| s.active)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut st) = self.caps.state.lock() {
            st.active -= 1;
            if let Some(n) = st.by_source.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    st.by_source.remove(&self.ip);
                }
            }
        }
    }
}

/// Connections a listener's kernel queue holds before they are accepted
/// (the kernel caps it at `net.core.somaxconn`). A wave's members all
/// connect within milliseconds of its start, and each accepted connection
/// then costs a TLS handshake: a queue that overflows drops SYNs, and
/// those members arrive a retransmission (1 s) late.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`,
/// as `TcpListener::bind` sets it).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_total_and_per_source_and_come_back() {
        let caps = Caps::new(3, 2);
        let a: IpAddr = "198.18.0.9".parse().unwrap();
        let b: IpAddr = "198.18.0.10".parse().unwrap();
        let c: IpAddr = "198.18.0.11".parse().unwrap();
        let a1 = caps.take(a).unwrap();
        let _a2 = caps.take(a).unwrap();
        assert_eq!(caps.take(a).err(), Some(Full::Source));
        let _b1 = caps.take(b).unwrap();
        assert_eq!(caps.take(c).err(), Some(Full::Total));
        drop(a1);
        assert_eq!(caps.active(), 2);
        assert!(caps.take(c).is_ok());
        assert_eq!(caps.active(), 2, "the slot above was dropped at once");
    }
}
