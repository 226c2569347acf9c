//! Network boot service: DHCP / proxyDHCP (with the PXE boot decision),
//! and, next, TFTP and the per-device iPXE scripts over HTTP. A device's
//! first boot request is the appliance's power-on trigger.

pub mod dhcp;
pub mod dhcp_wire;
pub mod server;
pub mod tftp;
pub mod tftp_server;
pub mod tftp_wire;
