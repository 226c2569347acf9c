//! Network-boot services: DHCP / proxyDHCP, TFTP, and (in the
//! controller's HTTP server) the per-device iPXE scripts. A device's first
//! boot request is the appliance's power-on trigger.
//!
//! Owns: the UDP sockets on the provisioning interface and the tasks that
//! feed the boot cores (`rackcast_core::boot`). Must not: decide what a
//! device is answered (the cores do).

pub mod server;
pub mod tftp_server;

/// A UDP socket for a boot service: bound to `port` on any address (the
/// requests are broadcasts) but only on the provisioning interface, with
/// broadcast sending allowed. Needs root (SO_BINDTODEVICE).
pub(crate) fn iface_socket(iface: &str, port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    s.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s.into())
}
