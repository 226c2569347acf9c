//! DHCP core tests: requests built with dhcproto, answers checked field by
//! field; no sockets, time is a number.

use super::*;
use dhcproto::v4::{Decodable, Decoder, Encodable, Encoder};

use proptest::prelude::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn cfg(mode: Mode) -> DhcpConfig {
    DhcpConfig {
        server_ip: SERVER,
        mode,
        boot: BootFiles {
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
            script_base: "http://198.18.0.1:7180/boot".into(),
        },
        decline_hold_ms: 60_000,
        offer_hold_ms: 10_000,
        new_clients_per_sec: 1000,
        per_client_per_sec: 1000,
    }
}

fn pool(n: u8) -> Pool {
    Pool {
        start: Ipv4Addr::new(198, 18, 0, 100),
        end: Ipv4Addr::new(198, 18, 0, 100 + n - 1),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        router: None,
        dns: vec![],
        lease_secs: 3600,
    }
}

fn mac(i: u8) -> [u8; 6] {
    [0x02, 0xbb, 0, 0, 0, i]
}

enum Client {
    Plain,
    Pxe(u16),
    Ipxe(u16),
}

fn msg(kind: MessageType, i: u8, client: Client) -> Message {
    let mut m = Message::new_with_id(
        0x1000 + u32::from(i),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac(i),
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    match client {
        Client::Plain => {}
        Client::Pxe(arch) | Client::Ipxe(arch) => {
            m.opts_mut().insert(DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
            ));
            m.opts_mut()
                .insert(DhcpOption::ClientSystemArchitecture(arch.into()));
            let mut uuid = vec![0u8];
            uuid.extend_from_slice(&[0x11; 16]);
            m.opts_mut()
                .insert(DhcpOption::ClientMachineIdentifier(uuid));
        }
    }
    if let Client::Ipxe(_) = client {
        m.opts_mut()
            .insert(DhcpOption::UserClass(b"\x04iPXE".to_vec()));
    }
    m
}

fn replies(acts: &[DhcpAction]) -> Vec<(Message, Destination)> {
    acts.iter()
        .filter_map(|a| match a {
            DhcpAction::Reply { msg, to } => Some(((**msg).clone(), *to)),
            _ => None,
        })
        .collect()
}

fn one_reply(acts: &[DhcpAction]) -> (Message, Destination) {
    let r = replies(acts);
    assert_eq!(r.len(), 1, "{acts:?}");
    r.into_iter().next().unwrap()
}

fn fname(m: &Message) -> String {
    m.fname_str()
        .and_then(|r| r.ok())
        .unwrap_or_default()
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn full_server_offers_acks_and_keeps_the_lease() {
    let mut s = DhcpServer::new(cfg(Mode::Full(pool(10))), vec![]);
    let (offer, to) = one_reply(&s.handle(
        &msg(MessageType::Discover, 1, Client::Plain),
        67,
        0,
        BootChoice::Install,
    ));
    assert_eq!(to, Destination::Broadcast);
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let ip = offer.yiaddr();
    assert_eq!(ip, Ipv4Addr::new(198, 18, 0, 100));
    assert!(matches!(
        offer.opts().get(OptionCode::ServerIdentifier),
        Some(DhcpOption::ServerIdentifier(SERVER))
    ));
    assert!(
        fname(&offer).is_empty(),
        "no boot file for a non-PXE client"
    );
    let mut req = msg(MessageType::Request, 1, Client::Plain);
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let acts = s.handle(&req, 67, 1_000, BootChoice::Install);
    let (ack, _) = one_reply(&acts);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    assert!(acts.iter().any(
        |a| matches!(a, DhcpAction::SaveLease(l) if l.ip == ip && l.state == LeaseState::Bound)
    ));
    // A second discover from the same MAC gets the same address.
    let (again, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 1, Client::Plain),
        67,
        2_000,
        BootChoice::Install,
    ));
    assert_eq!(again.yiaddr(), ip);
    // Another client gets another one.
    let (other, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 2, Client::Plain),
        67,
        2_000,
        BootChoice::Install,
    ));
    assert_ne!(other.yiaddr(), ip);
    // Renewing (ciaddr set, unicast) extends it.
    let mut renew = msg(MessageType::Request, 1, Client::Plain);
    renew.set_ciaddr(ip);
    let (ack, to) = one_reply(&s.handle(&renew, 67, 3_000_000, BootChoice::Install));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(to, Destination::Unicast(ip, 68));
    assert_eq!(
        s.leases().find(|l| l.mac == mac(1)).unwrap().expires,
        3_000_000 + 3_600_000
    );
}

