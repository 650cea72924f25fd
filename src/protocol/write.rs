//! Builders for the messages pgveil itself sends.

use bytes::{BufMut, BytesMut};

use super::frame::Frame;
use super::sqlstate::SqlState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Frames a message whose body `fill` writes.
pub fn frame(tag: u8, fill: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(tag);
    b.put_i32(0);
    fill(&mut b);
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    Frame::from_raw(b.freeze()).expect("frame built with its own length")
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; PostgreSQL never sends one either.
    b.put_slice(s.replace('\0', " ").as_bytes());
    b.put_u8(0);
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: SqlState, message: &str) -> Frame {
    error_response_with(severity, code, message, None)
}

/// An ErrorResponse with an optional DETAIL or HINT line (`(b'D' | b'H', text)`).
pub fn error_response_with(
    severity: Severity,
    code: SqlState,
    message: &str,
    extra: Option<(u8, &str)>,
) -> Frame {
    frame(b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code.code());
        b.put_u8(b'M');
        put_cstr(b, message);
        if let Some((field, text)) = extra {
            b.put_u8(field);
            put_cstr(b, text);
        }
        b.put_u8(0);
    })
}

/// AuthenticationSASL listing `mechanisms`.
pub fn authentication_sasl(mechanisms: &[&str]) -> Frame {
    frame(b'R', |b| {
        b.put_i32(super::backend::auth::SASL);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    })
}

pub fn backend_key_data(key: super::startup::CancelKey) -> Frame {
    frame(b'K', |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    })
}

/// A simple-protocol Query.
pub fn query(sql: &str) -> Frame {
    frame(b'Q', |b| put_cstr(b, sql))
}

/// CommandComplete with `tag` (`DELETE 3`).
pub fn command_complete(tag: &str) -> Frame {
    frame(b'C', |b| put_cstr(b, tag))
}

pub fn terminate() -> Frame {
    frame(b'X', |_| {})
}

/// Parse of `sql` as statement `name`, with no declared parameter types.
pub fn parse(name: &str, sql: &str) -> Frame {
    parse_typed(name, sql, &[])
}

/// Parse of `sql` as statement `name` with the client's declared parameter types.
pub fn parse_typed(name: &str, sql: &str, param_types: &[u32]) -> Frame {
    frame(b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(param_types.len() as i16);
        for t in param_types {
            b.put_u32(*t);
        }
    })
}

/// Bind of portal `portal` to statement `statement`, no parameters, text results.
pub fn bind(portal: &str, statement: &str) -> Frame {
    frame(b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    })
}

/// Close of a portal (`b'P'`) or statement (`b'S'`).
pub fn close(target: u8, name: &str) -> Frame {
    frame(b'C', |b| {
        b.put_u8(target);
        put_cstr(b, name);
    })
}

/// Describe of a portal (`b'P'`) or statement (`b'S'`).
pub fn describe(target: u8, name: &str) -> Frame {
    frame(b'D', |b| {
        b.put_u8(target);
        put_cstr(b, name);
    })
}

pub fn sync() -> Frame {
    frame(b'S', |_| {})
}

/// Execute of portal `portal`, all rows.
pub fn execute(portal: &str) -> Frame {
    frame(b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    })
}

/// A statement that makes the server itself raise a policy refusal (SQLSTATE 42501), so
/// that a transaction block is aborted on the server exactly as for a server error.
pub fn refusal_sql(message: &str) -> String {
    // A plain string literal inside a dollar-quoted body: quotes are doubled, and the
    // message cannot close the body because `$` is dropped from it.
    let literal = message.replace(['$', '\\'], "").replace('\'', "''");
    format!(
        "DO $pgveil$ BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '{literal}'; END $pgveil$"
    )
}
