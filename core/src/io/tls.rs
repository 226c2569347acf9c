//! TLS for the two control protocols (device control, wave control).
//!
//! The appliance's identity is its Ed25519 signing key (see `signing`):
//! a network-booted loader knows only that key's fingerprint, from
//! `rackcast.key=` on its kernel command line. So the server presents a
//! self-signed certificate *for that key* and the client checks nothing
//! but this: the certificate's public key is an Ed25519 key whose BLAKE3
//! is the pinned fingerprint, and the handshake is signed by it (TLS 1.3
//! CertificateVerify). A host that only copied the public key, or the
//! certificate, cannot complete the handshake. No names, dates or CAs are
//! involved: the pin is the whole trust anchor, as in SSH.
//!
//! Without a pin (a hand-started agent, a lab `rackcast send`) the
//! connection is still encrypted and the key is still proven, but any key
//! is accepted; [`peer_key`] tells the caller which one it was, so it can
//! hold later connections to it.
//!
//! Owns: the client verifier, the rustls configurations, handshakes with
//! a deadline. Must not: make certificates (the appliance does, with
//! rcgen) or decide whom to trust.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tokio::net::TcpStream;

use crate::signing::PUBLIC_KEY_LEN;

pub use rustls::{ClientConfig, ServerConfig};

/// A control connection's stream: TLS over TCP, either side.
pub type CtlStream = tokio_rustls::TlsStream<TcpStream>;

/// The name the client asks for; certificates are checked by key, not
/// name, so it is a constant.
pub const SERVER_NAME: &str = "rackcast-appliance";

/// How long a handshake may take before the connection is dropped: a
/// peer that opens TCP and says nothing must not hold a task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE,
/// AlgorithmIdentifier { id-Ed25519 }, BIT STRING of 33 bytes (0 unused
/// bits, then the key).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410 §7), then
/// the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a TLS configuration or handshake failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// rustls refused the key or certificate.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (wrong key, not TLS, reset).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The handshake did not finish in time.
    #[error("TLS handshake took longer than {0:?}")]
    Timeout(Duration),
}

/// PKCS#8 (v1) encoding of an Ed25519 key given by its seed.
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

