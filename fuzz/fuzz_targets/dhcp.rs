//! DHCP datagrams: our checked parse must never panic (nor let dhcproto
//! panic), and the server core must answer whatever parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rackcast_core::boot::dhcp::{BootChoice, BootFiles, DhcpConfig, DhcpServer, Mode, Pool};
use rackcast_core::wire::dhcp::{emit, parse};
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse(data) {
        let pool = Pool {
            start: Ipv4Addr::new(198, 18, 0, 100),
            end: Ipv4Addr::new(198, 18, 0, 103),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: vec![],
            lease_secs: 60,
        };
        for mode in [Mode::Full(pool), Mode::Proxy] {
            let mut s = DhcpServer::new(
                DhcpConfig {
                    server_ip: Ipv4Addr::new(198, 18, 0, 1),
                    mode,
                    boot: BootFiles {
                        bios: "undionly.kpxe".into(),
                        uefi_x64: "ipxe.efi".into(),
                        uefi_arm64: "ipxe-arm64.efi".into(),
                        script_base: "http://198.18.0.1/boot".into(),
                    },
                    decline_hold_ms: 1000,
                    offer_hold_ms: 1000,
                    new_clients_per_sec: 20,
                    per_client_per_sec: 10,
                },
                vec![],
            );
            for a in s.handle(&m, 67, 0, BootChoice::Install) {
                if let rackcast_core::boot::dhcp::DhcpAction::Reply { msg, .. } = a {
                    let _ = emit(&msg).expect("reply encodes");
                }
            }
        }
    }
});
