//! TFTP packets (RFC 1350, options RFC 2347/2348/2349/7440): one type,
//! `parse` checking every length before reading, `emit` into a buffer.
//!
//! Owns: the packet format only. Must not: do I/O or decide anything.

use thiserror::Error;

/// Read request.
pub const OP_RRQ: u16 = 1;
/// Write request (always refused).
pub const OP_WRQ: u16 = 2;
/// A data block.
pub const OP_DATA: u16 = 3;
/// Acknowledgement of a data block (or of an OACK: block 0).
pub const OP_ACK: u16 = 4;
/// An error; ends the transfer.
pub const OP_ERROR: u16 = 5;
/// Option acknowledgement (RFC 2347).
pub const OP_OACK: u16 = 6;

/// Longest file name, mode, option name or value accepted.
const MAX_FIELD: usize = 255;
const MAX_OPTIONS: usize = 16;

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Read request.
    Rrq {
        /// The file asked for.
        file: String,
        /// `octet` or `netascii`.
        mode: String,
        /// Requested options (blksize, tsize, timeout, windowsize), in order.
        options: Vec<(String, String)>,
    },
    /// Write request.
    Wrq {
        /// The file.
        file: String,
        /// The mode.
        mode: String,
    },
    /// A data block.
    Data {
        /// Block number (wraps).
        block: u16,
        /// Up to the block size; shorter ends the transfer.
        data: Vec<u8>,
    },
    /// Acknowledgement.
    Ack {
        /// The block acknowledged.
        block: u16,
    },
    /// An error.
    Error {
        /// RFC 1350 error code.
        code: u16,
        /// Text for the peer.
        message: String,
    },
    /// The options the server accepted.
    Oack {
        /// Name and value of each.
        options: Vec<(String, String)>,
    },
}

/// Why a TFTP datagram was refused (or could not be written).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TftpWireError {
    /// Shorter than its opcode needs.
    #[error("packet of {0} bytes is too short")]
    Short(usize),
    /// An opcode RFC 1350/2347 does not define.
    #[error("unknown opcode {0}")]
    Opcode(u16),
    /// A string without its terminating zero, longer than 255 bytes, or
    /// not UTF-8.
    #[error("unterminated or overlong string")]
    BadString,
    /// More than 16 options.
    #[error("too many options")]
    TooManyOptions,
    /// `emit`: the packet does not fit the buffer.
    #[error("output buffer too small")]
    Buffer,
}

fn strings(mut b: &[u8]) -> Result<Vec<String>, TftpWireError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == 0)
            .ok_or(TftpWireError::BadString)?;
        if end > MAX_FIELD {
            return Err(TftpWireError::BadString);
        }
        let s = std::str::from_utf8(&b[..end]).map_err(|_| TftpWireError::BadString)?;
        out.push(s.to_string());
        b = &b[end + 1..];
        if out.len() > 2 + 2 * MAX_OPTIONS {
            return Err(TftpWireError::TooManyOptions);
        }
    }
    Ok(out)
}

