//! DHCP for network boot: a full server for an isolated provisioning
//! network (address pool, leases, renew/rebind, decline, release) or
//! proxyDHCP beside an existing server (PXE clients only, no addresses),
//! and the PXE boot decision (legacy BIOS, x86-64 UEFI, ARM64 UEFI, iPXE).
//!
//! Owns: the lease table and the answer to each request, as a sans-IO core:
//! the driver decodes datagrams with dhcproto (counting and dropping what
//! does not decode), calls [`DhcpServer::handle`] with `now`, the port the
//! request came in on and what the controller wants the device to boot,
//! and carries out the returned [`DhcpAction`]s (send, persist a lease,
//! report a power-on). Must not: touch sockets, the store or clocks.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{
    Architecture, DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use serde::{Deserialize, Serialize};

use crate::workflow::Millis;

/// PXE firmware kinds, from option 93.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Firmware {
    /// Legacy BIOS PXE (arch 0).
    BiosX86,
    /// x86-64 UEFI (arch 7 or 9).
    UefiX64,
    /// ARM64 UEFI (arch 11).
    UefiArm64,
    /// Anything else: not answered with a boot file.
    Other(u16),
}

impl Firmware {
    fn from_arch(a: &Architecture) -> Firmware {
        match a {
            Architecture::Intelx86PC => Firmware::BiosX86,
            // 7 (EFI BC) is what most x86-64 UEFI firmware sends.
            Architecture::BC | Architecture::X86_64 => Firmware::UefiX64,
            Architecture::Unknown(11) => Firmware::UefiArm64,
            other => Firmware::Other(u16::from(*other)),
        }
    }
}

/// What kind of client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// `chaddr`.
    pub mac: [u8; 6],
    /// Option 60 starts with "PXEClient".
    pub pxe: bool,
    /// Option 93.
    pub firmware: Option<Firmware>,
    /// iPXE already runs (option 77 "iPXE" or option 175 present).
    pub ipxe: bool,
    /// Option 97, hex.
    pub uuid: Option<String>,
}

/// What the controller wants this device to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootChoice {
    /// Unknown or installing: the loader (via iPXE).
    Install,
    /// Installed: no network boot file, firmware goes on to the disk.
    LocalDisk,
}

/// The address pool of a full DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
    /// Option 1.
    pub netmask: Ipv4Addr,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time, seconds.
    pub lease_secs: u32,
}

/// Full server or proxyDHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Addresses from this pool, and boot files.
    Full(Pool),
    /// Boot files only, beside the site's DHCP server.
    Proxy,
}

/// Boot files by firmware (served by TFTP) and the iPXE script base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// For legacy BIOS (`undionly.kpxe`).
    pub bios: String,
    /// For x86-64 UEFI (`ipxe.efi`).
    pub uefi_x64: String,
    /// For ARM64 UEFI.
    pub uefi_arm64: String,
    /// `{base}/{mac}.ipxe` is a device's script (HTTP).
    pub script_base: String,
}

/// How the DHCP core answers.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    /// This server's address (option 54, next-server).
    pub server_ip: Ipv4Addr,
    /// Full or proxy.
    pub mode: Mode,
    /// What each firmware boots.
    pub boot: BootFiles,
    /// A declined address is not handed out again for this long.
    pub decline_hold_ms: Millis,
    /// An offer not taken up is freed after this long.
    pub offer_hold_ms: Millis,
    /// Clients not seen in the last second (no lease, no recent request)
    /// answered per second, with a burst of as many: a flood of spoofed
    /// `chaddr`s takes the pool (and device records) only this fast.
    pub new_clients_per_sec: u32,
    /// Requests answered per client per second.
    pub per_client_per_sec: u32,
}

/// Declined addresses held back at once: past this a decline is ignored
/// (only lease holders may decline, so this takes many bound leases).
pub const MAX_DECLINED: usize = 256;

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Offered, not yet requested.
    Offered,
    /// Acknowledged: the client uses it.
    Bound,
}

/// An address lent to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The client.
    pub mac: [u8; 6],
    /// Its address.
    pub ip: Ipv4Addr,
    /// Offered or bound.
    pub state: LeaseState,
    /// Unix milliseconds.
    pub expires: Millis,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Limited broadcast on the serving interface, client port 68.
    Broadcast,
    /// A client that has an address (renewing, INFORM, or proxyDHCP 4011).
    Unicast(Ipv4Addr, u16),
    /// Back through the relay agent (port 67).
    Relay(Ipv4Addr),
}

