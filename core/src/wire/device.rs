//! Device control protocol (TCP, one connection per device): the agent's
//! hello, commands and their results, bundle and blob downloads.
//!
//! Owns: the message sets in both directions, their encoding (postcard in
//! a length-delimited frame of at most [`MAX_FRAME`] bytes) and the checks
//! of everything that came off the wire (lengths, counts, version). Must
//! not: do I/O (see `io::conn`) or decide anything.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{AgentMode, Command, OpRecord, Outcome, StepData};

/// Spoken in `Hello`/`Welcome`. 3: over TLS (the appliance's key is the
/// certificate's), a per-boot device credential in `Hello`/`Welcome`,
/// bundle signatures bound to device and boot. 4: plans name disks by
/// serial and size (bundle version 2).
pub const DEVICE_PROTOCOL: u16 = 5;
/// Largest frame either side accepts once the peer is known.
pub const MAX_FRAME: usize = 4 << 20;
/// Largest first frame (`Hello`) the appliance accepts from a peer it does
/// not know yet: an anonymous connection cannot make it reserve more.
pub const HELLO_MAX_FRAME: usize = 1024;
/// A device credential: 32 random bytes, issued per boot.
pub const CREDENTIAL_LEN: usize = 32;
/// Blob bytes per `BlobChunk`. Small on purpose: a connection's write
/// buffer keeps the capacity of the largest frame it ever sent, and an
/// appliance holds a thousand connections.
pub const BLOB_CHUNK: usize = 64 << 10;
const MAX_ID: usize = 128;
const MAX_OPS: usize = 1024;
const MAX_DETAIL: usize = 64 << 10;

/// Agent to appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// The first message of every connection.
    Hello {
        /// [`DEVICE_PROTOCOL`].
        protocol: u16,
        /// Boot interface MAC: the device's identity before it has an id.
        mac: String,
        /// The id the appliance gave it before (reconnects, the bundle's
        /// agent).
        device_id: Option<String>,
        /// Loader or bundle agent.
        mode: AgentMode,
        /// The credential this boot was issued (none at a boot's first
        /// contact: `Welcome` then carries one).
        credential: Option<[u8; CREDENTIAL_LEN]>,
    },
    /// The result of a command, resent until acknowledged.
    Report {
        /// The command it answers.
        cmd_id: u64,
        /// Done or failed.
        outcome: Outcome,
        /// What the step hands back (inventory, written image hash).
        data: StepData,
        /// Every operation performed, for the device's log.
        ops: Vec<OpRecord>,
    },
    /// Ask for the bundle with this address.
    GetBundle {
        /// BLAKE3, hex.
        hash: String,
    },
    /// Ask for a blob's bytes from `offset` on (one chunk answers).
    GetBlob {
        /// BLAKE3, hex.
        hash: String,
        /// Where the chunk starts.
        offset: u64,
    },
    /// Keep-alive; answered with `Pong`.
    Ping,
    /// Operations of the running command so far, sent before something
    /// that may end this agent (a BMC reset of its own machine): logged at
    /// once, not repeated in the final report.
    Progress {
        /// The running command.
        cmd_id: u64,
        /// Operations so far.
        ops: Vec<OpRecord>,
    },
}

/// Appliance to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplianceMsg {
    /// The answer to `Hello`.
    Welcome {
        /// [`DEVICE_PROTOCOL`].
        protocol: u16,
        /// The device's id from now on.
        device_id: String,
        /// The device's boot number: bundle signatures are bound to it.
        boot: u64,
        /// A new credential, issued at this boot's first contact: the agent
        /// presents it on every later connection (and to waves). `None`
        /// when the agent presented the current one.
        credential: Option<[u8; CREDENTIAL_LEN]>,
    },
    /// Do this for the step in progress.
    Run(Command),
    /// The result of `cmd_id` is durably recorded; the agent may forget it.
    Ack {
        /// The command whose report is recorded.
        cmd_id: u64,
    },
    /// The bundle asked for (`GetBundle`).
    Bundle {
        /// Its address.
        hash: String,
        /// Its canonical bytes.
        // Bytes, not a sequence of u8: one copy instead of a loop.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Ed25519 signature by the appliance's key (the one its TLS
        /// certificate proved) over `hash`, the device id and its boot.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Part of a blob asked for (`GetBlob`).
    BlobChunk {
        /// The blob's address.
        hash: String,
        /// Where this chunk starts.
        offset: u64,
        /// The blob's whole size.
        total: u64,
        /// At most [`BLOB_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The answer to `Ping`.
    Pong,
    /// The request cannot be served; the text says why.
    Error {
        /// What went wrong.
        message: String,
    },
    /// The device's installation is complete: the agent may exit.
    Finished {
        /// What the appliance recorded.
        detail: String,
    },
}

/// Why a device-protocol frame was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceWireError {
    /// Longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversize(usize),
    /// Does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Decodes, but a field is out of bounds (a MAC, a hash, a length).
    #[error("invalid message: {0}")]
    Invalid(String),
}

