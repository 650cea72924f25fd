//! The session's link to the real server: TCP connect with a deadline, then TLS
//! negotiation in libpq's `sslmode` terms.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::SessionError;
use crate::config::UpstreamTls;
use crate::protocol::startup::{ssl_request_packet, CancelKey};
use crate::proxy::Proxy;
use crate::tls::Stream;

/// Opens a connection to the upstream, encrypted as configured.
pub async fn connect(proxy: &Proxy) -> Result<Stream, SessionError> {
    let cfg = &proxy.config;
    if let Some(path) = &cfg.upstream_socket {
        // The server offers no TLS here; the configuration allows only disable or prefer.
        let local = tokio::time::timeout(
            cfg.limits.connect_timeout,
            tokio::net::UnixStream::connect(path),
        )
        .await
        .map_err(|_| SessionError::Connect(format!("{} timed out", path.display())))?
        .map_err(|e| SessionError::Connect(format!("{}: {e}", path.display())))?;
        return Ok(Stream::Local(local));
    }
    let tcp = tokio::time::timeout(
        cfg.limits.connect_timeout,
        TcpStream::connect(&cfg.upstream),
    )
    .await
    .map_err(|_| SessionError::Connect(format!("{} timed out", cfg.upstream)))?
    .map_err(|e| SessionError::Connect(format!("{}: {e}", cfg.upstream)))?;
    tcp.set_nodelay(true).ok();
    let connector = proxy.upstream_tls();
    if connector.mode == UpstreamTls::Disable {
        return Ok(Stream::Plain(tcp));
    }
    let negotiate = async {
        let mut tcp = tcp;
        tcp.write_all(&ssl_request_packet()).await?;
        let answer = tcp.read_u8().await?;
        Ok::<_, std::io::Error>((tcp, answer))
    };
    let (tcp, answer) = tokio::time::timeout(cfg.limits.connect_timeout, negotiate)
        .await
        .map_err(|_| SessionError::Connect("TLS negotiation timed out".into()))?
        .map_err(|e| SessionError::Connect(format!("TLS negotiation: {e}")))?;
    match (answer, connector.mode) {
        (b'S', _) => tokio::time::timeout(cfg.limits.connect_timeout, connector.connect(tcp))
            .await
            .map_err(|_| SessionError::Connect("TLS handshake timed out".into()))?
            .map_err(|e| SessionError::Connect(format!("TLS handshake: {e}"))),
        (b'N', UpstreamTls::Prefer) => Ok(Stream::Plain(tcp)),
        (b'N', _) => Err(SessionError::Connect(
            "the server does not accept TLS but --upstream-tls requires it".into(),
        )),
        (other, _) => Err(SessionError::Connect(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        ))),
    }
}

/// Forwards a cancel request for `key` to the upstream. The server answers nothing.
pub async fn cancel(proxy: &Proxy, key: CancelKey) -> Result<(), SessionError> {
    let mut stream = connect(proxy).await?;
    stream
        .write_all(&key.request_packet())
        .await
        .map_err(SessionError::upstream)?;
    stream.flush().await.map_err(SessionError::upstream)?;
    // Wait for the server to close, so the cancel is processed before we return.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(proxy.config.limits.connect_timeout, stream.read(&mut sink)).await;
    Ok(())
}
