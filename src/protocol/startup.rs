//! Untyped startup-phase packets (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage). They are read with exact reads so that no byte past the packet is
//! buffered: whatever a client sends after an SSLRequest stays in the socket for the TLS
//! handshake to reject (the CVE-2021-23214 pattern).

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::{BodyReader, ProtocolError};

/// The server's own limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// A backend's cancellation key as carried by BackendKeyData and CancelRequest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

impl CancelKey {
    /// The 16-byte CancelRequest packet for this key.
    pub fn request_packet(&self) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[0..4].copy_from_slice(&16i32.to_be_bytes());
        p[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
        p[8..12].copy_from_slice(&self.pid.to_be_bytes());
        p[12..16].copy_from_slice(&self.secret.to_be_bytes());
        p
    }
}

/// The first packet(s) a client sends.
#[derive(Debug)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version and parameters, with its original bytes.
#[derive(Clone, Debug)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
    raw: Bytes,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The bytes as the client sent them.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// A parameter's value as the client sent it (the text of [`Self::param`] replaces
    /// bytes that are not UTF-8).
    pub fn param_bytes(&self, name: &str) -> Option<&[u8]> {
        let mut fields = self.raw.get(8..)?.split(|&b| b == 0);
        while let Some(key) = fields.next() {
            let value = fields.next()?;
            if key == name.as_bytes() {
                return Some(value);
            }
            if key.is_empty() {
                return None;
            }
        }
        None
    }

    /// Builds a protocol 3.0 StartupMessage (used by tests and tools).
    pub fn new(params: &[(&str, &str)]) -> StartupMessage {
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(196608);
        for (k, v) in params {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let len = b.len() as i32;
        b[0..4].copy_from_slice(&len.to_be_bytes());
        StartupMessage {
            major: 3,
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            raw: b.freeze(),
        }
    }

    /// Whether the client asks for a replication connection.
    pub fn is_replication(&self) -> bool {
        match self.param("replication") {
            None => false,
            Some(v) => !matches!(
                v.to_ascii_lowercase().as_str(),
                "false" | "off" | "no" | "0"
            ),
        }
    }
}

/// Reads one startup-phase packet with exact reads.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<StartupPacket, ProtocolError> {
    let mut len_bytes = [0u8; 4];
    match r.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len_bytes);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(ProtocolError::BadLength {
            tag: '\0',
            len: len.into(),
        });
    }
    let mut packet = BytesMut::zeroed(len as usize);
    packet[0..4].copy_from_slice(&len_bytes);
    r.read_exact(&mut packet[4..]).await?;
    parse_startup_packet(packet.freeze())
}

/// Parses a startup-phase packet held whole in `raw` (length word included).
pub fn parse_startup_packet(raw: Bytes) -> Result<StartupPacket, ProtocolError> {
    let mut r = BodyReader::new(&raw[4..], "startup");
    let code = r.i32()?;
    match code {
        SSL_REQUEST => {
            r.finish()?;
            Ok(StartupPacket::SslRequest)
        }
        GSSENC_REQUEST => {
            r.finish()?;
            Ok(StartupPacket::GssEncRequest)
        }
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let secret = r.i32()?;
            r.finish()?;
            Ok(StartupPacket::Cancel(CancelKey { pid, secret }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let key = r.cstr_bytes()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr_bytes()?;
                params.push((
                    String::from_utf8_lossy(key).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                ));
            }
            r.finish()?;
            Ok(StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
                raw,
            }))
        }
    }
}

/// The SSLRequest packet, for the upstream leg.
pub fn ssl_request_packet() -> [u8; 8] {
    let mut p = [0u8; 8];
    p[0..4].copy_from_slice(&8i32.to_be_bytes());
    p[4..8].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_startup_and_reads_no_further() {
        let msg = StartupMessage::new(&[("user", "alice"), ("database", "crm")]);
        let mut input = msg.raw().to_vec();
        input.extend_from_slice(b"trailing");
        let mut cursor = std::io::Cursor::new(input);
        let StartupPacket::Startup(got) = read_startup_packet(&mut cursor).await.unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(got.param("user"), Some("alice"));
        assert_eq!(got.param("database"), Some("crm"));
        assert_eq!(got.param_bytes("database"), Some(&b"crm"[..]));
        assert_eq!(got.param_bytes("options"), None);
        assert_eq!(cursor.position() as usize, msg.raw().len());
    }

    #[tokio::test]
    async fn ssl_request_and_cancel() {
        let mut c = std::io::Cursor::new(ssl_request_packet().to_vec());
        assert!(matches!(
            read_startup_packet(&mut c).await.unwrap(),
            StartupPacket::SslRequest
        ));
        let key = CancelKey {
            pid: 42,
            secret: -7,
        };
        let mut c = std::io::Cursor::new(key.request_packet().to_vec());
        match read_startup_packet(&mut c).await.unwrap() {
            StartupPacket::Cancel(k) => assert_eq!(k, key),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn rejects_bad_lengths_and_versions() {
        let mut c = std::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
        assert!(read_startup_packet(&mut c).await.is_err());
        let mut c = std::io::Cursor::new(vec![0, 0, 0x40, 0]);
        assert!(read_startup_packet(&mut c).await.is_err());
        let mut v = 8i32.to_be_bytes().to_vec();
        v.extend_from_slice(&(2i32 << 16).to_be_bytes());
        let mut c = std::io::Cursor::new(v);
        assert!(matches!(
            read_startup_packet(&mut c).await,
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
    }

    #[test]
    fn replication_flag() {
        assert!(StartupMessage::new(&[("replication", "database")]).is_replication());
        assert!(StartupMessage::new(&[("replication", "true")]).is_replication());
        assert!(!StartupMessage::new(&[("replication", "off")]).is_replication());
        assert!(!StartupMessage::new(&[("user", "x")]).is_replication());
    }
}
