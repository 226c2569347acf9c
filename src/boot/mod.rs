//! Network boot service: DHCP / proxyDHCP (with the PXE boot decision),
//! and, next, TFTP and the per-device iPXE scripts over HTTP. A device's
//! first boot request is the appliance's power-on trigger.

pub mod dhcp;
pub mod dhcp_wire;
pub mod server;
pub mod tftp;
pub mod tftp_server;
pub mod tftp_wire;

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
