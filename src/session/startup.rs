//! The opening of a client connection: SSLRequest (answered `S` with rustls when a
//! certificate is configured, `N` otherwise), GSSENCRequest (always `N`), then either a
//! CancelRequest or the StartupMessage.

use std::future::poll_fn;
use std::task::Poll;

use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::error::SessionError;
use crate::protocol::startup::{read_startup_packet, CancelKey, StartupMessage, StartupPacket};
use crate::protocol::ProtocolError;
use crate::proxy::Proxy;
use crate::tls::Stream;

/// How a client opened its connection.
pub enum Opening {
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Runs the startup-phase negotiation. The stream comes back in every case (encrypted
/// if TLS was negotiated) so that an error can still be reported on it.
pub async fn negotiate(
    mut stream: Stream,
    proxy: &Proxy,
) -> (Option<Stream>, Result<Opening, SessionError>) {
    let mut asked_gss = false;
    let mut asked_ssl = false;
    loop {
        let packet = match read_startup_packet(&mut stream).await {
            Ok(p) => p,
            Err(e) => return (Some(stream), Err(SessionError::from_client(e))),
        };
        match packet {
            // As PostgreSQL does, no TLS over a Unix-domain socket.
            StartupPacket::SslRequest if matches!(stream, Stream::Local(_)) && !asked_ssl => {
                asked_ssl = true;
                if let Err(e) = stream.write_all(b"N").await {
                    return (None, Err(SessionError::from_client(e.into())));
                }
            }
            StartupPacket::SslRequest => {
                let Stream::Plain(tcp) = stream else {
                    let err = ProtocolError::Unexpected {
                        tag: '\0',
                        during: "(SSLRequest over TLS)",
                    };
                    return (Some(stream), Err(SessionError::Client(err)));
                };
                match start_tls(tcp, proxy).await {
                    Ok(s) => stream = s,
                    Err((s, e)) => return (s, Err(e)),
                }
            }
            StartupPacket::GssEncRequest if !asked_gss && !stream.is_tls() => {
                asked_gss = true;
                if let Err(e) = stream.write_all(b"N").await {
                    return (None, Err(SessionError::from_client(e.into())));
                }
            }
            StartupPacket::GssEncRequest => {
                let err = ProtocolError::Unexpected {
                    tag: '\0',
                    during: "(repeated GSSENCRequest)",
                };
                return (Some(stream), Err(SessionError::Client(err)));
            }
            StartupPacket::Cancel(key) => return (Some(stream), Ok(Opening::Cancel(key))),
            StartupPacket::Startup(msg) => return (Some(stream), Ok(Opening::Startup(msg))),
        }
    }
}

type TlsStart = Result<Stream, (Option<Stream>, SessionError)>;

async fn start_tls(mut tcp: TcpStream, proxy: &Proxy) -> TlsStart {
    let Some(acceptor) = proxy.client_tls() else {
        return match tcp.write_all(b"N").await {
            Ok(()) => Ok(Stream::Plain(tcp)),
            Err(e) => Err((None, SessionError::from_client(e.into()))),
        };
    };
    // Bytes already waiting would be plaintext injected before the handshake
    // (CVE-2021-23214): the server refuses them, and so do we.
    if has_waiting_bytes(&tcp).await {
        let err = SessionError::Client(ProtocolError::Unexpected {
            tag: '?',
            during: "(unencrypted data after SSLRequest)",
        });
        return Err((Some(Stream::Plain(tcp)), err));
    }
    if let Err(e) = tcp.write_all(b"S").await {
        return Err((None, SessionError::from_client(e.into())));
    }
    match acceptor.accept(tcp).await {
        Ok(tls) => Ok(Stream::ClientTls(Box::new(tls))),
        Err(e) => {
            tracing::info!("client TLS handshake failed: {e}");
            Err((None, SessionError::ClientGone))
        }
    }
}

/// Whether the client has sent anything we have not read, without waiting for more.
async fn has_waiting_bytes(tcp: &TcpStream) -> bool {
    poll_fn(|cx| {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match tcp.poll_peek(cx, &mut buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(n > 0),
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
        }
    })
    .await
}
