//! Golden bytes: every message of every protocol, built from a sample that
//! sets every field (nested model types included), emitted, and compared
//! with the bytes pinned in `golden/*.txt`.
//!
//! Why: the device and control protocols are postcard, which encodes
//! fields by position. A reordered, added or retyped field in a message
//! or in a model type it carries (an `Inventory`, a `Plan`) changes the
//! protocol with no diff under `wire/`. Here it fails a test, and the
//! failure says what to do: bump the protocol version, then re-pin with
//! `RACKCAST_BLESS=1 cargo test -p rackcast-core golden`. Re-pinning is
//! refused while the version is the pinned one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::image::manifest::Manifest;
use crate::model::*;
use crate::wire::control::{self, Msg, SessionParams, Status, Verdict};
use crate::wire::device::{AgentMsg, ApplianceMsg, DEVICE_PROTOCOL};
use crate::wire::packet::{self, Header, Kind};

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Compare `samples` with `golden/<file>`, which starts with
/// `version <n>` and then has one `name hex` line per sample.
fn check(file: &str, version: u16, samples: &[(String, Vec<u8>)]) {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "src/wire/golden", file]
        .iter()
        .collect();
    let mut want = format!("version {version}\n");
    for (name, bytes) in samples {
        let _ = writeln!(want, "{name} {}", hex(bytes));
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have == want {
        return;
    }
    let pinned: Option<u16> = have
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .and_then(|v| v.parse().ok());
    let bless = std::env::var_os("RACKCAST_BLESS").is_some();
    if bless && (pinned.is_none() || pinned < Some(version)) {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let changed: Vec<&str> = want
        .lines()
        .filter(|l| !have.lines().any(|h| h == *l))
        .filter_map(|l| l.split(' ').next())
        .collect();
    panic!(
        "{file}: the encoding changed ({}) while the protocol version is still {version}. \
         Bump the version, then re-pin with RACKCAST_BLESS=1 cargo test -p rackcast-core golden.",
        changed.join(", ")
    );
}

fn inventory() -> Inventory {
    Inventory {
        dmi: Dmi {
            vendor: "Dell Inc.".into(),
            model: "PowerEdge R650".into(),
            serial: "SN1".into(),
            uuid: "u-1".into(),
        },
        cpu: Cpu {
            arch: "x86_64".into(),
            count: 64,
            model: "Xeon".into(),
        },
        memory_bytes: 256 << 30,
        nics: vec![Nic {
            name: "eno1".into(),
            mac: "52:54:00:00:00:01".into(),
            pci_id: Some("8086:1572".into()),
        }],
        disks: vec![Disk {
            name: "sda".into(),
            path: "/dev/sda".into(),
            size_bytes: 480 << 30,
            model: "SSD".into(),
            serial: "D1".into(),
            rotational: false,
        }],
        storage_controllers: vec![StorageController {
            pci_id: "1000:10e2".into(),
            name: "PERC".into(),
        }],
    }
}

fn program(name: &str) -> Program {
    Program {
        name: name.into(),
        argv: vec!["/bin/true".into(), "-x".into()],
        timeout_s: 30,
        env: BTreeMap::from([("K".to_string(), "V".to_string())]),
    }
}

fn bmc() -> RedfishTarget {
    RedfishTarget {
        url: "https://169.254.95.118".into(),
        username: "root".into(),
        password: "pw".into(),
        system: Some("1".into()),
        reset: "ForceRestart".into(),
        tls_verify: false,
        settle_timeout_s: 300,
    }
}

fn bundle() -> Bundle {
    let blob = BlobRef {
        name: "agent".into(),
        hash: "ab".repeat(32),
        size: 1234,
        executable: true,
    };
    Bundle {
        version: BUNDLE_VERSION,
        arch: "x86_64".into(),
        agent: blob.clone(),
        modules: vec![ModuleRef {
            name: "i40e".into(),
            blob,
            load: Some(program("load")),
        }],
        plan: Plan {
            profile: "r650".into(),
            bios: Some(BiosPlan {
                attributes: BTreeMap::from([("BootMode".to_string(), "Uefi".to_string())]),
                redfish: Some(bmc()),
                program: Some(program("bios")),
            }),
            raid: Some(RaidPlan {
                level: "raid1".into(),
                members: vec!["sda".into(), "sdb".into()],
                member_disks: vec![
                    DiskId {
                        serial: "S1".into(),
                        size_bytes: 1 << 40,
                    },
                    DiskId {
                        serial: "S2".into(),
                        size_bytes: 1 << 40,
                    },
                ],
                array: "/dev/md/rackcast".into(),
                wipe: true,
                metadata: "1.2".into(),
                redfish: Some(bmc()),
                drive_rule: Some(DiskRule {
                    order: "largest".into(),
                    count: 2,
                    model: Some("SSD*".into()),
                    ssd: Some(true),
                    min_size_bytes: Some(1 << 30),
                    serial: Some("D*".into()),
                }),
                volume_name: "os".into(),
                program: Some(program("raid")),
            }),
            programs: vec![program("fw")],
            image: ImagePlan {
                name: "debian".into(),
                hash: "cd".repeat(32),
                size: 4 << 30,
                target: "/dev/md/rackcast".into(),
                target_disk: Some(DiskId {
                    serial: "S3".into(),
                    size_bytes: 1 << 41,
                }),
                wipe: true,
            },
            post_install: vec![program("post")],
            boot_to_disk: Some(program("efibootmgr")),
            seed: Some(Seed {
                meta_data: "instance-id: rc-1\nlocal-hostname: web1\n".into(),
                user_data: "#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA]\n".into(),
                network_config: Some("version: 2\n".into()),
            }),
        },
    }
}

fn op() -> OpRecord {
    OpRecord {
        op: "mdadm-create".into(),
        ok: true,
        exit_code: Some(0),
        duration_ms: 1500,
        detail: "created".into(),
    }
}

fn join() -> WaveJoin {
    WaveJoin {
        wave_id: 7,
        control: "198.18.0.1:41000".parse().unwrap(),
        image: "debian".into(),
        image_hash: "cd".repeat(32),
        image_size: 4 << 30,
    }
}

/// Three blocks: one compressed (every field of `Wire::Zstd` pinned),
/// one zero, one raw.
fn manifest() -> Manifest {
    let mut data = vec![0u8; 3 * 4096];
    data[..4096].fill(7);
    data[2 * 4096..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 31 % 251) as u8);
    let m = crate::image::packed::pack(
        &data[..],
        data.len() as u64,
        4096,
        1024,
        crate::image::packed::PackOptions {
            level: Some(3),
            threads: 1,
        },
        &mut Vec::new(),
        &mut |_| {},
    )
    .unwrap();
    assert!(matches!(
        m.blocks[0].wire,
        crate::image::manifest::Wire::Zstd { .. }
    ));
    assert!(m.blocks[1].zero);
    m
}

