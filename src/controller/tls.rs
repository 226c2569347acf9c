//! The operator listener's transport: TLS (rustls) with the appliance's
//! certificate, made self-signed on first start unless the config names
//! one, and bounded connections.
//!
//! Owns: the certificate files, the TLS handshakes (concurrent, each with
//! a deadline, so a client that never finishes one holds nothing but its
//! own slot) and the connection caps (in total and per source address).
//! Must not: authenticate operators (`auth` does, per request) or route.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::limits::{Caps, Slot};

/// Connections open at once on the operator listener.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections open at once from one source address.
pub const MAX_PER_SOURCE: u32 = 16;
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The operator certificate and key (PEM), made self-signed for the
/// listener's address and `localhost` when neither exists. The key file is
/// owner-only.
pub fn ensure_certificate(cfg: &Config) -> anyhow::Result<()> {
    let (cert, key) = cfg.operator_tls_paths();
    if cert.exists() || key.exists() {
        return Ok(());
    }
    let mut names = vec!["localhost".to_string()];
    if let Some(a) = cfg.appliance.operator_listen {
        names.push(a.ip().to_string());
    }
    let made = rcgen::generate_simple_self_signed(names)?;
    write_private(&key, made.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, made.cert.pem())?;
    tracing::info!(cert = %cert.display(), "made the operator API's self-signed certificate");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The control listeners' TLS (device control, wave control): a
/// self-signed certificate for the bundle-signing key itself, made at each
/// start (the key is what loaders pin, not the certificate). TLS 1.3 only.
pub fn control_config(
    signer: &rackcast_core::signing::BundleSigner,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let seed = signer.seed();
    let pkcs8 = PrivatePkcs8KeyDer::from(rackcast_core::io::tls::ed25519_pkcs8(&seed));
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
    let cert =
        rcgen::CertificateParams::new(vec![rackcast_core::io::tls::SERVER_NAME.to_string()])?
            .self_signed(&key)?;
    let der = CertificateDer::from(cert.der().to_vec());
    Ok(rackcast_core::io::tls::server_config(der, &seed)?)
}

/// The rustls server config from the operator certificate and key.
pub fn server_config(cfg: &Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = cfg.operator_tls_paths();
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("operator certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| anyhow::anyhow!("operator key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// The operator listener: TCP accepted and capped, TLS handshakes done
/// concurrently, finished connections handed to the HTTP server.
pub struct TlsListener {
    ready: mpsc::Receiver<(Guarded, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn spawn(tcp: TcpListener, tls: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, tokio_rustls::TlsAcceptor::from(tls), tx));
        Ok(TlsListener { ready, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: mpsc::Sender<(Guarded, SocketAddr)>,
) {
    let caps = Caps::new(MAX_CONNECTIONS, MAX_PER_SOURCE);
    loop {
        let (sock, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "operator listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match caps.take(peer.ip()) {
            Ok(s) => s,
            Err(full) => {
                refuse(peer, full.reason());
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(tls)) => {
                    let io = Guarded {
                        inner: tls,
                        _slot: slot,
                    };
                    let _ = ready.send((io, peer)).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("rackcast_api_refused_total", "reason" => "tls").increment(1);
                    tracing::debug!(%peer, error = %e, "operator listener: TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("rackcast_api_refused_total", "reason" => "tls timeout")
                        .increment(1);
                    tracing::debug!(%peer, "operator listener: TLS handshake timed out");
                }
            }
        });
    }
}

fn refuse(peer: SocketAddr, why: &'static str) {
    metrics::counter!("rackcast_api_refused_total", "reason" => why).increment(1);
    tracing::warn!(%peer, "operator listener: connections {why}; connection closed");
}

impl axum::serve::Listener for TlsListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept loop only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client's address, for handlers and the auth layer.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A TLS connection holding its places in the caps until it closes.
pub struct Guarded {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: Slot,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