#[test]
fn release_decline_nak_and_exhaustion() {
    let mut s = DhcpServer::new(cfg(Mode::Full(pool(2))), vec![]);
    let a = lease_for(&mut s, 1, 0);
    let b = lease_for(&mut s, 2, 0);
    assert_ne!(a, b);
    // Pool of two is full: a third client gets no offer, and it is said.
    let acts = s.handle(
        &msg(MessageType::Discover, 3, Client::Plain),
        67,
        0,
        BootChoice::Install,
    );
    assert!(replies(&acts).is_empty());
    assert!(acts.contains(&DhcpAction::Ignored("address pool exhausted")));
    // Release frees the address for the third client.
    let mut rel = msg(MessageType::Release, 1, Client::Plain);
    rel.set_ciaddr(a);
    let acts = s.handle(&rel, 67, 10, BootChoice::Install);
    assert!(acts.contains(&DhcpAction::ForgetLease(mac(1))));
    assert_eq!(lease_for(&mut s, 3, 20), a);
    // A client asking for an address that is not its own gets a NAK.
    let mut wrong = msg(MessageType::Request, 4, Client::Plain);
    wrong.opts_mut().insert(DhcpOption::RequestedIpAddress(b));
    let (nak, to) = one_reply(&s.handle(&wrong, 67, 30, BootChoice::Install));
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(to, Destination::Broadcast);
    // Decline: the address is held back, the client moves on.
    let mut dec = msg(MessageType::Decline, 3, Client::Plain);
    dec.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
    let acts = s.handle(&dec, 67, 40, BootChoice::Install);
    assert!(acts.contains(&DhcpAction::ForgetLease(mac(3))));
    let acts = s.handle(
        &msg(MessageType::Discover, 3, Client::Plain),
        67,
        50,
        BootChoice::Install,
    );
    assert!(
        replies(&acts).is_empty(),
        "declined address must not be offered again"
    );
    // After the hold it is offered again.
    let (o, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 3, Client::Plain),
        67,
        70_000,
        BootChoice::Install,
    ));
    assert_eq!(o.yiaddr(), a);
    // A request naming another server drops our offer silently.
    let mut other = msg(MessageType::Request, 3, Client::Plain);
    other
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 2)));
    other
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            198, 18, 0, 50,
        )));
    let acts = s.handle(&other, 67, 70_001, BootChoice::Install);
    assert!(replies(&acts).is_empty());
    assert!(s.leases().all(|l| l.mac != mac(3)));
}

#[test]
fn pxe_clients_get_the_file_for_their_firmware_and_ipxe_its_script() {
    let mut s = DhcpServer::new(cfg(Mode::Full(pool(10))), vec![]);
    for (arch, want) in [
        (0u16, "undionly.kpxe"),
        (7, "ipxe.efi"),
        (9, "ipxe.efi"),
        (11, "ipxe-arm64.efi"),
    ] {
        let acts = s.handle(
            &msg(MessageType::Discover, 1, Client::Pxe(arch)),
            67,
            0,
            BootChoice::Install,
        );
        let (o, _) = one_reply(&acts);
        assert_eq!(fname(&o), want, "arch {arch}");
        assert_eq!(o.siaddr(), SERVER);
        let seen = acts.iter().find_map(|a| match a {
            DhcpAction::BootSeen(c) => Some(c.clone()),
            _ => None,
        });
        let seen = seen.expect("power-on trigger");
        assert_eq!(
            seen.uuid.as_deref(),
            Some("11111111-1111-1111-1111-111111111111")
        );
    }
    let (o, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 2, Client::Ipxe(9)),
        67,
        0,
        BootChoice::Install,
    ));
    assert_eq!(
        fname(&o),
        "http://198.18.0.1:7180/boot/02:bb:00:00:00:02.ipxe"
    );
    // An installed device boots its disk: an address, no boot file.
    let (o, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 3, Client::Pxe(9)),
        67,
        0,
        BootChoice::LocalDisk,
    ));
    assert!(fname(&o).is_empty());
    assert!(!o.yiaddr().is_unspecified());
}