#[test]
fn device_protocol_is_pinned() {
    let agent = [
        (
            "hello",
            AgentMsg::Hello {
                protocol: DEVICE_PROTOCOL,
                mac: "52:54:00:00:00:01".into(),
                device_id: Some("rc-525400000001".into()),
                mode: AgentMode::Loader { os_present: true },
                credential: Some([0x11; 32]),
            },
        ),
        (
            "hello_agent",
            AgentMsg::Hello {
                protocol: DEVICE_PROTOCOL,
                mac: "52:54:00:00:00:01".into(),
                device_id: None,
                mode: AgentMode::Agent {
                    bundle: "ef".repeat(32),
                },
                credential: None,
            },
        ),
        (
            "report_inventory",
            AgentMsg::Report {
                cmd_id: 3,
                outcome: Outcome::Ok {
                    detail: "ok".into(),
                },
                data: StepData::Inventory(Box::new(inventory())),
                ops: vec![op()],
            },
        ),
        (
            "report_image",
            AgentMsg::Report {
                cmd_id: 9,
                outcome: Outcome::Failed {
                    reason: "no".into(),
                },
                data: StepData::ImageWritten {
                    hash: "cd".repeat(32),
                    bytes: 4 << 30,
                },
                ops: vec![],
            },
        ),
        (
            "report_none",
            AgentMsg::Report {
                cmd_id: 1,
                outcome: Outcome::Ok { detail: "".into() },
                data: StepData::None,
                ops: vec![],
            },
        ),
        (
            "get_bundle",
            AgentMsg::GetBundle {
                hash: "ef".repeat(32),
            },
        ),
        (
            "get_blob",
            AgentMsg::GetBlob {
                hash: "ab".repeat(32),
                offset: 65536,
            },
        ),
        ("ping", AgentMsg::Ping),
        (
            "progress",
            AgentMsg::Progress {
                cmd_id: 4,
                ops: vec![op()],
            },
        ),
    ];
    let works = [
        ("inventory", Work::Inventory),
        (
            "fetch_bundle",
            Work::FetchBundle {
                hash: "ef".repeat(32),
            },
        ),
        ("run_plan", Work::RunPlan),
        ("request_image", Work::RequestImage),
        ("join_wave", Work::JoinWave(join())),
    ];
    let mut appliance: Vec<(String, ApplianceMsg)> = vec![(
        "welcome".into(),
        ApplianceMsg::Welcome {
            protocol: DEVICE_PROTOCOL,
            device_id: "rc-525400000001".into(),
            boot: 7,
            credential: Some([5; 32]),
        },
    )];
    for (i, (name, work)) in works.into_iter().enumerate() {
        appliance.push((
            format!("run_{name}"),
            ApplianceMsg::Run(Command {
                cmd_id: 10 + i as u64,
                step: Step::ALL[i + 2],
                work,
            }),
        ));
    }
    appliance.extend([
        ("ack".into(), ApplianceMsg::Ack { cmd_id: 5 }),
        (
            "bundle".into(),
            ApplianceMsg::Bundle {
                hash: "ef".repeat(32),
                bytes: vec![1, 2, 3],
                signature: vec![6; 64],
            },
        ),
        (
            "blob_chunk".into(),
            ApplianceMsg::BlobChunk {
                hash: "ab".repeat(32),
                offset: 0,
                total: 3,
                data: vec![9, 9, 9],
            },
        ),
        ("pong".into(), ApplianceMsg::Pong),
        (
            "error".into(),
            ApplianceMsg::Error {
                message: "no".into(),
            },
        ),
        (
            "finished".into(),
            ApplianceMsg::Finished {
                detail: "done".into(),
            },
        ),
    ]);
    let mut samples = Vec::new();
    for (name, m) in agent {
        let bytes = m.emit().unwrap();
        assert_eq!(AgentMsg::parse(&bytes).unwrap(), m, "{name} round trip");
        samples.push((format!("agent.{name}"), bytes));
    }
    for (name, m) in appliance {
        let bytes = m.emit().unwrap();
        assert_eq!(ApplianceMsg::parse(&bytes).unwrap(), m, "{name} round trip");
        samples.push((format!("appliance.{name}"), bytes));
    }
    // The bundle's canonical bytes are its address (and what a device
    // verifies): the plan's field order is part of the protocol too.
    samples.push(("bundle.canonical".into(), bundle().to_bytes()));
    check("device.txt", DEVICE_PROTOCOL, &samples);
}

