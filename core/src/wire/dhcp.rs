//! DHCP datagrams off the wire, checked before dhcproto sees them.
//!
//! dhcproto's option decoder asserts on some option lengths and unwraps a
//! route prefix (a crafted datagram panics it, debug and release). So, as
//! with raptorq's packet deserializer, raw bytes never reach it: [`parse`]
//! checks the BOOTP header and the magic cookie, walks the options checking
//! every length against the datagram, keeps only the options a boot server
//! reads (each with a length valid for it) and hands dhcproto that rebuilt
//! datagram. Must not: decide anything about the request.

use dhcproto::v4::{Decodable, Decoder, Encodable, Encoder, Message};
use thiserror::Error;

/// BOOTP fixed header (236 bytes) + magic cookie.
const HEADER: usize = 240;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Largest datagram considered (a full Ethernet frame's payload).
pub const MAX_DATAGRAM: usize = 1500;

/// Why a DHCP datagram was dropped (each kind has its own counter).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DhcpWireError {
    /// Shorter than the fixed header and cookie.
    #[error("datagram of {0} bytes is shorter than a DHCP header")]
    Short(usize),
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes is larger than {MAX_DATAGRAM}")]
    Long(usize),
    /// Not DHCP (BOOTP without the cookie).
    #[error("no DHCP magic cookie")]
    NoCookie,
    /// `hlen` beyond the 16-byte `chaddr` field.
    #[error("hardware address length {0} > 16")]
    BadHlen(u8),
    /// An option's length runs past the datagram.
    #[error("option {code} runs past the end of the datagram")]
    Truncated {
        /// The option.
        code: u8,
    },
    /// An option whose length its type does not allow.
    #[error("option {code} has invalid length {len}")]
    BadLength {
        /// The option.
        code: u8,
        /// Its length.
        len: usize,
    },
    /// Option 53 missing.
    #[error("no DHCP message type")]
    NoType,
    /// The decoder refused it.
    #[error("malformed: {0}")]
    Decode(String),
}

/// Length rule of each option a boot server reads; others are dropped.
fn allowed(code: u8, len: usize) -> Option<bool> {
    Some(match code {
        53 => len == 1,                           // message type
        50 | 54 | 51 => len == 4,                 // requested ip, server id, lease time
        57 => len == 2,                           // max message size
        93 => len >= 2 && len % 2 == 0,           // client architectures (first used)
        97 => (1..=32).contains(&len),            // client machine id (UUID)
        60 | 61 | 77 | 12 | 55 | 175 => len >= 1, // class id, client id, user class, host name, PRL, iPXE
        _ => return None,
    })
}

/// Check `d` and decode what a boot server needs of it.
pub fn parse(d: &[u8]) -> Result<Message, DhcpWireError> {
    if d.len() < HEADER {
        return Err(DhcpWireError::Short(d.len()));
    }
    if d.len() > MAX_DATAGRAM {
        return Err(DhcpWireError::Long(d.len()));
    }
    if d[236..240] != COOKIE {
        return Err(DhcpWireError::NoCookie);
    }
    if d[2] > 16 {
        return Err(DhcpWireError::BadHlen(d[2]));
    }
    let mut clean = d[..HEADER].to_vec();
    let mut i = HEADER;
    let mut has_type = false;
    while i < d.len() {
        let code = d[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = d.get(i + 1) else {
            return Err(DhcpWireError::Truncated { code });
        };
        let len = len as usize;
        let Some(body) = d.get(i + 2..i + 2 + len) else {
            return Err(DhcpWireError::Truncated { code });
        };
        match allowed(code, len) {
            Some(true) => {
                // Only the first architecture of option 93 is used.
                let body = if code == 93 { &body[..2] } else { body };
                clean.push(code);
                clean.push(body.len() as u8);
                clean.extend_from_slice(body);
                has_type |= code == 53;
            }
            Some(false) => return Err(DhcpWireError::BadLength { code, len }),
            None => {} // not read by a boot server: dropped
        }
        i += 2 + len;
    }
    if !has_type {
        return Err(DhcpWireError::NoType);
    }
    clean.push(255);
    Message::decode(&mut Decoder::new(&clean)).map_err(|e| DhcpWireError::Decode(e.to_string()))
}

/// Encode a reply.
pub fn emit(m: &Message) -> Result<Vec<u8>, DhcpWireError> {
    let mut buf = Vec::with_capacity(576);
    m.encode(&mut Encoder::new(&mut buf))
        .map_err(|e| DhcpWireError::Decode(e.to_string()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn discover() -> Vec<u8> {
        let mut m = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[2, 0, 0, 0, 0, 1],
        );
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        m.opts_mut().insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00007".to_vec(),
        ));
        emit(&m).unwrap()
    }

    #[test]
    fn valid_discover_parses() {
        let m = parse(&discover()).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(m.xid(), 7);
    }

    #[test]
    fn what_panics_dhcproto_is_refused_or_dropped() {
        let mut d = discover();
        d.pop(); // end
                 // Classless static route with prefix 99: dhcproto unwraps it.
        d.extend_from_slice(&[121, 5, 99, 10, 0, 0, 1, 255]);
        let m = parse(&d).unwrap();
        assert!(m
            .opts()
            .get(dhcproto::v4::OptionCode::ClasslessStaticRoute)
            .is_none());
        let mut d = discover();
        d.pop();
        d.extend_from_slice(&[54, 3, 1, 2, 3, 255]);
        assert_eq!(
            parse(&d).unwrap_err(),
            DhcpWireError::BadLength { code: 54, len: 3 }
        );
        let mut d = discover();
        d.pop();
        d.extend_from_slice(&[60, 40, 1]);
        assert_eq!(
            parse(&d).unwrap_err(),
            DhcpWireError::Truncated { code: 60 }
        );
        assert_eq!(
            parse(&discover()[..100]).unwrap_err(),
            DhcpWireError::Short(100)
        );
        let mut d = discover();
        d[236] = 0;
        assert_eq!(parse(&d).unwrap_err(), DhcpWireError::NoCookie);
        let mut d = discover();
        d[2] = 200;
        assert_eq!(parse(&d).unwrap_err(), DhcpWireError::BadHlen(200));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn garbled_options_never_panic(opts in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut d = discover();
            d.truncate(240);
            d.extend_from_slice(&opts);
            let _ = parse(&d);
        }

        #[test]
        fn every_truncation_is_refused_or_whole(cut in 0usize..400) {
            let d = discover();
            let cut = cut.min(d.len());
            if let Ok(m) = parse(&d[..cut]) {
                prop_assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
            }
        }
    }
}