#[test]
fn proxy_dhcp_answers_pxe_only_without_addresses() {
    let mut s = DhcpServer::new(cfg(Mode::Proxy), vec![]);
    let acts = s.handle(
        &msg(MessageType::Discover, 1, Client::Plain),
        67,
        0,
        BootChoice::Install,
    );
    assert!(replies(&acts).is_empty());
    assert!(acts.contains(&DhcpAction::Ignored("proxyDHCP answers PXE clients only")));
    let (o, to) = one_reply(&s.handle(
        &msg(MessageType::Discover, 1, Client::Pxe(0)),
        67,
        0,
        BootChoice::Install,
    ));
    assert_eq!(to, Destination::Broadcast);
    assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
    assert!(
        o.yiaddr().is_unspecified(),
        "proxyDHCP hands out no address"
    );
    assert_eq!(fname(&o), "undionly.kpxe");
    assert!(
        matches!(o.opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v == b"PXEClient")
    );
    assert!(o.opts().get(OptionCode::AddressLeaseTime).is_none());
    // The REQUEST to the real server on 67 is not ours; the one to 4011 is.
    let acts = s.handle(
        &msg(MessageType::Request, 1, Client::Pxe(0)),
        67,
        0,
        BootChoice::Install,
    );
    assert!(replies(&acts).is_empty());
    let mut r = msg(MessageType::Request, 1, Client::Pxe(0));
    r.set_ciaddr(Ipv4Addr::new(198, 18, 0, 55));
    let (ack, to) = one_reply(&s.handle(&r, 4011, 0, BootChoice::Install));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(
        to,
        Destination::Unicast(Ipv4Addr::new(198, 18, 0, 55), 4011)
    );
    assert_eq!(fname(&ack), "undionly.kpxe");
    assert!(s.leases().next().is_none());
}

#[test]
fn replies_encode_and_decode() {
    let mut s = DhcpServer::new(cfg(Mode::Full(pool(4))), vec![]);
    let (o, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, 1, Client::Pxe(7)),
        67,
        0,
        BootChoice::Install,
    ));
    let mut buf = Vec::new();
    o.encode(&mut Encoder::new(&mut buf)).unwrap();
    let back = Message::decode(&mut Decoder::new(&buf)).unwrap();
    assert_eq!(back.yiaddr(), o.yiaddr());
    assert_eq!(fname(&back), "ipxe.efi");
}

proptest! {
    /// Whatever dhcproto decodes from arbitrary bytes, the core answers
    /// without panicking and never hands out an address outside the pool.
    #[test]
    fn arbitrary_requests_never_panic(
        opts in proptest::collection::vec(any::<u8>(), 0..300),
        kind in 1u8..9,
        port in prop_oneof![Just(67u16), Just(4011u16)],
    ) {
        // A valid header, a message type, then arbitrary option bytes;
        // raw bytes go through our checks first (dhcproto panics on some).
        let mut bytes = Vec::new();
        msg(MessageType::Discover, 1, Client::Plain)
            .encode(&mut Encoder::new(&mut bytes))
            .unwrap();
        bytes.truncate(240);
        bytes.extend_from_slice(&[53, 1, kind]);
        bytes.extend_from_slice(&opts);
        if let Ok(m) = crate::wire::dhcp::parse(&bytes) {
            for mode in [Mode::Full(pool(4)), Mode::Proxy] {
                let mut s = DhcpServer::new(cfg(mode), vec![]);
                for a in s.handle(&m, port, 0, BootChoice::Install) {
                    if let DhcpAction::Reply { msg, .. } = a {
                        let ip = msg.yiaddr();
                        prop_assert!(ip.is_unspecified() || (u32::from(ip) >= u32::from(pool(4).start) && u32::from(ip) <= u32::from(pool(4).end)));
                    }
                }
            }
        }
    }
}

#[test]
fn pxe_uuid_is_shown_in_smbios_order() {
    // What SeaBIOS/iPXE sent for QEMU -uuid 6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7d01.
    let wire = [
        0x5e, 0x0e, 0x1c, 0x6a, 0x0f, 0x8d, 0x53, 0x4a, 0x9f, 0x4e, 0x0c, 0x9a, 0x3b, 0x6a, 0x7d,
        0x01,
    ];
    assert_eq!(smbios_uuid(&wire), "6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7d01");
}

fn lease_for(s: &mut DhcpServer, i: u8, now: Millis) -> Ipv4Addr {
    let (o, _) = one_reply(&s.handle(
        &msg(MessageType::Discover, i, Client::Plain),
        67,
        now,
        BootChoice::Install,
    ));
    let mut r = msg(MessageType::Request, i, Client::Plain);
    r.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(o.yiaddr()));
    r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let (a, _) = one_reply(&s.handle(&r, 67, now, BootChoice::Install));
    assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
    a.yiaddr()
}