/// The Ed25519 public key of a certificate, if that is what it holds.
pub fn cert_ed25519_key(cert: &CertificateDer<'_>) -> Option<[u8; PUBLIC_KEY_LEN]> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let der: &[u8] = spki.as_ref();
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

// ring, not aws-lc-rs: the one provider the workspace builds (no aws-lc C
// build). Newer rustls marks ring's provider deprecated (no post-quantum
// key exchange); the fuzz crate resolves such a rustls, hence the allow.
// X25519 alone is a residual risk (docs/security.md).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: `cert` must be a certificate for the key whose seed is
/// `seed` (rustls checks the pair). TLS 1.3 only.
pub fn server_config(
    cert: CertificateDer<'static>,
    seed: &[u8; 32],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed)));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    // No session tickets: every connection is a full handshake in which
    // the appliance proves its key (an agent's reconnects are rare, and
    // the loader and the bundle's agent are different processes anyway).
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The client side: the server must prove the key with fingerprint `pin`
/// (BLAKE3 of the raw Ed25519 key, hex); with `None`, any Ed25519 key.
pub fn client_config(pin: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinVerifier {
        pin: pin.map(str::to_ascii_lowercase),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Accepts exactly one Ed25519 key (or any, without a pin) and checks
/// that the handshake is signed with it.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = cert_ed25519_key(end_entity).ok_or_else(|| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let got = crate::signing::fingerprint(&key);
        match &self.pin {
            // Said in words: the operator reading the loader's log must
            // see which key it met and which it trusts.
            Some(pin) if got != *pin => Err(rustls::Error::General(format!(
                "the appliance's key {got} is not the trusted key {pin}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is not offered; a server that negotiates it anyway is
        // refused here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The proof of possession: the CertificateVerify signature over the
        // handshake transcript, by the certificate's (pinned) key.
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Client handshake over `tcp`, within [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    cfg: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> Result<CtlStream, TlsError> {
    let _ = tcp.set_nodelay(true);
    crate::io::conn::short_rto(&tcp);
    let name = ServerName::try_from(SERVER_NAME)
        .map_err(|e| TlsError::Handshake(std::io::Error::other(e.to_string())))?;
    let c = tokio_rustls::TlsConnector::from(cfg.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, c.connect(name, tcp)).await {
        Err(_) => Err(TlsError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(Err(e)) => Err(TlsError::Handshake(e)),
        Ok(Ok(s)) => Ok(tokio_rustls::TlsStream::Client(s)),
    }
}

/// Server handshake over `tcp`, within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(
    cfg: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<CtlStream, TlsError> {
    let _ = tcp.set_nodelay(true);
    crate::io::conn::short_rto(&tcp);
    let a = tokio_rustls::TlsAcceptor::from(cfg.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
        Err(_) => Err(TlsError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(Err(e)) => Err(TlsError::Handshake(e)),
        Ok(Ok(s)) => Ok(tokio_rustls::TlsStream::Server(s)),
    }
}

/// The Ed25519 key the server proved in this (client) connection.
pub fn peer_key(s: &CtlStream) -> Option<[u8; PUBLIC_KEY_LEN]> {
    let (_, conn) = s.get_ref();
    let certs = conn.peer_certificates()?;
    cert_ed25519_key(certs.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::sign::CertifiedKey;

    fn cert_for(seed: &[u8; 32]) -> CertificateDer<'static> {
        let pkcs8 = PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed));
        let key =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        CertificateDer::from(cert.der().to_vec())
    }

    /// Presents `cert` but signs the handshake with the key of `seed`:
    /// a host that copied the appliance's certificate.
    #[derive(Debug)]
    struct Copied(Arc<CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Copied {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn copied_cert_server(cert: CertificateDer<'static>, seed: &[u8; 32]) -> Arc<ServerConfig> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed)));
        let key = rustls::crypto::ring::sign::any_eddsa_type(match &der {
            PrivateKeyDer::Pkcs8(k) => k,
            _ => unreachable!(),
        })
        .unwrap();
        let ck = Arc::new(CertifiedKey::new(vec![cert], key));
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Copied(ck)));
        Arc::new(cfg)
    }

    /// Serve one handshake with `server`, connect with `pin`: the
    /// client's result.
    async fn handshake(
        server: Arc<ServerConfig>,
        pin: Option<String>,
    ) -> Result<[u8; PUBLIC_KEY_LEN], String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let _ = accept(&server, tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let cfg = client_config(pin.as_deref()).unwrap();
        let r = connect(&cfg, tcp)
            .await
            .map_err(|e| e.to_string())
            .and_then(|s| peer_key(&s).ok_or_else(|| "no key".to_string()));
        srv.abort();
        r
    }

    #[tokio::test]
    async fn only_the_holder_of_the_pinned_key_is_followed() {
        let (real, rogue) = ([7u8; 32], [8u8; 32]);
        let real_pub = crate::signing::BundleSigner::from_seed(real).public_key();
        let pin = crate::signing::fingerprint(&real_pub);
        let appliance = server_config(cert_for(&real), &real).unwrap();
        // The appliance proves its key; without a pin the key is reported.
        assert_eq!(
            handshake(appliance.clone(), Some(pin.clone())).await,
            Ok(real_pub)
        );
        assert_eq!(handshake(appliance, None).await, Ok(real_pub));
        // Another host with its own key: refused, and said in words.
        let other = server_config(cert_for(&rogue), &rogue).unwrap();
        let e = handshake(other, Some(pin.clone())).await.unwrap_err();
        assert!(e.contains(&format!("is not the trusted key {pin}")), "{e}");
        // A host presenting the appliance's own certificate without its
        // key cannot sign the handshake: refused.
        let copied = copied_cert_server(cert_for(&real), &rogue);
        let e = handshake(copied.clone(), Some(pin)).await.unwrap_err();
        assert!(e.contains("TLS handshake"), "{e}");
        assert!(handshake(copied, None).await.is_err(), "not even unpinned");
    }

    /// No resumption: a client's second connection is again a full
    /// handshake in which the appliance proves its key (it offered no
    /// ticket to resume with).
    #[tokio::test]
    async fn every_connection_is_a_full_handshake() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let seed = [7u8; 32];
        let server = server_config(cert_for(&seed), &seed).unwrap();
        let client = client_config(None).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = l.accept().await.unwrap();
                let mut s = accept(&server, tcp).await.unwrap();
                s.write_all(b"x").await.unwrap();
                s.flush().await.unwrap();
            }
        });
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut s = connect(&client, tcp).await.unwrap();
            // Read past anything the server sent after the handshake
            // (where session tickets would be).
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(
                s.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Full)
            );
        }
        srv.await.unwrap();
    }

    #[test]
    fn certificate_keys_are_read_only_when_ed25519() {
        let seed = [3u8; 32];
        let want = crate::signing::BundleSigner::from_seed(seed).public_key();
        assert_eq!(cert_ed25519_key(&cert_for(&seed)), Some(want));
        let ecdsa = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        assert_eq!(
            cert_ed25519_key(&CertificateDer::from(ecdsa.cert.der().to_vec())),
            None
        );
        assert_eq!(
            cert_ed25519_key(&CertificateDer::from(vec![0x30, 0x03])),
            None
        );
    }
}