/// Decode a datagram, checking every length before reading.
pub fn parse(d: &[u8]) -> Result<Packet, TftpWireError> {
    if d.len() < 2 {
        return Err(TftpWireError::Short(d.len()));
    }
    let op = u16::from_be_bytes([d[0], d[1]]);
    let rest = &d[2..];
    match op {
        OP_RRQ | OP_WRQ => {
            let s = strings(rest)?;
            if s.len() < 2 || s.len() % 2 != 0 {
                return Err(TftpWireError::BadString);
            }
            let options = s[2..]
                .chunks(2)
                .map(|p| (p[0].to_ascii_lowercase(), p[1].clone()))
                .collect();
            Ok(if op == OP_RRQ {
                Packet::Rrq {
                    file: s[0].clone(),
                    mode: s[1].to_ascii_lowercase(),
                    options,
                }
            } else {
                Packet::Wrq {
                    file: s[0].clone(),
                    mode: s[1].to_ascii_lowercase(),
                }
            })
        }
        OP_DATA => {
            if rest.len() < 2 {
                return Err(TftpWireError::Short(d.len()));
            }
            Ok(Packet::Data {
                block: u16::from_be_bytes([rest[0], rest[1]]),
                data: rest[2..].to_vec(),
            })
        }
        OP_ACK => {
            if rest.len() < 2 {
                return Err(TftpWireError::Short(d.len()));
            }
            Ok(Packet::Ack {
                block: u16::from_be_bytes([rest[0], rest[1]]),
            })
        }
        OP_ERROR => {
            if rest.len() < 3 {
                return Err(TftpWireError::Short(d.len()));
            }
            let s = strings(&rest[2..])?;
            Ok(Packet::Error {
                code: u16::from_be_bytes([rest[0], rest[1]]),
                message: s.first().cloned().unwrap_or_default(),
            })
        }
        OP_OACK => {
            let s = strings(rest)?;
            if s.len() % 2 != 0 {
                return Err(TftpWireError::BadString);
            }
            Ok(Packet::Oack {
                options: s.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect(),
            })
        }
        other => Err(TftpWireError::Opcode(other)),
    }
}

/// Write `p` into `out`; returns its length.
pub fn emit(p: &Packet, out: &mut Vec<u8>) -> Result<usize, TftpWireError> {
    out.clear();
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    match p {
        Packet::Rrq {
            file,
            mode,
            options,
        } => {
            out.extend_from_slice(&OP_RRQ.to_be_bytes());
            put_str(out, file);
            put_str(out, mode);
            for (k, v) in options {
                put_str(out, k);
                put_str(out, v);
            }
        }
        Packet::Wrq { file, mode } => {
            out.extend_from_slice(&OP_WRQ.to_be_bytes());
            put_str(out, file);
            put_str(out, mode);
        }
        Packet::Data { block, data } => {
            out.extend_from_slice(&OP_DATA.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
            out.extend_from_slice(data);
        }
        Packet::Ack { block } => {
            out.extend_from_slice(&OP_ACK.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
        }
        Packet::Error { code, message } => {
            out.extend_from_slice(&OP_ERROR.to_be_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            put_str(out, message);
        }
        Packet::Oack { options } => {
            out.extend_from_slice(&OP_OACK.to_be_bytes());
            for (k, v) in options {
                put_str(out, k);
                put_str(out, v);
            }
        }
    }
    Ok(out.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixtures() {
        let rrq = b"\x00\x01pxelinux.0\x00octet\x00blksize\x001428\x00tsize\x000\x00";
        assert_eq!(
            parse(rrq).unwrap(),
            Packet::Rrq {
                file: "pxelinux.0".into(),
                mode: "octet".into(),
                options: vec![
                    ("blksize".into(), "1428".into()),
                    ("tsize".into(), "0".into())
                ],
            }
        );
        assert_eq!(
            parse(b"\x00\x04\x00\x07").unwrap(),
            Packet::Ack { block: 7 }
        );
        assert!(parse(b"\x00\x01file\x00oct").is_err(), "unterminated mode");
        assert!(parse(b"\x00\x04\x00").is_err());
        assert!(parse(b"\x00\x09xx").is_err());
        assert!(parse(b"\x00").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(file in "[a-z0-9./_-]{1,40}", block in any::<u16>(), data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = Vec::new();
            for p in [
                Packet::Rrq { file: file.clone(), mode: "octet".into(), options: vec![("blksize".into(), "512".into())] },
                Packet::Wrq { file: file.clone(), mode: "octet".into() },
                Packet::Data { block, data: data.clone() },
                Packet::Ack { block },
                Packet::Error { code: 1, message: file.clone() },
                Packet::Oack { options: vec![("tsize".into(), "10".into())] },
            ] {
                emit(&p, &mut buf).unwrap();
                prop_assert_eq!(parse(&buf).unwrap(), p);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&bytes);
        }
    }
}