/// What the driver must do after a request.
#[derive(Debug, Clone, PartialEq)]
pub enum DhcpAction {
    /// Send this answer.
    Reply {
        /// The answer.
        msg: Box<Message>,
        /// Where to.
        to: Destination,
    },
    /// Store this lease (bound leases survive a restart).
    SaveLease(Lease),
    /// Drop this client's stored lease (released or expired).
    ForgetLease([u8; 6]),
    /// A PXE boot request: the power-on trigger (first one creates the
    /// device record and starts its workflow).
    BootSeen(ClientInfo),
    /// Not answered, and why (for the log and a counter).
    Ignored(&'static str),
}

/// The DHCP / proxyDHCP core: leases and answers.
pub struct DhcpServer {
    cfg: DhcpConfig,
    leases: BTreeMap<[u8; 6], Lease>,
    declined: BTreeMap<Ipv4Addr, Millis>,
    /// Clients heard from in the current second: (second's start, requests).
    recent: BTreeMap<[u8; 6], (Millis, u32)>,
    /// New-client budget (token bucket) and when it was last filled.
    new_tokens: f64,
    refilled: Millis,
}

fn cfg_new_clients(cfg: &DhcpConfig) -> u32 {
    cfg.new_clients_per_sec.max(1)
}

/// Read what kind of client sent `m`.
pub fn client_info(m: &Message) -> Option<ClientInfo> {
    let ch = m.chaddr();
    if m.htype() != HType::Eth || ch.len() < 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&ch[..6]);
    let o = m.opts();
    let pxe = matches!(o.get(OptionCode::ClassIdentifier),
        Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient"));
    let firmware = match o.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(Firmware::from_arch(a)),
        _ => None,
    };
    let ipxe = matches!(o.get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(v)) if user_class_is_ipxe(v))
        || o.get(OptionCode::Unknown(175)).is_some();
    let uuid = match o.get(OptionCode::ClientMachineIdentifier) {
        Some(DhcpOption::ClientMachineIdentifier(v)) if v.len() == 17 && v[0] == 0 => {
            Some(smbios_uuid(&v[1..]))
        }
        _ => None,
    };
    Some(ClientInfo {
        mac,
        pxe,
        firmware,
        ipxe,
        uuid,
    })
}

/// PXE firmware sends the machine UUID (option 97) in SMBIOS byte order:
/// the first three fields little-endian. Shown the way dmidecode, the BMC
/// and /sys/class/dmi/id/product_uuid show it, so an operator can match it.
fn smbios_uuid(b: &[u8]) -> String {
    let hex = |r: &mut dyn Iterator<Item = &u8>| r.map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&mut b[0..4].iter().rev()),
        hex(&mut b[4..6].iter().rev()),
        hex(&mut b[6..8].iter().rev()),
        hex(&mut b[8..10].iter()),
        hex(&mut b[10..16].iter())
    )
}

/// Option 77 is a list of length-prefixed classes (RFC 3004); iPXE sends
/// "iPXE" that way, some clients send the bare string.
fn user_class_is_ipxe(v: &[u8]) -> bool {
    if v == b"iPXE" {
        return true;
    }
    let mut i = 0;
    while i < v.len() {
        let n = v[i] as usize;
        let Some(class) = v.get(i + 1..i + 1 + n) else {
            return false;
        };
        if class == b"iPXE" {
            return true;
        }
        i += 1 + n;
    }
    false
}

