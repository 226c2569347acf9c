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

fn force_buffer(sock: &Socket, opt: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt with a c_int value of the right size. The FORCE
    // variants need CAP_NET_ADMIN and bypass rmem_max; fall back silently.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
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

/// Receiving socket joined to `group` on `iface` (or the routing default).
pub fn receiver_socket(
    iface: Option<&str>,
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
        None => InterfaceIndexOrAddress::Address(Ipv4Addr::UNSPECIFIED),
    };
    sock.join_multicast_v4_n(group.ip(), &itf)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(sock.into())
}

/// Send `bufs[i][..lens[i]]` as one datagram each with one syscall per
/// kernel batch. Returns how many went; `WouldBlock`/`ENOBUFS` surface as
/// errors for the caller to retry.
pub fn send_batch(sock: &UdpSocket, bufs: &[Vec<u8>], lens: &[usize]) -> io::Result<usize> {
    let n = bufs.len().min(lens.len());
    if n == 0 {
        return Ok(0);
    }
    let mut iovs: Vec<libc::iovec> = (0..n)
        .map(|i| libc::iovec {
            iov_base: bufs[i].as_ptr() as *mut libc::c_void,
            iov_len: lens[i].min(bufs[i].len()),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is a valid "no name, no control" header.
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov as *mut libc::iovec;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < n {
        // SAFETY: msgs/iovs point into live buffers for the whole call.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[sent..].as_mut_ptr(),
                (n - sent) as libc::c_uint,
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

/// Reusable buffers for `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    count: usize,
}

impl RecvBatch {
    pub fn new(batch: usize, size: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..batch).map(|_| vec![0u8; size]).collect(),
            lens: vec![0; batch],
            count: 0,
        }
    }

    /// Receive up to a batch (blocking up to the socket's read timeout for
    /// the first datagram). Returns the number received; 0 on timeout.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; we fill iov pointers below.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: buffers live across the call; MSG_WAITFORONE returns after
        // the first datagram once the queue is drained.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let r = r as usize;
        for (i, m) in msgs.iter().take(r).enumerate() {
            // MSG_TRUNC in msg_flags: datagram was longer than our buffer.
            // Report it one byte longer than the buffer so the parser
            // rejects it as malformed instead of reading a cut datagram.
            self.lens[i] = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.bufs[i].len() + 1
            } else {
                m.msg_len as usize
            };
        }
        self.count = r;
        Ok(r)
    }

    /// The datagrams of the last `recv`; `None` for a truncated one.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if i >= self.count {
            return None;
        }
        let l = self.lens[i];
        self.bufs[i].get(..l)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