fn check_len(what: &str, s: &str, max: usize) -> Result<(), DeviceWireError> {
    if s.len() > max {
        return Err(DeviceWireError::Invalid(format!(
            "{what} is {} bytes (max {max})",
            s.len()
        )));
    }
    Ok(())
}

fn check_hash(h: &str) -> Result<(), DeviceWireError> {
    if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(DeviceWireError::Invalid(
            "hash must be 64 hex digits (BLAKE3)".into(),
        ));
    }
    Ok(())
}

fn check_ops(ops: &[OpRecord]) -> Result<(), DeviceWireError> {
    if ops.len() > MAX_OPS {
        return Err(DeviceWireError::Invalid(format!(
            "{} op records (max {MAX_OPS})",
            ops.len()
        )));
    }
    for op in ops {
        check_len("op name", &op.op, MAX_ID * 4)?;
        check_len("op detail", &op.detail, MAX_DETAIL)?;
    }
    Ok(())
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

impl AgentMsg {
    /// Decode and check a frame from an agent.
    pub fn parse(frame: &[u8]) -> Result<AgentMsg, DeviceWireError> {
        let m: AgentMsg = decode(frame)?;
        m.validate()?;
        Ok(m)
    }

    /// Encode for a frame.
    pub fn emit(&self) -> Result<Vec<u8>, DeviceWireError> {
        encode(self)
    }

    fn validate(&self) -> Result<(), DeviceWireError> {
        match self {
            AgentMsg::Hello {
                mac,
                device_id,
                mode,
                ..
            } => {
                if !valid_mac(mac) {
                    return Err(DeviceWireError::Invalid(format!(
                        "MAC {:?} is not aa:bb:cc:dd:ee:ff",
                        mac.chars().take(40).collect::<String>()
                    )));
                }
                if let Some(id) = device_id {
                    check_len("device id", id, MAX_ID)?;
                }
                if let AgentMode::Agent { bundle } = mode {
                    check_hash(bundle)?;
                }
                Ok(())
            }
            AgentMsg::Progress { ops, .. } => check_ops(ops),
            AgentMsg::Report { outcome, ops, .. } => {
                check_ops(ops)?;
                match outcome {
                    Outcome::Ok { detail } => check_len("detail", detail, MAX_DETAIL),
                    Outcome::Failed { reason } => check_len("reason", reason, MAX_DETAIL),
                }
            }
            AgentMsg::GetBundle { hash } | AgentMsg::GetBlob { hash, .. } => check_hash(hash),
            AgentMsg::Ping => Ok(()),
        }
    }
}

impl ApplianceMsg {
    /// Decode and check a frame from the appliance.
    pub fn parse(frame: &[u8]) -> Result<ApplianceMsg, DeviceWireError> {
        let m: ApplianceMsg = decode(frame)?;
        match &m {
            ApplianceMsg::BlobChunk {
                offset,
                total,
                data,
                ..
            } if data.len() > BLOB_CHUNK || offset.saturating_add(data.len() as u64) > *total => {
                return Err(DeviceWireError::Invalid("blob chunk out of range".into()));
            }
            ApplianceMsg::Welcome { device_id, .. } => check_len("device id", device_id, MAX_ID)?,
            ApplianceMsg::Bundle {
                hash, signature, ..
            } => {
                check_hash(hash)?;
                if !signature.is_empty() && signature.len() != crate::signing::SIGNATURE_LEN {
                    return Err(DeviceWireError::Invalid(format!(
                        "bundle signature of {} bytes",
                        signature.len()
                    )));
                }
            }
            _ => {}
        }
        Ok(m)
    }

    /// Encode for a frame.
    pub fn emit(&self) -> Result<Vec<u8>, DeviceWireError> {
        encode(self)
    }
}

fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, DeviceWireError> {
    if frame.len() > MAX_FRAME {
        return Err(DeviceWireError::Oversize(frame.len()));
    }
    postcard::from_bytes(frame).map_err(|e| DeviceWireError::Malformed(e.to_string()))
}

fn encode<T: Serialize>(m: &T) -> Result<Vec<u8>, DeviceWireError> {
    let v = postcard::to_stdvec(m).map_err(|e| DeviceWireError::Malformed(e.to_string()))?;
    if v.len() > MAX_FRAME {
        return Err(DeviceWireError::Oversize(v.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Step, Work};
    use proptest::prelude::*;

    fn hello() -> AgentMsg {
        AgentMsg::Hello {
            protocol: DEVICE_PROTOCOL,
            mac: "02:00:00:00:00:01".into(),
            device_id: None,
            mode: AgentMode::Loader { os_present: false },
            credential: Some([4; CREDENTIAL_LEN]),
        }
    }

    #[test]
    fn fixtures_round_trip() {
        let msgs = vec![
            hello(),
            AgentMsg::Report {
                cmd_id: 3,
                outcome: Outcome::Failed {
                    reason: "exit 2".into(),
                },
                data: StepData::ImageWritten {
                    hash: "ab".into(),
                    bytes: 5,
                },
                ops: vec![OpRecord {
                    op: "bios".into(),
                    ok: false,
                    exit_code: Some(2),
                    duration_ms: 10,
                    detail: "refused".into(),
                }],
            },
            AgentMsg::GetBlob {
                hash: "a".repeat(64),
                offset: 1 << 20,
            },
            AgentMsg::Ping,
            AgentMsg::Progress {
                cmd_id: 4,
                ops: vec![OpRecord {
                    op: "bios-apply".into(),
                    ok: true,
                    exit_code: None,
                    duration_ms: 2,
                    detail: "POST reset".into(),
                }],
            },
        ];
        for m in msgs {
            assert_eq!(AgentMsg::parse(&m.emit().unwrap()).unwrap(), m);
        }
        for r in [
            ApplianceMsg::Run(Command {
                cmd_id: 9,
                step: Step::Inventoried,
                work: Work::Inventory,
            }),
            ApplianceMsg::Welcome {
                protocol: DEVICE_PROTOCOL,
                device_id: "rc-1".into(),
                boot: 3,
                credential: Some([3; CREDENTIAL_LEN]),
            },
            ApplianceMsg::Bundle {
                hash: "b".repeat(64),
                bytes: vec![1, 2, 3],
                signature: vec![9; 64],
            },
        ] {
            assert_eq!(ApplianceMsg::parse(&r.emit().unwrap()).unwrap(), r);
        }
    }

    #[test]
    fn invalid_input_is_refused() {
        let bad_mac = AgentMsg::Hello {
            protocol: 1,
            mac: "zz".into(),
            device_id: None,
            mode: AgentMode::Loader { os_present: false },
            credential: None,
        };
        assert!(matches!(
            AgentMsg::parse(&postcard::to_stdvec(&bad_mac).unwrap()),
            Err(DeviceWireError::Invalid(_))
        ));
        let bad_hash = AgentMsg::GetBundle {
            hash: "../etc/passwd".into(),
        };
        assert!(AgentMsg::parse(&postcard::to_stdvec(&bad_hash).unwrap()).is_err());
        assert!(AgentMsg::parse(&[0xff; 9]).is_err());
        assert!(AgentMsg::parse(&[]).is_err());
        let chunk = ApplianceMsg::BlobChunk {
            hash: "a".repeat(64),
            offset: 10,
            total: 12,
            data: vec![0; 5],
        };
        assert!(ApplianceMsg::parse(&postcard::to_stdvec(&chunk).unwrap()).is_err());
        let long_id = ApplianceMsg::Welcome {
            protocol: DEVICE_PROTOCOL,
            device_id: "r".repeat(MAX_ID + 1),
            boot: 1,
            credential: None,
        };
        assert!(ApplianceMsg::parse(&postcard::to_stdvec(&long_id).unwrap()).is_err());
        let long_sig = ApplianceMsg::Bundle {
            hash: "b".repeat(64),
            bytes: vec![],
            signature: vec![9; 65],
        };
        assert!(ApplianceMsg::parse(&postcard::to_stdvec(&long_sig).unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentMsg::parse(&bytes);
            let _ = ApplianceMsg::parse(&bytes);
        }

        #[test]
        fn every_truncation_of_a_valid_hello_is_refused_or_valid(cut in 0usize..40) {
            let b = hello().emit().unwrap();
            let cut = cut.min(b.len());
            if let Ok(m) = AgentMsg::parse(&b[..cut]) {
                prop_assert!(m.validate().is_ok());
            }
        }

        #[test]
        fn reports_round_trip(cmd in any::<u64>(), detail in ".{0,200}", code in any::<Option<i32>>()) {
            let m = AgentMsg::Report {
                cmd_id: cmd,
                outcome: Outcome::Ok { detail: detail.clone() },
                data: StepData::None,
                ops: vec![OpRecord { op: "x".into(), ok: true, exit_code: code, duration_ms: 1, detail }],
            };
            prop_assert_eq!(AgentMsg::parse(&m.emit().unwrap()).unwrap(), m);
        }
    }
}