/// Only the client an address is lent to may decline it: a spoofed
/// DECLINE for someone else's address changes nothing.
#[test]
fn decline_from_a_client_not_holding_the_address_is_ignored() {
    let mut s = DhcpServer::new(cfg(Mode::Full(pool(2))), vec![]);
    let a = lease_for(&mut s, 1, 0);
    let mut spoof = msg(MessageType::Decline, 9, Client::Plain);
    spoof.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
    let acts = s.handle(&spoof, 67, 10, BootChoice::Install);
    assert_eq!(
        acts,
        vec![DhcpAction::Ignored(
            "decline from a client not holding that address"
        )]
    );
    assert!(s.leases().any(|l| l.mac == mac(1) && l.ip == a));
    // The other address still goes to a new client, and the holder keeps
    // renewing its own.
    let b = lease_for(&mut s, 2, 20);
    assert_ne!(a, b);
    assert_eq!(lease_for(&mut s, 1, 30), a);
}

/// New clients are answered at the configured rate (a flood of spoofed
/// chaddrs takes the pool no faster), a known client keeps being
/// answered meanwhile, and one client's requests are capped per second.
#[test]
fn new_clients_and_each_client_are_rate_limited() {
    let mut c = cfg(Mode::Full(pool(150)));
    c.new_clients_per_sec = 5;
    c.per_client_per_sec = 3;
    let mut s = DhcpServer::new(c, vec![]);
    let a = lease_for(&mut s, 1, 0);
    let flood: Vec<Vec<DhcpAction>> = (10..60u8)
        .map(|i| {
            s.handle(
                &msg(MessageType::Discover, i, Client::Pxe(7)),
                67,
                1000,
                BootChoice::Install,
            )
        })
        .collect();
    let answered = flood.iter().filter(|a| !replies(a).is_empty()).count();
    assert_eq!(answered, 5, "the burst, then nothing");
    assert!(flood
        .iter()
        .filter(|a| replies(a).is_empty())
        .all(|a| a == &vec![DhcpAction::Ignored("new clients over their rate")]));
    // No power-on trigger for the ones refused (no device records).
    let seen = flood
        .iter()
        .flatten()
        .filter(|a| matches!(a, DhcpAction::BootSeen(_)))
        .count();
    assert_eq!(seen, 5);
    // The known client is still served.
    assert_eq!(lease_for(&mut s, 1, 1100), a);
    // A second later the budget is back.
    let later = s.handle(
        &msg(MessageType::Discover, 70, Client::Plain),
        67,
        2200,
        BootChoice::Install,
    );
    assert_eq!(replies(&later).len(), 1);
    // One client: 3 requests in a second, then ignored until the next.
    let n = (0..6)
        .filter(|k| {
            !replies(&s.handle(
                &msg(MessageType::Discover, 1, Client::Plain),
                67,
                5000 + k,
                BootChoice::Install,
            ))
            .is_empty()
        })
        .count();
    assert_eq!(n, 3);
}

/// Declined addresses are bounded: past the bound a holder's decline
/// frees its lease but holds nothing back.
#[test]
fn declined_addresses_are_bounded() {
    let mut p = pool(2);
    p.start = Ipv4Addr::new(198, 18, 1, 0);
    p.end = Ipv4Addr::new(198, 18, 2, 255);
    let mut s = DhcpServer::new(cfg(Mode::Full(p)), vec![]);
    let mut recorded = 0;
    let mut over = 0;
    for i in 0..300u16 {
        let mac_i = [0x02, 0xcc, 0, 0, (i >> 8) as u8, i as u8];
        let new = |kind| {
            let mut m = Message::new_with_id(
                7,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                &mac_i,
            );
            m.opts_mut().insert(DhcpOption::MessageType(kind));
            m
        };
        let now = Millis::from(i) * 10;
        let (o, _) =
            one_reply(&s.handle(&new(MessageType::Discover), 67, now, BootChoice::Install));
        let mut dec = new(MessageType::Decline);
        dec.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(o.yiaddr()));
        let acts = s.handle(&dec, 67, now + 1, BootChoice::Install);
        assert!(acts.contains(&DhcpAction::ForgetLease(mac_i)));
        if acts.contains(&DhcpAction::Ignored("decline recorded")) {
            recorded += 1;
        }
        if acts.contains(&DhcpAction::Ignored("declined addresses at their bound")) {
            over += 1;
        }
    }
    assert_eq!((recorded, over), (MAX_DECLINED, 300 - MAX_DECLINED));
}