/// `aa:bb:cc:dd:ee:ff` -> bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl DhcpServer {
    /// A server with the leases stored before a restart.
    pub fn new(cfg: DhcpConfig, leases: Vec<Lease>) -> DhcpServer {
        let burst = f64::from(cfg_new_clients(&cfg));
        DhcpServer {
            cfg,
            leases: leases.into_iter().map(|l| (l.mac, l)).collect(),
            declined: BTreeMap::new(),
            recent: BTreeMap::new(),
            new_tokens: burst,
            refilled: 0,
        }
    }

    /// Every lease it holds.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The boot file (or script URL) for a PXE client, if it is to boot
    /// from the network.
    pub fn boot_file(&self, c: &ClientInfo, choice: BootChoice) -> Option<String> {
        if !c.pxe || choice == BootChoice::LocalDisk {
            return None;
        }
        if c.ipxe {
            return Some(format!(
                "{}/{}.ipxe",
                self.cfg.boot.script_base.trim_end_matches('/'),
                mac_string(&c.mac)
            ));
        }
        match c.firmware {
            Some(Firmware::BiosX86) | None => Some(self.cfg.boot.bios.clone()),
            Some(Firmware::UefiX64) => Some(self.cfg.boot.uefi_x64.clone()),
            Some(Firmware::UefiArm64) => Some(self.cfg.boot.uefi_arm64.clone()),
            Some(Firmware::Other(_)) => None,
        }
    }

    /// Answer one request. `port` is the server port it arrived on (67,
    /// or 4011 for proxyDHCP boot requests).
    pub fn handle(
        &mut self,
        m: &Message,
        port: u16,
        now: Millis,
        choice: BootChoice,
    ) -> Vec<DhcpAction> {
        let mut out = Vec::new();
        if m.opcode() != Opcode::BootRequest {
            out.push(DhcpAction::Ignored("not a BOOTREQUEST"));
            return out;
        }
        let Some(c) = client_info(m) else {
            out.push(DhcpAction::Ignored("not an Ethernet client"));
            return out;
        };
        let Some(kind) = m.opts().msg_type() else {
            out.push(DhcpAction::Ignored("no message type"));
            return out;
        };
        self.expire(now);
        if let Err(why) = self.admit(&c.mac, now) {
            out.push(DhcpAction::Ignored(why));
            return out;
        }
        let boot = self.boot_file(&c, choice);
        // One trigger per boot attempt (firmware and iPXE each discover).
        if c.pxe && kind == MessageType::Discover {
            out.push(DhcpAction::BootSeen(c.clone()));
        }
        match &self.cfg.mode {
            Mode::Proxy => self.proxy(m, &c, kind, port, boot, &mut out),
            Mode::Full(pool) => {
                let pool = pool.clone();
                self.full(m, &c, kind, now, &pool, boot, &mut out)
            }
        }
        out
    }

    fn expire(&mut self, now: Millis) {
        self.leases.retain(|_, l| l.expires > now);
        self.declined.retain(|_, until| *until > now);
        self.recent.retain(|_, (since, _)| *since + 1000 > now);
    }

    /// Rate limits, before anything is answered or recorded: per client,
    /// and for clients that are new (no lease, not heard from this
    /// second) a budget shared by all of them.
    fn admit(&mut self, mac: &[u8; 6], now: Millis) -> Result<(), &'static str> {
        let per_sec = cfg_new_clients(&self.cfg);
        let elapsed = (now - self.refilled).max(0) as f64 / 1000.0;
        self.new_tokens = (self.new_tokens + elapsed * f64::from(per_sec)).min(f64::from(per_sec));
        self.refilled = now;
        if let Some((_, n)) = self.recent.get_mut(mac) {
            if *n >= self.cfg.per_client_per_sec.max(1) {
                return Err("client over its request rate");
            }
            *n += 1;
            return Ok(());
        }
        if !self.leases.contains_key(mac) {
            if self.new_tokens < 1.0 {
                return Err("new clients over their rate");
            }
            self.new_tokens -= 1.0;
        }
        self.recent.insert(*mac, (now, 1));
        Ok(())
    }

    fn base_reply(&self, m: &Message, kind: MessageType) -> Message {
        // chaddr from the validated 6-byte MAC, never the raw field.
        let mac = client_info(m).map_or([0u8; 6], |c| c.mac);
        let mut r = Message::new_with_id(
            m.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            m.giaddr(),
            &mac,
        );
        r.set_opcode(Opcode::BootReply)
            .set_flags(m.flags())
            .set_secs(0);
        r.opts_mut().insert(DhcpOption::MessageType(kind));
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.cfg.server_ip));
        r
    }

    fn add_boot(&self, r: &mut Message, c: &ClientInfo, file: &str) {
        r.set_siaddr(self.cfg.server_ip);
        r.set_fname_str(file);
        r.opts_mut()
            .insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        if !c.ipxe {
            // PXE vendor options: discovery control 8 = boot file name
            // given here, no boot-server discovery (what PXE ROMs need to
            // take a proxyDHCP answer).
            r.opts_mut()
                .insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
    }

    fn destination(m: &Message, port: u16) -> Destination {
        if !m.giaddr().is_unspecified() {
            Destination::Relay(m.giaddr())
        } else if !m.ciaddr().is_unspecified() {
            // Renewing clients and PXE clients on 4011 have an address.
            Destination::Unicast(m.ciaddr(), if port == 4011 { 4011 } else { 68 })
        } else {
            Destination::Broadcast
        }
    }

    fn proxy(
        &mut self,
        m: &Message,
        c: &ClientInfo,
        kind: MessageType,
        port: u16,
        boot: Option<String>,
        out: &mut Vec<DhcpAction>,
    ) {
        if !c.pxe {
            out.push(DhcpAction::Ignored("proxyDHCP answers PXE clients only"));
            return;
        }
        let Some(file) = boot else {
            out.push(DhcpAction::Ignored("device boots from its disk"));
            return;
        };
        let reply_kind = match (kind, port) {
            (MessageType::Discover, 67) => MessageType::Offer,
            (MessageType::Request, 4011) | (MessageType::Inform, 4011) => MessageType::Ack,
            (MessageType::Request, _) => {
                // The client's REQUEST to the real DHCP server: not ours.
                out.push(DhcpAction::Ignored("request for another server"));
                return;
            }
            _ => {
                out.push(DhcpAction::Ignored("message type not used by proxyDHCP"));
                return;
            }
        };
        let mut r = self.base_reply(m, reply_kind);
        self.add_boot(&mut r, c, &file);
        out.push(DhcpAction::Reply {
            msg: Box::new(r),
            to: Self::destination(m, port),
        });
    }

    fn in_pool(pool: &Pool, ip: Ipv4Addr) -> bool {
        u32::from(ip) >= u32::from(pool.start) && u32::from(ip) <= u32::from(pool.end)
    }

    fn taken_by_other(&self, ip: Ipv4Addr, mac: &[u8; 6]) -> bool {
        self.declined.contains_key(&ip)
            || self.leases.values().any(|l| l.ip == ip && &l.mac != mac)
            || ip == self.cfg.server_ip
    }

    fn pick(&self, pool: &Pool, c: &ClientInfo, m: &Message) -> Option<Ipv4Addr> {
        if let Some(l) = self.leases.get(&c.mac) {
            return Some(l.ip);
        }
        if let Some(DhcpOption::RequestedIpAddress(ip)) =
            m.opts().get(OptionCode::RequestedIpAddress)
        {
            if Self::in_pool(pool, *ip) && !self.taken_by_other(*ip, &c.mac) {
                return Some(*ip);
            }
        }
        (u32::from(pool.start)..=u32::from(pool.end))
            .map(Ipv4Addr::from)
            .find(|ip| !self.taken_by_other(*ip, &c.mac))
    }

    fn add_lease_opts(&self, r: &mut Message, pool: &Pool) {
        let o = r.opts_mut();
        o.insert(DhcpOption::AddressLeaseTime(pool.lease_secs));
        o.insert(DhcpOption::Renewal(pool.lease_secs / 2));
        o.insert(DhcpOption::Rebinding(pool.lease_secs / 8 * 7));
        o.insert(DhcpOption::SubnetMask(pool.netmask));
        if let Some(gw) = pool.router {
            o.insert(DhcpOption::Router(vec![gw]));
        }
        if !pool.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(pool.dns.clone()));
        }
    }

    /// OFFER or ACK of `ip` with the pool's options and, for a PXE client
    /// that is to boot from the network, its boot file.
    fn lease_reply(
        &self,
        m: &Message,
        kind: MessageType,
        ip: Ipv4Addr,
        pool: &Pool,
        c: &ClientInfo,
        boot: Option<&str>,
    ) -> DhcpAction {
        let mut r = self.base_reply(m, kind);
        r.set_yiaddr(ip);
        r.set_ciaddr(m.ciaddr());
        self.add_lease_opts(&mut r, pool);
        if let Some(f) = boot {
            self.add_boot(&mut r, c, f);
        }
        DhcpAction::Reply {
            msg: Box::new(r),
            to: Self::destination(m, 67),
        }
    }

    fn nak(&self, m: &Message, why: &str, out: &mut Vec<DhcpAction>) {
        let mut r = self.base_reply(m, MessageType::Nak);
        r.opts_mut().insert(DhcpOption::Message(why.to_string()));
        // NAKs are broadcast unless relayed (RFC 2131 4.1).
        let to = if m.giaddr().is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Relay(m.giaddr())
        };
        r.set_flags(Flags::default().set_broadcast());
        out.push(DhcpAction::Reply {
            msg: Box::new(r),
            to,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn full(
        &mut self,
        m: &Message,
        c: &ClientInfo,
        kind: MessageType,
        now: Millis,
        pool: &Pool,
        boot: Option<String>,
        out: &mut Vec<DhcpAction>,
    ) {
        let requested = match m.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match m.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        match kind {
            MessageType::Discover => {
                let Some(ip) = self.pick(pool, c, m) else {
                    out.push(DhcpAction::Ignored("address pool exhausted"));
                    return;
                };
                let lease = Lease {
                    mac: c.mac,
                    ip,
                    state: self
                        .leases
                        .get(&c.mac)
                        .map_or(LeaseState::Offered, |l| l.state),
                    expires: self
                        .leases
                        .get(&c.mac)
                        .map_or(now + self.cfg.offer_hold_ms, |l| l.expires),
                };
                self.leases.insert(c.mac, lease);
                out.push(self.lease_reply(m, MessageType::Offer, ip, pool, c, boot.as_deref()));
            }
            MessageType::Request => {
                if let Some(sid) = server_id {
                    if sid != self.cfg.server_ip {
                        // The client took another server's offer.
                        if self
                            .leases
                            .get(&c.mac)
                            .is_some_and(|l| l.state == LeaseState::Offered)
                        {
                            self.leases.remove(&c.mac);
                        }
                        out.push(DhcpAction::Ignored("client chose another server"));
                        return;
                    }
                }
                // SELECTING/INIT-REBOOT name the address in option 50;
                // RENEWING/REBINDING in ciaddr.
                let want = requested.or_else(|| (!m.ciaddr().is_unspecified()).then(|| m.ciaddr()));
                let Some(want) = want else {
                    self.nak(m, "no address requested", out);
                    return;
                };
                let ours = self.leases.get(&c.mac).filter(|l| l.ip == want).cloned();
                let Some(mut lease) = ours else {
                    if server_id.is_some() || Self::in_pool(pool, want) {
                        self.nak(m, "address not leased to this client", out);
                    } else {
                        out.push(DhcpAction::Ignored(
                            "request for an address we do not manage",
                        ));
                    }
                    return;
                };
                lease.state = LeaseState::Bound;
                lease.expires = now + i64::from(pool.lease_secs) * 1000;
                self.leases.insert(c.mac, lease.clone());
                out.push(DhcpAction::SaveLease(lease));
                out.push(self.lease_reply(m, MessageType::Ack, want, pool, c, boot.as_deref()));
            }
            MessageType::Decline => {
                // Only the client the address was lent to may say it is
                // in use: anyone else could take addresses out of the pool.
                let held =
                    requested.filter(|ip| self.leases.get(&c.mac).is_some_and(|l| l.ip == *ip));
                let Some(ip) = held else {
                    out.push(DhcpAction::Ignored(
                        "decline from a client not holding that address",
                    ));
                    return;
                };
                self.leases.remove(&c.mac);
                out.push(DhcpAction::ForgetLease(c.mac));
                if self.declined.len() >= MAX_DECLINED {
                    out.push(DhcpAction::Ignored("declined addresses at their bound"));
                    return;
                }
                self.declined.insert(ip, now + self.cfg.decline_hold_ms);
                out.push(DhcpAction::Ignored("decline recorded"));
            }
            MessageType::Release => {
                if self.leases.get(&c.mac).is_some_and(|l| l.ip == m.ciaddr()) {
                    self.leases.remove(&c.mac);
                    out.push(DhcpAction::ForgetLease(c.mac));
                }
                out.push(DhcpAction::Ignored("release recorded"));
            }
            MessageType::Inform => {
                let mut r = self.base_reply(m, MessageType::Ack);
                r.opts_mut().insert(DhcpOption::SubnetMask(pool.netmask));
                if let Some(f) = &boot {
                    self.add_boot(&mut r, c, f);
                }
                out.push(DhcpAction::Reply {
                    msg: Box::new(r),
                    to: Self::destination(m, 67),
                });
            }
            _ => out.push(DhcpAction::Ignored("message type not handled")),
        }
    }
}

#[cfg(test)]
mod tests;
