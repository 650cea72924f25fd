//! Typed, borrowed views of the server messages the session inspects. Everything else the
//! server sends is forwarded without being decoded.

use super::frame::{BodyReader, Frame, ProtocolError};

/// Authentication request codes (`AuthenticationXXX`).
pub mod auth {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// The mechanism name that requires channel binding, which a relay cannot provide.
pub const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// One column of a RowDescription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    pub format: i16,
}

/// Transaction status reported by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InBlock,
    Failed,
}

pub fn authentication_code(frame: &Frame) -> Result<i32, ProtocolError> {
    BodyReader::new(frame.body(), "Authentication").i32()
}

/// The mechanisms listed by AuthenticationSASL.
pub fn sasl_mechanisms(frame: &Frame) -> Result<Vec<&str>, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "AuthenticationSASL");
    r.i32()?;
    let mut out = Vec::new();
    loop {
        let m = r.cstr()?;
        if m.is_empty() {
            break;
        }
        out.push(m);
    }
    Ok(out)
}

pub fn parameter_status(frame: &Frame) -> Result<(&str, &str), ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "ParameterStatus");
    let name = r.cstr()?;
    let value = r.cstr()?;
    Ok((name, value))
}

pub fn backend_key_data(frame: &Frame) -> Result<super::startup::CancelKey, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "BackendKeyData");
    let pid = r.i32()?;
    let secret = r.i32()?;
    r.finish()?;
    Ok(super::startup::CancelKey { pid, secret })
}

pub fn ready_for_query(frame: &Frame) -> Result<TransactionStatus, ProtocolError> {
    match frame.body() {
        [b'I'] => Ok(TransactionStatus::Idle),
        [b'T'] => Ok(TransactionStatus::InBlock),
        [b'E'] => Ok(TransactionStatus::Failed),
        _ => Err(ProtocolError::Malformed {
            what: "ReadyForQuery",
        }),
    }
}

pub fn row_description(frame: &Frame) -> Result<Vec<FieldDescription>, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "RowDescription");
    let n = r.count(19)?;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        fields.push(FieldDescription {
            name: r.cstr()?.to_owned(),
            table_oid: r.i32()? as u32,
            column: r.i16()?,
            type_oid: r.i32()? as u32,
            type_len: r.i16()?,
            type_mod: r.i32()?,
            format: r.i16()?,
        });
    }
    r.finish()?;
    Ok(fields)
}

/// A CopyOutResponse's number of columns, and whether its format is binary (the
/// overall format; the per-column codes all equal it).
pub fn copy_response(frame: &Frame) -> Result<(usize, bool), ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "CopyOutResponse");
    let format = r.u8()?;
    let n = r.count(2)?;
    for _ in 0..n {
        r.i16()?;
    }
    r.finish()?;
    Ok((n, format == 1))
}

/// The columns of a DataRow: `None` for SQL NULL.
pub fn data_row(frame: &Frame) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "DataRow");
    let n = r.count(4)?;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        cols.push(if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        });
    }
    r.finish()?;
    Ok(cols)
}

/// The fields of an ErrorResponse or NoticeResponse, by their one-byte codes.
pub fn error_fields(frame: &Frame) -> Result<Vec<(u8, &str)>, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "ErrorResponse");
    let mut out = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        out.push((code, r.cstr()?));
    }
    Ok(out)
}

/// The primary message (`M`) of an ErrorResponse or NoticeResponse.
pub fn error_message(frame: &Frame) -> Option<String> {
    error_fields(frame)
        .ok()?
        .into_iter()
        .find(|(k, _)| *k == b'M')
        .map(|(_, m)| m.to_string())
}

/// SQLSTATE and severity of an ErrorResponse.
pub fn error_code_and_severity(frame: &Frame) -> (String, String) {
    let fields = error_fields(frame).unwrap_or_default();
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let severity = match get(b'V') {
        s if s.is_empty() => get(b'S'),
        s => s,
    };
    (get(b'C'), severity)
}

pub fn command_tag(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut r = BodyReader::new(frame.body(), "CommandComplete");
    r.cstr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::write;

    #[test]
    fn error_response_round_trip() {
        let f = write::error_response(
            write::Severity::Fatal,
            crate::protocol::SqlState::PROTOCOL_VIOLATION,
            "pgveil: bad",
        );
        let fields = error_fields(&f).unwrap();
        assert!(fields.contains(&(b'C', "08P01")));
        assert!(fields.contains(&(b'S', "FATAL")));
        assert!(fields.contains(&(b'M', "pgveil: bad")));
        assert_eq!(
            error_code_and_severity(&f),
            ("08P01".into(), "FATAL".into())
        );
    }

    #[test]
    fn row_description_rejects_short_body() {
        let f = write::frame(b'T', |b| b.extend_from_slice(&5i16.to_be_bytes()));
        assert!(row_description(&f).is_err());
    }
}
