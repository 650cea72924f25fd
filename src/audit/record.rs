//! One audit record and the hash chain that links records (spec section 6).
//!
//! A record's canonical form is its JSON object without `hash` and `prev_hash`, keys in
//! byte order, no whitespace: exactly what `serde_json` writes for a `Value` map, and what
//! [`Record`] writes because its fields are declared in that order. `hash` is the SHA-256
//! hex of `prev_hash` (64 hex characters) followed by the canonical form. The writer
//! appends both to the canonical form to make the line; `audit verify` takes a line apart
//! again and recomputes.

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A statement (simple query part, Execute, COPY, refused statement).
    Statement,
    /// A session passed authentication.
    Connect,
    /// The server refused the client's credentials.
    AuthFailed,
    /// pgveil turned a connection away before authentication (brute-force guard).
    ConnectionRefused,
    Disconnect,
    /// An `[[alert]]` threshold was crossed.
    Alert,
    /// pgveil started and found the end of the log torn by a crash (see `writer`).
    Recovered,
    /// A command of the admin console (`--admin-listen`).
    Admin,
}

/// The outcome of a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Ran; no masked column was read by a masked session.
    Allowed,
    /// Ran; its results had masked columns.
    Masked,
    /// Refused by pgveil; `rule` names the rule when one is behind it.
    Blocked,
    /// Forwarded; the server reported an error (`sqlstate`), or it did not run because
    /// an earlier statement of the same batch failed.
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Masked => "masked",
            Decision::Blocked => "blocked",
            Decision::Error => "error",
        }
    }
}

/// One audit record. Fields are in byte order of their names (the canonical order);
/// a test keeps it so. Statement fields are `None` on session events.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Record<'a> {
    pub application_name: &'a str,
    pub client_addr: &'a str,
    /// The client_encoding `statement` was converted from (the log is UTF-8), with a word
    /// when some of its bytes could not be converted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converted_from: Option<&'a str>,
    pub database: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    pub event: Option<Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_columns: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    /// `simple`, `extended` or `fast_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    pub session: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<&'a [String]>,
    pub ts: String,
    /// Set when the statement could not be analysed and `unanalysable = "allow"` let it
    /// through (or no policy applied to the session).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unanalysed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmasked_columns: Option<&'a [String]>,
    pub user: &'a str,
}

impl Record<'_> {
    /// The canonical form (see the module comment).
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always serializes")
    }
}

/// RFC 3339 with microseconds, UTC: `2026-11-23T05:57:31.123456Z` (fixed width). Written
/// digit by digit: it runs once per record.
pub fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let mut b = [0u8; 27];
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, at.year().clamp(0, 9999) as u32);
    put(5, 2, u8::from(at.month()) as u32);
    put(8, 2, at.day() as u32);
    put(11, 2, at.hour() as u32);
    put(14, 2, at.minute() as u32);
    put(17, 2, at.second() as u32);
    put(20, 6, at.microsecond());
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        b[i] = c;
    }
    b.iter().map(|&c| c as char).collect()
}

/// `hash` of a record whose canonical form is `canonical`.
pub fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical);
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The line for a record: its canonical form with `hash` and `prev_hash` appended.
pub fn line(canonical: &[u8], prev_hash: &str, hash: &str, out: &mut Vec<u8>) {
    debug_assert!(canonical.ends_with(b"}"));
    out.extend_from_slice(&canonical[..canonical.len() - 1]);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\",\"prev_hash\":\"");
    out.extend_from_slice(prev_hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Record<'static> {
        static COLS: [String; 0] = [];
        Record {
            application_name: "app \"x\"",
            client_addr: "127.0.0.1:5000",
            converted_from: Some("LATIN9"),
            database: "crm",
            decision: Some(Decision::Masked),
            duration_us: Some(12),
            event: Some(Event::Statement),
            kind: Some("select"),
            masked_columns: Some(&COLS),
            message: Some("m"),
            protocol: Some("simple"),
            rows: Some(3),
            rule: Some("rules/crm.toml:4"),
            session: 7,
            sqlstate: Some("42501"),
            statement: Some("SELECT 'é\n'"),
            tables: Some(&COLS),
            ts: timestamp(OffsetDateTime::UNIX_EPOCH),
            unanalysed: true,
            unmasked_columns: Some(&COLS),
            user: "alice",
        }
    }

    #[test]
    fn record_serializes_in_canonical_order() {
        for r in [full(), Record::default()] {
            let bytes = r.canonical();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(serde_json::to_vec(&value).unwrap(), bytes);
        }
    }

    #[test]
    fn timestamps_have_microseconds() {
        assert_eq!(
            timestamp(OffsetDateTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(1_500_000_123);
        assert_eq!(timestamp(t), "1970-01-01T00:00:01.500000Z");
        let t = time::macros::datetime!(2026-11-23 05:57:31.123456789 +01:00);
        assert_eq!(timestamp(t), "2026-11-23T04:57:31.123456Z");
    }

    #[test]
    fn line_hash_covers_prev_hash_and_fields() {
        let c = full().canonical();
        let h = chain_hash(GENESIS, &c);
        assert_ne!(h, chain_hash(&h, &c));
        let mut out = Vec::new();
        line(&c, GENESIS, &h, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["hash"], h.as_str());
        assert_eq!(v["prev_hash"], GENESIS);
    }
}
