//! rustls for both legs: the acceptor that serves clients, the connector that reaches the
//! upstream in libpq's `sslmode` terms (its client configurations also serve the admin
//! commands, `cli/pgconn.rs`), and `Stream`, a socket that may or may not be encrypted.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::UpstreamTls;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// The acceptor for client connections, from a PEM certificate chain and key.
pub fn client_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(cert)?;
    let pem = read_pem(key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
        path: key.display().to_string(),
        message: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key found".into(),
            other => other.to_string(),
        },
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How to secure the upstream leg.
#[derive(Clone)]
pub struct UpstreamConnector {
    pub mode: UpstreamTls,
    connector: Option<TlsConnector>,
    server_name: ServerName<'static>,
}

impl UpstreamConnector {
    pub fn new(mode: UpstreamTls, ca: Option<&Path>, host: &str) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::File {
            path: host.to_string(),
            message: format!("not a valid server name: {e}"),
        })?;
        Ok(UpstreamConnector {
            mode,
            connector: client_config(mode, ca)?.map(|c| TlsConnector::from(Arc::new(c))),
            server_name,
        })
    }

    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        let connector = self
            .connector
            .as_ref()
            .ok_or_else(|| io::Error::other("upstream TLS is disabled"))?;
        let tls = connector.connect(self.server_name.clone(), tcp).await?;
        Ok(Stream::UpstreamTls(Box::new(tls)))
    }
}

/// The client side of TLS in libpq's `sslmode` terms: none for `disable`; for `prefer` and
/// `require` encryption without authenticating the server; for `verify-ca` a chain to a
/// certificate of `ca`; for `verify-full` that and the server's name.
pub fn client_config(
    mode: UpstreamTls,
    ca: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, TlsError> {
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
        (UpstreamTls::Disable, _) => return Ok(None),
        (UpstreamTls::Prefer | UpstreamTls::Require, _) => Arc::new(EncryptOnly(provider())),
        (UpstreamTls::VerifyCa, Some(ca)) => Arc::new(ChainOnly(ca_verifier(ca)?)),
        (UpstreamTls::VerifyFull, Some(ca)) => ca_verifier(ca)?,
        (_, None) => {
            return Err(TlsError::File {
                path: "--upstream-ca".into(),
                message: "verify-ca and verify-full need a CA file".into(),
            })
        }
    };
    Ok(Some(client_config_with(verifier)?))
}

/// A client configuration that judges server certificates with `verifier`.
fn client_config_with(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The WebPKI verifier for chains to the certificates in `ca` (a PEM file), server name
/// included.
fn ca_verifier(ca: &Path) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::File {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
    Ok(verifier)
}

/// Accepts any server certificate but still checks the handshake signatures, as libpq's
/// `sslmode=require` does.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the certificate must chain to the root; its names are not compared with the
/// host (webpki checks the chain before the name, so a name error means the chain held).
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TCP connection, plain or under TLS, on either leg.
/// The address a client on a Unix-domain socket is recorded under (it has none); port 0,
/// which no TCP client has, tells it apart.
pub const LOCAL_PEER: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

pub enum Stream {
    Plain(TcpStream),
    /// A Unix-domain socket (no TLS there, as with PostgreSQL).
    Local(tokio::net::UnixStream),
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    UpstreamTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_) | Stream::Local(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::UpstreamTls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::UpstreamTls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Local(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_flush(cx),
            Stream::UpstreamTls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Local(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::UpstreamTls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