#[test]
fn wave_control_protocol_is_pinned() {
    let msgs = [
        (
            "hello",
            Msg::Hello {
                protocol: control::PROTOCOL_VERSION,
                name: "rc-525400000001".into(),
                credential: Some([0x22; 32]),
                relay_port: Some(9100),
            },
        ),
        ("ready", Msg::Ready { resumed_blocks: 2 }),
        (
            "status",
            Msg::Status(Status {
                seq_hi: 1000,
                seen_any: true,
                received: 900,
                expected: 1000,
                blocks_done: 1,
                missing: vec![(2, 1)],
                partial: vec![(1, 3)],
                source_gaps: vec![(1, vec![0b101])],
                auth_failures: 1,
                malformed: 2,
                decode_failures: 3,
            }),
        ),
        (
            "done_verified",
            Msg::Done(Verdict::Verified {
                image_hash: [4; 32],
            }),
        ),
        (
            "done_failed",
            Msg::Done(Verdict::Failed {
                reason: "disk".into(),
            }),
        ),
        (
            "welcome",
            Msg::Welcome {
                protocol: control::PROTOCOL_VERSION,
                receiver_id: 3,
                session: SessionParams {
                    session_id: 77,
                    group: "239.255.10.2:9000".parse().unwrap(),
                    key: [8; 32],
                    manifest: manifest(),
                    feedback_ms: 20,
                },
            },
        ),
        (
            "coded",
            Msg::Coded {
                block: 1,
                first: 4,
                combos: vec![vec![0, 2], vec![1, 3, 5]],
            },
        ),
        (
            "finish",
            Msg::Finish {
                reason: "verdict received".into(),
            },
        ),
        (
            "error",
            Msg::Error {
                message: "no".into(),
            },
        ),
    ];
    let mut samples = Vec::new();
    for (name, m) in msgs {
        let bytes = control::emit(&m).unwrap();
        assert_eq!(control::parse(&bytes).unwrap(), m, "{name} round trip");
        samples.push((name.to_string(), bytes));
    }
    check("control.txt", control::PROTOCOL_VERSION, &samples);
}

#[test]
fn data_plane_header_is_pinned() {
    let key = [3u8; packet::KEY_LEN];
    let mut samples = Vec::new();
    for (name, kind, payload) in [
        ("symbol", Kind::Symbol, vec![0xa5u8; 16]),
        ("coded", Kind::Coded, vec![0x5au8; 16]),
        ("probe", Kind::Probe, Vec::new()),
    ] {
        let h = Header {
            kind,
            session: 0x0102_0304,
            seq: 0x0a0b_0c0d,
            block: 7,
            esi: 9,
            payload_len: payload.len() as u16,
        };
        let mut buf = vec![0u8; packet::datagram_len(payload.len())];
        let n = packet::emit(&h, &payload, &key, &mut buf).unwrap();
        assert_eq!(packet::parse(&buf[..n]).unwrap().0, h, "{name} round trip");
        samples.push((name.to_string(), buf[..n].to_vec()));
    }
    check("packet.txt", u16::from(packet::VERSION), &samples);
}
