//! A control connection: length-delimited frames of one message type per
//! direction over TLS ([`super::tls`]), a bounded frame size and a timeout
//! on every read. Both control protocols use it: a wave's session
//! (`wire::control`) and the device workflow (`wire::device`).
//!
//! Owns: framing and the mapping of I/O failures to [`ConnError`]. Must not:
//! decide anything about the session (the cores do).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;

use super::tls::CtlStream;
use crate::backoff::Backoff;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::wire::control::{self, ControlError, Msg};
use crate::wire::device::{AgentMsg, ApplianceMsg, DeviceWireError};

/// Why a framed connection failed.
#[derive(Debug, Error)]
pub enum ConnError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// Nothing arrived within the read timeout.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// A socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame longer than the limit.
    #[error("frame larger than {0} bytes")]
    Oversize(usize),
    /// A wave-control frame was refused.
    #[error(transparent)]
    Protocol(#[from] ControlError),
    /// A device-protocol frame was refused.
    #[error(transparent)]
    Device(#[from] DeviceWireError),
    /// The TLS handshake failed (for a client: the server did not prove
    /// the pinned key).
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// A message type that travels in frames.
pub trait Frame: Sized {
    /// Largest frame of this message type.
    const MAX_FRAME: usize;
    /// Encode for a frame.
    fn encode(&self) -> Result<Vec<u8>, ConnError>;
    /// Decode and check a frame.
    fn decode(frame: &[u8]) -> Result<Self, ConnError>;
}

impl Frame for Msg {
    const MAX_FRAME: usize = control::MAX_FRAME;
    fn encode(&self) -> Result<Vec<u8>, ConnError> {
        Ok(control::emit(self)?)
    }
    fn decode(frame: &[u8]) -> Result<Self, ConnError> {
        Ok(control::parse(frame)?)
    }
}

impl Frame for AgentMsg {
    const MAX_FRAME: usize = crate::wire::device::MAX_FRAME;
    fn encode(&self) -> Result<Vec<u8>, ConnError> {
        Ok(self.emit()?)
    }
    fn decode(frame: &[u8]) -> Result<Self, ConnError> {
        Ok(AgentMsg::parse(frame)?)
    }
}

impl Frame for ApplianceMsg {
    const MAX_FRAME: usize = crate::wire::device::MAX_FRAME;
    fn encode(&self) -> Result<Vec<u8>, ConnError> {
        Ok(self.emit()?)
    }
    fn decode(frame: &[u8]) -> Result<Self, ConnError> {
        Ok(ApplianceMsg::parse(frame)?)
    }
}

/// The sending half of a split connection.
pub type FrameSink =
    futures_util::stream::SplitSink<Framed<CtlStream, LengthDelimitedCodec>, bytes::Bytes>;
/// The receiving half of a split connection.
pub type FrameStream = futures_util::stream::SplitStream<Framed<CtlStream, LengthDelimitedCodec>>;

/// A framed control connection: length-delimited frames of bounded size,
/// timed reads.
pub struct Conn {
    framed: Framed<CtlStream, LengthDelimitedCodec>,
    max_frame: usize,
}

/// Connection attempts to one peer. An attempt unanswered within its
/// window is abandoned and the next one made with a fresh socket; the
/// window starts at [`Dialer::FIRST_WINDOW`] and doubles after every
/// unanswered attempt up to [`Dialer::LAST_WINDOW`] (a slow, far or
/// overloaded peer still gets through), and goes back to the start after a
/// success or a refusal.
///
/// Why not leave it to the kernel: a lost SYN-ACK, or a lost RST while the
/// peer is not listening yet, costs the kernel's 1 s initial retransmission
/// timeout (then 3 s, 7 s...). On a provisioning LAN the round trip is far
/// under a millisecond, so 50 ms without an answer means the answer was
/// lost. Measured in the netlab bench at 2 % loss towards the receivers:
/// with a 250 ms first window, 4 of 6 waves started one receiver ~270 ms
/// late.
#[derive(Debug, Clone)]
pub struct Dialer {
    addr: std::net::SocketAddr,
    window: Backoff,
}

impl Dialer {
    /// The first attempt's window.
    pub const FIRST_WINDOW: Duration = Duration::from_millis(50);
    /// The longest window.
    pub const LAST_WINDOW: Duration = Duration::from_secs(4);

    /// Attempts to connect to `addr`.
    pub fn new(addr: std::net::SocketAddr) -> Dialer {
        Dialer {
            addr,
            window: Backoff::new(Dialer::FIRST_WINDOW, Dialer::LAST_WINDOW, 200),
        }
    }

    /// The window the next attempt gets.
    pub fn window(&self) -> Duration {
        self.window.current()
    }

    /// One attempt; an unanswered one fails with `ErrorKind::TimedOut`.
    pub async fn attempt(&mut self) -> std::io::Result<TcpStream> {
        let window = self.window.current();
        let r = match tokio::time::timeout(window, TcpStream::connect(self.addr)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to the connection attempt within {window:?}"),
            )),
        };
        match &r {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.window.failed(std::time::Instant::now());
            }
            _ => self.window.succeeded(),
        }
        r
    }
}

/// `TCP_RTO_MIN_US` (Linux 6.11 and later; not in the libc crate yet).
const TCP_RTO_MIN_US: libc::c_int = 45;

/// The shortest retransmission timeout a control connection asks for.
/// Round trips on a provisioning LAN are well under a millisecond, and
/// with the kernel's 200 ms minimum one lost segment of a TLS handshake
/// or a Welcome on a lossy link held the start of a whole wave by 0.2 s
/// (the wave waits for its last member).
pub const CONTROL_RTO_MIN: Duration = Duration::from_millis(20);

