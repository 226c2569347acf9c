//! Socket plumbing for the data plane: multicast sockets bound to an
//! interface, batched `sendmmsg`/`recvmmsg`, and interface address lookup.
//!
//! Owns: every `unsafe` libc call of the data plane, each wrapped in a safe
//! function whose buffers outlive the call. Must not: know packet formats.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};

/// IPv4 address of interface `name`.
pub fn iface_ipv4(name: &str) -> io::Result<Ipv4Addr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list we free below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated C string.
            let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            // SAFETY: ifa_addr is non-null; sa_family tells its real type.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if n.to_bytes() == name.as_bytes() && fam == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(addrs) };
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {name} has no IPv4 address"),
        )
    })
}

fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {name}"),
        ))
    } else {
        Ok(idx)
    }
}

/// `setsockopt` with an `int` value.
fn set_int_opt(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the value pointer and size describe one live c_int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The FORCE variants need CAP_NET_ADMIN and bypass rmem_max/wmem_max;
/// without it fall back to the capped ordinary option.
fn force_buffer(sock: &Socket, opt: libc::c_int, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if set_int_opt(sock.as_raw_fd(), libc::SOL_SOCKET, opt, v).is_err() {
        let _ = if opt == libc::SO_RCVBUFFORCE {
            sock.set_recv_buffer_size(bytes)
        } else {
            sock.set_send_buffer_size(bytes)
        };
    }
}

/// Sending socket: connected to the group so `sendmmsg` needs no address.
pub fn sender_socket(iface: Option<&str>, group: SocketAddrV4, ttl: u32) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let local = match iface {
        Some(n) => {
            let ip = iface_ipv4(n)?;
            sock.set_multicast_if_v4(&ip)?;
            ip
        }
        None => Ipv4Addr::UNSPECIFIED,
    };
    sock.set_multicast_ttl_v4(ttl)?;
    sock.set_multicast_loop_v4(false)?;
    force_buffer(&sock, libc::SO_SNDBUFFORCE, 4 << 20);
    sock.bind(&SockAddr::from(SocketAddrV4::new(local, 0)))?;
    sock.connect(&SockAddr::from(group))?;
    Ok(sock.into())
}

/// A relay's copy of a wave: a socket connected to the relay's unicast
/// address, so `send_batch` needs no address either.
pub fn relay_socket(to: SocketAddrV4) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    force_buffer(&sock, libc::SO_SNDBUFFORCE, 4 << 20);
    sock.connect(&SockAddr::from(to))?;
    Ok(sock.into())
}

/// A relay's receiving socket: unicast on `local` (port 0: any), where
/// the upstream sender copies its wave to.
pub fn relay_receiver_socket(local: SocketAddrV4, rcvbuf: usize) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    force_buffer(&sock, libc::SO_RCVBUFFORCE, rcvbuf);
    sock.bind(&SockAddr::from(local))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let sock: UdpSocket = sock.into();
    if let Err(e) = enable_gro(&sock) {
        tracing::debug!(error = %e, "UDP GRO not available; reading datagram by datagram");
    }
    Ok(sock)
}

/// Receiving socket joined to `group` on `iface`, else on the interface
/// that has address `local`, else on the routing default.
pub fn receiver_socket(
    iface: Option<&str>,
    local: Option<Ipv4Addr>,
    group: SocketAddrV4,
    rcvbuf: usize,
) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    force_buffer(&sock, libc::SO_RCVBUFFORCE, rcvbuf);
    // Bind to the group address so unicast or other groups on the port are
    // not delivered to us.
    sock.bind(&SockAddr::from(group))?;
    let itf = match iface {
        Some(n) => InterfaceIndexOrAddress::Index(if_index(n)?),
        None => InterfaceIndexOrAddress::Address(local.unwrap_or(Ipv4Addr::UNSPECIFIED)),
    };
    sock.join_multicast_v4_n(group.ip(), &itf)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let sock: UdpSocket = sock.into();
    if let Err(e) = enable_gro(&sock) {
        tracing::debug!(error = %e, "UDP GRO not available; reading datagram by datagram");
    }
    Ok(sock)
}

