//! Lab tool: sends well-formed rackcast data packets signed with a key that
//! is not the wave's, plus malformed datagrams, to a multicast group, so
//! tests can show receivers count and ignore them. Lab use only: refuses
//! groups outside 239.255.0.0/16.

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use rackcast_core::wire::packet::{datagram_len, emit, parse, Header, Kind, HEADER_LEN};

#[derive(Parser)]
#[command(about = "Inject forged and malformed packets into a lab wave")]
struct Args {
    /// Group and port of the wave.
    #[arg(long)]
    group: SocketAddrV4,
    /// Session id to claim (learn it from a captured packet with --sniff).
    #[arg(long)]
    session: Option<u32>,
    /// Learn the session id from the first packet seen on the group.
    #[arg(long)]
    sniff: bool,
    /// Packets to send.
    #[arg(long, default_value_t = 2000)]
    count: u32,
    /// Stop after this many seconds at the latest.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Number of blocks to aim at (block ids 0..blocks).
    #[arg(long, default_value_t = 4)]
    blocks: u32,
    #[arg(long, default_value_t = 1432)]
    symbol_size: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let o = a.group.ip().octets();
    if o[0] != 239 || o[1] != 255 {
        bail!("lab tool: group must be in 239.255.0.0/16");
    }
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let session = match (a.session, a.sniff) {
        (Some(s), _) => s,
        (None, true) => sniff(a.group, deadline)?,
        (None, false) => bail!("need --session or --sniff"),
    };
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_multicast_ttl_v4(1)?;
    let key = [0x5au8; 32];
    let payload: Vec<u8> = (0..a.symbol_size).map(|i| (i * 7) as u8).collect();
    let mut buf = vec![0u8; datagram_len(payload.len())];
    let mut sent = 0u32;
    while sent < a.count && Instant::now() < deadline {
        let h = Header {
            kind: Kind::Symbol,
            session,
            seq: 1_000_000 + sent,
            block: sent % a.blocks.max(1),
            esi: sent % 600,
            payload_len: payload.len() as u16,
        };
        let n = emit(&h, &payload, &key, &mut buf)?;
        sock.send_to(&buf[..n], a.group)?;
        // Every tenth packet also a truncated one.
        if sent % 10 == 0 {
            sock.send_to(&buf[..HEADER_LEN + 3], a.group)?;
        }
        sent += 1;
        if sent % 200 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    println!("forged {sent} packets for session {session:#010x}");
    Ok(())
}

fn sniff(group: SocketAddrV4, deadline: Instant) -> Result<u32> {
    let sock = UdpSocket::bind(group)?;
    sock.join_multicast_v4(group.ip(), &std::net::Ipv4Addr::UNSPECIFIED)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            if let Ok((h, _)) = parse(&buf[..n]) {
                return Ok(h.session);
            }
        }
    }
    bail!("no packet seen on {group}")
}