/// Ask for [`CONTROL_RTO_MIN`] on `tcp`. An older kernel refuses the
/// option and keeps its own minimum: nothing else changes.
pub fn short_rto(tcp: &TcpStream) {
    use std::os::fd::AsRawFd;
    let us = CONTROL_RTO_MIN.as_micros() as libc::c_int;
    // SAFETY: setsockopt reads one c_int from the pointer we pass, of the
    // length we pass, on a descriptor `tcp` owns.
    let _ = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MIN_US,
            (&us as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet
/// (`SIOCOUTQ`: unsent plus in flight). Zero means the peer's kernel holds
/// everything we sent, so closing now cannot lose it.
pub fn unacked_bytes(fd: std::os::fd::RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one c_int through the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// The length-delimited codec with `max_frame` as its limit.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .length_field_length(4)
        .new_codec()
}

impl Conn {
    /// A connection whose largest accepted frame is `max_frame`. A server
    /// starts with the small limit of its peer's first message and lifts
    /// it with [`Conn::set_max_frame`] once the peer is authenticated, so
    /// an anonymous peer cannot make it reserve megabytes.
    pub fn new(stream: CtlStream, max_frame: usize) -> Conn {
        Conn {
            framed: Framed::new(stream, codec(max_frame)),
            max_frame,
        }
    }

    /// Change the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framed.codec_mut().set_max_frame_length(max_frame);
        self.max_frame = max_frame;
    }

    /// The TLS stream under the frames (the peer's certificate).
    pub fn stream(&self) -> &CtlStream {
        self.framed.get_ref()
    }

    /// Send one message.
    pub async fn send<M: Frame>(&mut self, msg: &M) -> Result<(), ConnError> {
        let bytes = msg.encode()?;
        SinkExt::<bytes::Bytes>::send(&mut self.framed, bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Next message, or an error: closed, timed out, oversize (the codec
    /// refuses the length before allocating) or malformed.
    pub async fn recv<M: Frame>(&mut self, timeout: Duration) -> Result<M, ConnError> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => Err(ConnError::Timeout(timeout)),
            Ok(None) => Err(ConnError::Closed),
            Ok(Some(Err(e))) => Err(map_io(e, self.max_frame)),
            Ok(Some(Ok(frame))) => M::decode(&frame),
        }
    }

    /// Best effort: send `last` (an error message), then close.
    pub async fn close_with<M: Frame>(mut self, last: M) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send(&last)).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            SinkExt::<bytes::Bytes>::close(&mut self.framed),
        )
        .await;
    }

    /// Data-plane session: tell the receiver why, then close.
    pub async fn close_with_error(self, message: String) {
        self.close_with(Msg::Error { message }).await;
    }

    /// Separate halves, for a reader and a writer running at once.
    pub fn split(self) -> (FrameSink, FrameStream) {
        self.framed.split()
    }
}

/// The codec reports an oversize length prefix as `InvalidData`.
pub fn map_io(e: std::io::Error, max_frame: usize) -> ConnError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        ConnError::Oversize(max_frame)
    } else {
        ConnError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control connections ask for a 20 ms retransmission floor; a kernel
    /// that has the option (this machine kind's 6.x does) reports it back.
    #[tokio::test]
    async fn control_connections_ask_for_a_short_retransmission_floor() {
        use std::os::fd::AsRawFd;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let get = |s: &TcpStream| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    TCP_RTO_MIN_US,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            (r == 0).then_some(v)
        };
        let Some(before) = get(&s) else {
            eprintln!("this kernel has no TCP_RTO_MIN_US: nothing to check");
            return;
        };
        assert_ne!(before, 20_000, "the default is not already 20 ms");
        short_rto(&s);
        assert_eq!(get(&s), Some(20_000));
    }

    /// A loopback listener whose accept queue is full drops further SYNs,
    /// as an appliance whose answer got lost looks to the device: attempts
    /// give up after their window, the window doubles, and once the peer
    /// answers again the next attempt connects and the window starts over.
    #[tokio::test]
    async fn unanswered_attempts_give_up_after_a_doubling_window() {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // Fill the accept queue (backlog 0 still queues one connection).
        let mut queued = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                queued.push(s);
            }
        }
        assert!(!queued.is_empty(), "the listener took no connection at all");

        let mut d = Dialer::new(addr);
        for window in [Dialer::FIRST_WINDOW, Dialer::FIRST_WINDOW * 2] {
            let t = std::time::Instant::now();
            let e = d
                .attempt()
                .await
                .expect_err("the full queue answers no SYN");
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
            assert!(
                t.elapsed() >= window,
                "gave up before its {window:?} window"
            );
        }
        assert_eq!(d.window(), Dialer::FIRST_WINDOW * 4);

        // The peer answers again: accept everything queued (and the SYNs
        // the kernel is retransmitting for abandoned attempts).
        listener.set_nonblocking(true).unwrap();
        let drain = |l: &Socket| while l.accept().is_ok() {};
        drain(&listener);
        let mut connected = None;
        for _ in 0..20 {
            drain(&listener);
            if let Ok(s) = d.attempt().await {
                connected = Some(s);
                break;
            }
        }
        assert!(
            connected.is_some(),
            "no attempt connected once the peer answered"
        );
        assert_eq!(d.window(), Dialer::FIRST_WINDOW);
    }
}
