//! Typed, borrowed views of the messages a client sends after startup.

use smallvec::SmallVec;

use super::frame::{BodyReader, Frame, ProtocolError};

/// Result-column format codes of a Bind: empty (all text), one (for all), or one per
/// column. Held inline for the common short lists.
pub type FormatCodes = SmallVec<[i16; 4]>;

/// `Describe` and `Close` name either a prepared statement or a portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn from_byte(b: u8, what: &'static str) -> Result<Target, ProtocolError> {
        match b {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            _ => Err(ProtocolError::Malformed { what }),
        }
    }
}

/// A client message after startup, borrowing from its frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        statement: &'a str,
        sql: &'a str,
        param_types: Vec<u32>,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
        /// Result-column format codes as sent: empty (all text), one (for all), or one per column.
        result_formats: FormatCodes,
    },
    Describe {
        target: Target,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
        max_rows: i32,
    },
    Close {
        target: Target,
        name: &'a str,
    },
    Sync,
    Flush,
    FunctionCall,
    CopyData,
    CopyDone,
    CopyFail,
    /// PasswordMessage, SASLInitialResponse or SASLResponse: which one depends on context.
    AuthResponse,
    Terminate,
}

impl<'a> FrontendMessage<'a> {
    /// Decodes a client frame; unknown tags are a protocol violation, as for the server.
    pub fn parse(frame: &'a Frame) -> Result<FrontendMessage<'a>, ProtocolError> {
        let body = frame.body();
        let msg = match frame.tag() {
            b'Q' => {
                let mut r = BodyReader::new(body, "Query");
                let sql = r.cstr()?;
                r.finish()?;
                FrontendMessage::Query { sql }
            }
            b'P' => parse_parse(body)?,
            b'B' => parse_bind(body)?,
            b'D' => {
                let mut r = BodyReader::new(body, "Describe");
                let target = Target::from_byte(r.u8()?, "Describe")?;
                let name = r.cstr()?;
                r.finish()?;
                FrontendMessage::Describe { target, name }
            }
            b'E' => {
                let mut r = BodyReader::new(body, "Execute");
                let portal = r.cstr()?;
                let max_rows = r.i32()?;
                r.finish()?;
                FrontendMessage::Execute { portal, max_rows }
            }
            b'C' => {
                let mut r = BodyReader::new(body, "Close");
                let target = Target::from_byte(r.u8()?, "Close")?;
                let name = r.cstr()?;
                r.finish()?;
                FrontendMessage::Close { target, name }
            }
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'F' => FrontendMessage::FunctionCall,
            b'd' => FrontendMessage::CopyData,
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail,
            b'p' => FrontendMessage::AuthResponse,
            b'X' => FrontendMessage::Terminate,
            tag => {
                return Err(ProtocolError::Unexpected {
                    tag: tag as char,
                    during: "from client",
                })
            }
        };
        Ok(msg)
    }
}

fn parse_parse(body: &[u8]) -> Result<FrontendMessage<'_>, ProtocolError> {
    let mut r = BodyReader::new(body, "Parse");
    let statement = r.cstr()?;
    let sql = r.cstr()?;
    let n = r.count(4)?;
    let mut param_types = Vec::with_capacity(n);
    for _ in 0..n {
        param_types.push(r.i32()? as u32);
    }
    r.finish()?;
    Ok(FrontendMessage::Parse {
        statement,
        sql,
        param_types,
    })
}

fn parse_bind(body: &[u8]) -> Result<FrontendMessage<'_>, ProtocolError> {
    let mut r = BodyReader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let n = r.count(2)?;
    for _ in 0..n {
        r.i16()?;
    }
    let params = r.count(4)?;
    for _ in 0..params {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(len as usize)?;
        } else if len < -1 {
            return Err(ProtocolError::Malformed { what: "Bind" });
        }
    }
    let n = r.count(2)?;
    let mut result_formats = FormatCodes::with_capacity(n);
    for _ in 0..n {
        let f = r.i16()?;
        if f != 0 && f != 1 {
            return Err(ProtocolError::Malformed { what: "Bind" });
        }
        result_formats.push(f);
    }
    r.finish()?;
    Ok(FrontendMessage::Bind {
        portal,
        statement,
        result_formats,
    })
}

/// The GS2 channel-binding flag at the start of a SCRAM client-first-message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBindingFlag {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but believes the server does not.
    ClientOnly,
    /// `p=...`: the client uses channel binding.
    Used,
}

/// For a SASLInitialResponse: the chosen mechanism and the GS2 flag of its payload.
pub fn sasl_initial_response(frame: &Frame) -> Result<(&str, ChannelBindingFlag), ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 { &[][..] } else { r.rest() };
    let flag = match data.first() {
        Some(b'y') => ChannelBindingFlag::ClientOnly,
        Some(b'p') => ChannelBindingFlag::Used,
        _ => ChannelBindingFlag::NotSupported,
    };
    Ok((mechanism, flag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    pub(crate) fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        Frame::from_raw(b.freeze()).unwrap()
    }

    #[test]
    fn decodes_bind_with_formats() {
        let mut body = Vec::new();
        body.extend_from_slice(b"p1\0s1\0");
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        let f = frame(b'B', &body);
        assert_eq!(
            FrontendMessage::parse(&f).unwrap(),
            FrontendMessage::Bind {
                portal: "p1",
                statement: "s1",
                result_formats: [0, 1].into_iter().collect()
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(FrontendMessage::parse(&frame(b'Q', b"no terminator")).is_err());
        assert!(FrontendMessage::parse(&frame(b'Q', b"a\0extra")).is_err());
        assert!(FrontendMessage::parse(&frame(b'E', b"p\0\0")).is_err());
        assert!(FrontendMessage::parse(&frame(b'D', b"Zx\0")).is_err());
        assert!(FrontendMessage::parse(&frame(b'B', b"\0\0\xff\xff")).is_err());
        assert!(FrontendMessage::parse(&frame(b'!', b"")).is_err());
    }

    #[test]
    fn scram_gs2_flag() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        let data = b"y,,n=,r=abc";
        body.extend_from_slice(&(data.len() as i32).to_be_bytes());
        body.extend_from_slice(data);
        let f = frame(b'p', &body);
        let (mech, flag) = sasl_initial_response(&f).unwrap();
        assert_eq!(mech, "SCRAM-SHA-256");
        assert_eq!(flag, ChannelBindingFlag::ClientOnly);
    }
}