/// Linux UDP socket options (uapi/linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Send `count` datagrams of `dlen` bytes each, laid out back to back in
/// `buf`. With `gso_segments > 1` they go as UDP GSO super-datagrams of up
/// to that many segments (one trip through the stack each); otherwise one
/// `sendmmsg`. Returns how many datagrams went.
pub fn send_batch(
    sock: &UdpSocket,
    buf: &[u8],
    dlen: usize,
    count: usize,
    gso_segments: usize,
) -> io::Result<usize> {
    let count = count.min(buf.len() / dlen.max(1));
    if count == 0 {
        return Ok(0);
    }
    if gso_segments > 1 && dlen <= u16::MAX as usize {
        let mut sent = 0;
        while sent < count {
            let k = (count - sent).min(gso_segments);
            match send_gso(sock, &buf[sent * dlen..(sent + k) * dlen], dlen as u16) {
                Ok(()) => sent += k,
                Err(e) if sent > 0 => {
                    tracing::debug!(error = %e, "GSO send cut short");
                    return Ok(sent);
                }
                Err(e) => return Err(e),
            }
        }
        return Ok(sent);
    }
    let mut iovs: Vec<libc::iovec> = (0..count)
        .map(|i| libc::iovec {
            iov_base: buf[i * dlen..].as_ptr() as *mut libc::c_void,
            iov_len: dlen,
        })
        .collect();
    // SAFETY: zeroed mmsghdr is a valid "no name, no control" header.
    let mut msgs: Vec<libc::mmsghdr> = (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov as *mut libc::iovec;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < count {
        // SAFETY: msgs/iovs point into `buf`, alive for the whole call.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[sent..].as_mut_ptr(),
                (count - sent) as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if sent > 0 {
                return Ok(sent);
            }
            return Err(e);
        }
        sent += r as usize;
    }
    Ok(sent)
}

/// One `sendmsg` with a UDP_SEGMENT control message: the kernel splits
/// `data` into datagrams of `seg` bytes.
fn send_gso(sock: &UdpSocket, data: &[u8], seg: u16) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: zeroed msghdr is valid; the cmsg is written inside `control`,
    // whose size we pass, via the CMSG_* helpers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as _;
        let cm = libc::CMSG_FIRSTHDR(&msg);
        if cm.is_null() {
            return Err(io::Error::other("no room for UDP_SEGMENT cmsg"));
        }
        (*cm).cmsg_level = libc::SOL_UDP;
        (*cm).cmsg_type = UDP_SEGMENT;
        (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut u16, seg);
        loop {
            let r = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Ask the kernel to hand us coalesced (GRO) UDP data where it can; each
/// read then carries its segment size in a control message.
pub fn enable_gro(sock: &UdpSocket) -> io::Result<()> {
    set_int_opt(sock.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1)
}

/// Reusable buffers for `recvmmsg`, GRO-aware: one read may hold many
/// datagrams of the segment size the kernel reports.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    controls: Vec<[u64; 8]>,
    /// (message, offset, length) of each datagram of the last read.
    segs: Vec<(usize, usize, usize)>,
}

/// Largest UDP payload; GRO reads can be this large.
pub const MAX_DATAGRAM: usize = 65_535;

impl RecvBatch {
    /// Buffers for `batch` datagrams per call.
    pub fn new(batch: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..batch).map(|_| vec![0u8; MAX_DATAGRAM]).collect(),
            controls: vec![[0u64; 8]; batch],
            segs: Vec::with_capacity(batch * 44),
        }
    }

    /// Datagrams per call.
    pub fn batch(&self) -> usize {
        self.bufs.len()
    }

    /// Receive up to a batch of reads without blocking. Returns the number
    /// of reads (0 when the queue is empty); [`RecvBatch::datagram`] gives
    /// the datagrams they held.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let n = self.bufs.len();
        self.segs.clear();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; we fill iov/control pointers.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for ((m, iov), c) in msgs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.controls.iter_mut())
        {
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = std::mem::size_of_val(c) as _;
        }
        // SAFETY: buffers live across the call. Non-blocking: the caller
        // polls on a timer instead of being woken per datagram, which
        // costs the sending side a wakeup per packet and us a context
        // switch per packet.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let r = r as usize;
        for (i, m) in msgs.iter().take(r).enumerate() {
            let len = m.msg_len as usize;
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > self.bufs[i].len() {
                // Longer than any datagram of ours: mark as one bad datagram
                // (length 0 fails the parser's length check).
                self.segs.push((i, 0, 0));
                continue;
            }
            let seg = gro_segment_size(&m.msg_hdr).filter(|s| *s > 0 && *s < len);
            match seg {
                Some(s) => {
                    let mut off = 0;
                    while off < len {
                        let l = s.min(len - off);
                        self.segs.push((i, off, l));
                        off += l;
                    }
                }
                None => self.segs.push((i, 0, len)),
            }
        }
        Ok(r)
    }

    /// Datagrams of the last read.
    pub fn datagrams(&self) -> usize {
        self.segs.len()
    }

    /// The `k`-th datagram of the last call.
    pub fn datagram(&self, k: usize) -> &[u8] {
        match self.segs.get(k) {
            Some(&(i, off, len)) => self.bufs[i].get(off..off + len).unwrap_or(&[]),
            None => &[],
        }
    }
}

/// The UDP_GRO segment size of a received message, if the kernel sent one.
fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: walking the control buffer the kernel filled, with the
    // lengths it reported, through the CMSG_* helpers.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(hdr);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_UDP && (*cm).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            cm = libc::CMSG_NXTHDR(hdr, cm);
        }
    }
    None
}
