//! One console connection, with pgwire's message loop over a stream pgveil bounds: pgveil
//! answers SSLRequest and GSSENCRequest itself (TLS with the clients' certificate now in
//! force), then hands pgwire the startup packet and a stream that refuses any message
//! longer than [`MAX_MESSAGE`]. pgwire on its own buffers a message of up to 1 GiB, before
//! authentication too; console commands are a few words.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use pgwire::api::{
    ClientInfo, DefaultClient, ErrorHandler, PgWireConnectionState, PgWireServerHandlers,
};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::tokio::server::{process_error, process_message, PgWireMessageServerCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Framed, FramedParts};

/// The longest message a console client may send (startup packet, password, command).
pub const MAX_MESSAGE: usize = 64 * 1024;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// The first 8 bytes of a packet: its length and its code.
async fn packet_head(s: &mut (impl AsyncRead + Unpin)) -> io::Result<(usize, u32, [u8; 8])> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let code = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
    Ok((len, code, head))
}

fn refused(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Negotiates encryption; returns the stream and the head of the startup packet.
async fn negotiate(
    mut tcp: TcpStream,
    tls: Option<Arc<TlsAcceptor>>,
) -> io::Result<(Box<dyn Io>, bool, [u8; 8], usize)> {
    loop {
        let (len, code, head) = packet_head(&mut tcp).await?;
        match code {
            SSL_REQUEST | GSSENC_REQUEST if len != 8 => return Err(refused("bad request")),
            SSL_REQUEST => match &tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await?;
                    let mut stream = acceptor.accept(tcp).await?;
                    let (len, _, head) = packet_head(&mut stream).await?;
                    return Ok((Box::new(stream), true, head, len));
                }
                None => tcp.write_all(b"N").await?,
            },
            GSSENC_REQUEST => tcp.write_all(b"N").await?,
            _ => return Ok((Box::new(tcp), false, head, len)),
        }
    }
}

/// Serves one connection to its end.
pub async fn serve<H: PgWireServerHandlers>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsAcceptor>>,
    handlers: &H,
    startup_timeout: Duration,
) -> io::Result<()> {
    let opened = tokio::time::timeout(startup_timeout, negotiate(tcp, tls)).await;
    let (stream, secure, head, len) = opened.map_err(|_| refused("startup timed out"))??;
    // The startup packet's own limit is pgwire's (10000 bytes); a cancel request is not
    // for the console.
    let code = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
    if !(8..=10_000).contains(&len) || code == CANCEL_REQUEST {
        return Err(refused("not a startup packet"));
    }
    let bounded = Bounded {
        inner: stream,
        frame: Frame::Body(len - 8),
        limit: MAX_MESSAGE,
    };
    let codec = PgWireMessageServerCodec::new(DefaultClient::new(peer, secure));
    let mut parts = FramedParts::new(bounded, codec);
    parts.read_buf = BytesMut::from(&head[..]);
    let mut socket = Framed::from_parts(parts);
    socket.set_state(PgWireConnectionState::AwaitingStartup);

    let startup = handlers.startup_handler();
    let simple = handlers.simple_query_handler();
    let extended = handlers.extended_query_handler();
    let copy = handlers.copy_handler();
    let cancel = handlers.cancel_handler();
    let errors = handlers.error_handler();
    let deadline = tokio::time::sleep(startup_timeout);
    tokio::pin!(deadline);
    loop {
        let authenticating = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        );
        let msg = if authenticating {
            tokio::select! {
                _ = &mut deadline => return Ok(()),
                msg = socket.next() => msg,
            }
        } else {
            socket.next().await
        };
        let Some(Ok(msg)) = msg else { return Ok(()) };
        if matches!(
            msg,
            PgWireFrontendMessage::Terminate(_) | PgWireFrontendMessage::CancelRequest(_)
        ) {
            return Ok(());
        }
        let extended_query = msg.is_extended_query();
        if let Err(mut e) = process_message(
            msg,
            &mut socket,
            startup.clone(),
            simple.clone(),
            extended.clone(),
            copy.clone(),
            cancel.clone(),
        )
        .await
        {
            errors.on_error(&socket, &mut e);
            let fatal = e.is_fatal();
            process_error(&mut socket, e, extended_query).await?;
            if fatal {
                return Ok(());
            }
        }
    }
}

/// Where a [`Bounded`] stream is in the client's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// Inside a message, this many bytes to go.
    Body(usize),
    /// Reading a message's tag and length: the bytes so far.
    Header([u8; 5], usize),
}

/// A client stream that fails as soon as a message announces more than `limit` bytes,
/// before any of it is buffered.
struct Bounded<S> {
    inner: S,
    frame: Frame,
    limit: usize,
}

impl<S> Bounded<S> {
    fn scan(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.frame = match self.frame {
                Frame::Body(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    match left - n {
                        0 => Frame::Header([0; 5], 0),
                        rest => Frame::Body(rest),
                    }
                }
                Frame::Header(mut head, got) => {
                    let n = (5 - got).min(bytes.len());
                    head[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if got + n < 5 {
                        Frame::Header(head, got + n)
                    } else {
                        let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
                        let len = len as usize;
                        if !(4..=self.limit).contains(&len) {
                            return Err(refused(&format!(
                                "a {len}-byte message; the admin console takes at most {}",
                                self.limit
                            )));
                        }
                        match len - 4 {
                            0 => Frame::Header([0; 5], 0),
                            body => Frame::Body(body),
                        }
                    }
                }
            };
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.scan(&buf.filled()[before..])),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(limit: usize) -> Bounded<()> {
        Bounded {
            inner: (),
            frame: Frame::Header([0; 5], 0),
            limit,
        }
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_split() {
        let mut all = message(b'p', b"secret\0");
        all.extend(message(b'Q', b"SHOW CLIENTS\0"));
        all.extend(message(b'X', b""));
        for split in 0..all.len() {
            let mut b = bounded(64);
            b.scan(&all[..split]).unwrap();
            b.scan(&all[split..]).unwrap();
            assert_eq!(b.frame, Frame::Header([0; 5], 0));
        }
    }

    #[test]
    fn a_message_announced_over_the_limit_fails_before_its_body() {
        let mut b = bounded(64);
        let mut head = vec![b'Q'];
        head.extend_from_slice(&(0x3fff_fffdu32).to_be_bytes());
        assert!(b.scan(&head[..3]).is_ok());
        assert!(b.scan(&head[3..]).is_err());
        let mut b = bounded(64);
        assert!(
            b.scan(&[b'Q', 0, 0, 0, 3]).is_err(),
            "lengths below 4 are invalid"
        );
    }
}
