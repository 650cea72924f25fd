//! Bounded framing of typed protocol messages: one tag byte, an Int32 length that counts
//! itself, then the body. The length is checked before anything is allocated for it.

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a peer's bytes could not be framed or understood.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {limit}")]
    TooLong { tag: char, len: usize, limit: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unexpected message type {tag:?} {during}")]
    Unexpected { tag: char, during: &'static str },
    /// A request sent into COPY FROM STDIN, where the server reads only the copy stream:
    /// it would consume the request as a protocol error, answering nothing for it.
    #[error("a message other than CopyData, CopyDone or CopyFail was sent during COPY FROM STDIN")]
    IntoCopy,
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// Whether this is the peer going away rather than a fault worth reporting.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Closed => true,
            ProtocolError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// One complete typed message, tag and length included, exactly as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Wraps bytes that hold exactly one framed message (tag, length, body).
    pub fn from_raw(raw: Bytes) -> Result<Frame, ProtocolError> {
        if raw.len() < 5 {
            return Err(ProtocolError::Malformed { what: "frame" });
        }
        let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
        if len + 1 != raw.len() {
            return Err(ProtocolError::Malformed { what: "frame" });
        }
        Ok(Frame { raw })
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message body, after the tag and the length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The bytes as they arrived, ready to forward.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// Reads whole frames from a stream into an internal buffer.
///
/// Cancel safety: `next` keeps all partial input in the buffer, so dropping its future
/// (for example in `tokio::select!`) loses nothing; the next call resumes.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
    /// How much room each read asks for: small for a session that exchanges short
    /// messages (most of them, idle ones above all: this is per-session memory), doubled
    /// up to [`MAX_READ_CHUNK`] whenever a read fills all the room it had.
    chunk: usize,
}

const MIN_READ_CHUNK: usize = 4 * 1024;
const MAX_READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::new(),
            max_len,
            chunk: MIN_READ_CHUNK,
        }
    }

    /// A frame already complete in the buffer, without touching the stream.
    pub fn buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        split_frame(&mut self.buf, self.max_len)
    }

    /// Whether part of a frame is waiting in the buffer.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next frame; `Err(Closed)` on a clean end of stream between frames.
    pub async fn next(&mut self) -> Result<Frame, ProtocolError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
                self.buf.reserve(self.chunk);
            }
            let room = self.buf.capacity() - self.buf.len();
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == room && self.chunk < MAX_READ_CHUNK {
                self.chunk *= 2;
            }
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    ProtocolError::Closed
                } else {
                    ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into())
                });
            }
        }
    }

    pub fn into_inner(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

/// Splits one frame off the front of `buf` when it is complete.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag as char,
            len: len.into(),
        });
    }
    let len = len as usize;
    if len > max_len {
        return Err(ProtocolError::TooLong {
            tag: tag as char,
            len,
            limit: max_len,
        });
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(len + 1).freeze(),
    }))
}

/// Reads NUL-terminated strings and big-endian integers from a message body.
pub struct BodyReader<'a> {
    body: &'a [u8],
    what: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(body: &'a [u8], what: &'static str) -> Self {
        BodyReader { body, what }
    }

    fn malformed(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }

    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed())
    }

    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = memchr(self.body).ok_or_else(|| self.malformed())?;
        let (s, rest) = self.body.split_at(end);
        self.body = &rest[1..];
        Ok(s)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.body.len() < n {
            return Err(self.malformed());
        }
        let (b, rest) = self.body.split_at(n);
        self.body = rest;
        Ok(b)
    }

    /// A count that must be non-negative, each element at least `min_each` bytes.
    pub fn count(&mut self, min_each: usize) -> Result<usize, ProtocolError> {
        let n = self.i16()?;
        if n < 0 || (n as usize) * min_each > self.body.len() {
            return Err(self.malformed());
        }
        Ok(n as usize)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.body
    }

    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(self.malformed())
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn rejects_lengths_below_four() {
        let mut buf = BytesMut::from(&b"Q\x00\x00\x00\x03x"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(ProtocolError::BadLength { .. })
        ));
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(ProtocolError::BadLength { .. })
        ));
    }

    #[test]
    fn rejects_oversized_before_allocating() {
        let mut buf = BytesMut::from(&b"Q\x10\x00\x00\x00"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(buf.capacity() < 4096);
    }

    #[tokio::test]
    async fn frames_split_across_reads_and_batched() {
        let (mut a, b) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            a.write_all(b"Q\x00\x00\x00\x0dSELECT 1\x00S\x00\x00\x00\x04")
                .await
                .unwrap();
        });
        let mut r = FrameReader::new(b, 1 << 20);
        let q = r.next().await.unwrap();
        assert_eq!(q.tag(), b'Q');
        assert_eq!(q.body(), b"SELECT 1\x00");
        let s = r.next().await.unwrap();
        assert_eq!(s.tag(), b'S');
        assert!(s.body().is_empty());
        writer.await.unwrap();
        assert!(matches!(r.next().await, Err(ProtocolError::Closed)));
    }

    #[tokio::test]
    async fn torn_frame_is_an_error_not_a_clean_close() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"Q\x00\x00\x00\x0dSEL").await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 1 << 20);
        let err = r.next().await.unwrap_err();
        assert!(matches!(err, ProtocolError::Io(_)));
    }
}
