//! What the server reads in a statement's bytes under its client_encoding.
//!
//! The server converts a statement from the client's encoding before it lexes it: in
//! LATIN9 or WIN1251 a byte above 0x7F is a character of its own (not valid UTF-8), and in
//! SJIS, BIG5, GBK, UHC or GB18030 a byte after a non-ASCII one can belong to its
//! character, a quote or a backslash included, so the statement's literals can end
//! elsewhere than a UTF-8 reading says. The relay forwards the client's bytes as they are;
//! the analyses and the audit read the text converted as the server converts it.

use encoding_rs::Encoding;

use crate::protocol::{write, Frame};

/// How pgveil reads text under one client_encoding.
enum Codec {
    /// UTF8: the bytes are the text.
    Utf8,
    /// SQL_ASCII: bytes above 0x7F are taken as they are, whatever they mean.
    Bytes,
    Other(&'static Encoding),
    /// An encoding pgveil cannot decode (MULE_INTERNAL, JOHAB, EUC_TW, ...).
    Unsupported,
}

fn codec(client_encoding: &str) -> Codec {
    let label = match client_encoding.to_ascii_uppercase().as_str() {
        "UTF8" | "UNICODE" => return Codec::Utf8,
        "SQL_ASCII" => return Codec::Bytes,
        "SJIS" => "shift_jis",
        "BIG5" => "big5",
        "GBK" | "EUC_CN" => "gbk",
        "GB18030" => "gb18030",
        "UHC" | "EUC_KR" => "euc-kr",
        "EUC_JP" => "euc-jp",
        "KOI8R" => "koi8-r",
        "KOI8U" => "koi8-u",
        "WIN866" => "ibm866",
        "WIN874" => "windows-874",
        "WIN1250" => "windows-1250",
        "WIN1251" => "windows-1251",
        "WIN1252" | "LATIN1" => "windows-1252",
        "WIN1253" => "windows-1253",
        "WIN1254" | "LATIN5" => "windows-1254",
        "WIN1255" => "windows-1255",
        "WIN1256" => "windows-1256",
        "WIN1257" => "windows-1257",
        "WIN1258" => "windows-1258",
        "LATIN2" => "iso-8859-2",
        "LATIN3" => "iso-8859-3",
        "LATIN4" => "iso-8859-4",
        "ISO_8859_5" => "iso-8859-5",
        "ISO_8859_6" => "iso-8859-6",
        "ISO_8859_7" => "iso-8859-7",
        "ISO_8859_8" => "iso-8859-8",
        "LATIN6" => "iso-8859-10",
        "LATIN7" => "iso-8859-13",
        "LATIN8" => "iso-8859-14",
        "LATIN9" => "iso-8859-15",
        "LATIN10" => "iso-8859-16",
        _ => return Codec::Unsupported,
    };
    Encoding::for_label(label.as_bytes()).map_or(Codec::Unsupported, Codec::Other)
}

/// Text that had to be converted to be read as UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub text: String,
    /// The client_encoding it was converted from.
    pub from: String,
    /// False when some bytes could not be converted (invalid in the encoding, or an
    /// encoding pgveil cannot decode) and stand as U+FFFD in `text`.
    pub lossless: bool,
}

/// `bytes` as the server reads them under `client_encoding`; `None` when the bytes are
/// that text already (ASCII, or valid UTF-8 under UTF8 or SQL_ASCII).
pub fn client_text(bytes: &[u8], client_encoding: &str) -> Option<Converted> {
    if bytes.is_ascii() {
        return None;
    }
    let lossy = |from: &str| Converted {
        text: String::from_utf8_lossy(bytes).into_owned(),
        from: from.to_string(),
        lossless: false,
    };
    match codec(client_encoding) {
        Codec::Utf8 | Codec::Bytes if std::str::from_utf8(bytes).is_ok() => None,
        Codec::Utf8 | Codec::Bytes | Codec::Unsupported => Some(lossy(client_encoding)),
        Codec::Other(encoding) => {
            let (text, had_errors) = encoding.decode_without_bom_handling(bytes);
            Some(Converted {
                text: text.into_owned(),
                from: client_encoding.to_string(),
                lossless: !had_errors,
            })
        }
    }
}

/// A StartupMessage parameter (`application_name`) as UTF-8 text: converted from the
/// startup's own client_encoding when it is not UTF-8, and saying so when some bytes
/// could not be converted.
pub fn startup_param(message: &crate::protocol::startup::StartupMessage, name: &str) -> String {
    let Some(bytes) = message.param_bytes(name) else {
        return String::new();
    };
    let encoding = message.param("client_encoding").unwrap_or("UTF8");
    match client_text(bytes, encoding) {
        None => String::from_utf8_lossy(bytes).into_owned(),
        Some(c) if c.lossless => c.text,
        Some(c) => format!("{} (bytes not valid in {} stand as U+FFFD)", c.text, c.from),
    }
}

/// A Query or Parse whose text had to be converted: the frame as pgveil reads it (UTF-8)
/// and what the conversion was. The client's own frame is what the server gets.
#[derive(Debug)]
pub struct Transcoded {
    pub frame: Frame,
    /// The statement's conversion (`None` if only a Parse's statement name needed one).
    pub sql: Option<Converted>,
}

/// The client message `frame` read under `client_encoding`, when its text (a Query's or
/// Parse's statement, the statement and portal names of Parse, Bind, Describe, Close and
/// Execute) is not already UTF-8 that means what the server reads (`None`: read it as it
/// is).
pub fn transcode(frame: &Frame, client_encoding: &str) -> Option<Transcoded> {
    let body = frame.body();
    let cstr = |from: usize| -> Option<(&[u8], usize)> {
        let end = from + body.get(from..)?.iter().position(|&b| b == 0)?;
        Some((&body[from..end], end + 1))
    };
    // The names a message starts with (after `skip` bytes), each read as a name.
    let names = |skip: usize, count: usize| -> Option<Transcoded> {
        let mut at = skip;
        let mut read = Vec::with_capacity(count);
        for _ in 0..count {
            let (name, next) = cstr(at)?;
            read.push(name);
            at = next;
        }
        if read.iter().all(|n| n.is_ascii()) {
            return None;
        }
        let tail = &body[at..];
        Some(Transcoded {
            frame: write::frame(frame.tag(), |b| {
                b.extend_from_slice(&body[..skip]);
                for name in &read {
                    b.extend_from_slice(name_text(name, client_encoding).as_bytes());
                    b.extend_from_slice(&[0]);
                }
                b.extend_from_slice(tail);
            }),
            sql: None,
        })
    };
    match frame.tag() {
        b'Q' => {
            let (sql, _) = cstr(0)?;
            let converted = client_text(sql, client_encoding)?;
            Some(Transcoded {
                frame: write::query(&converted.text),
                sql: Some(converted),
            })
        }
        b'P' => {
            let (name, at) = cstr(0)?;
            let (sql, rest) = cstr(at)?;
            if name.is_ascii() && client_text(sql, client_encoding).is_none() {
                return None;
            }
            let name = name_text(name, client_encoding);
            let converted = client_text(sql, client_encoding);
            let sql = converted
                .as_ref()
                .map_or_else(|| String::from_utf8_lossy(sql), |c| c.text.as_str().into());
            let tail = &body[rest..];
            Some(Transcoded {
                frame: write::frame(b'P', |b| {
                    b.extend_from_slice(name.as_bytes());
                    b.extend_from_slice(&[0]);
                    b.extend_from_slice(sql.as_bytes());
                    b.extend_from_slice(&[0]);
                    b.extend_from_slice(tail);
                }),
                sql: converted,
            })
        }
        b'B' => names(0, 2),
        b'E' => names(0, 1),
        b'D' | b'C' => names(1, 1),
        _ => None,
    }
}

/// A statement or portal name as pgveil keys it: its text under `client_encoding`, or,
/// when some of its bytes cannot be converted (the server refuses such a name in the
/// encodings pgveil decodes), its bytes in hex between two U+FFFD, so that two different
/// names never read as one.
fn name_text(name: &[u8], client_encoding: &str) -> String {
    match client_text(name, client_encoding) {
        None => String::from_utf8_lossy(name).into_owned(),
        Some(c) if c.lossless => c.text,
        Some(_) => {
            let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
            format!("\u{fffd}{hex}\u{fffd}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sjis_takes_the_backslash_into_a_character() {
        // C3 81 5C: a half-width katakana, then 81 5C (one character).
        let sql = "SELECT E'\u{c1}\\' OR true --'";
        let read = client_text(sql.as_bytes(), "SJIS").unwrap();
        assert!(read.lossless);
        assert!(!read.text.contains('\\'), "{}", read.text);
        assert!(read.text.ends_with("' OR true --'"));
        assert_eq!(client_text(sql.as_bytes(), "UTF8"), None);
        assert_eq!(client_text(b"SELECT 1", "JOHAB"), None);
        assert!(!client_text(sql.as_bytes(), "JOHAB").unwrap().lossless);
    }

    #[test]
    fn single_byte_encodings_and_bytes_that_are_not_text() {
        // LATIN9: 0xE9 is \u{e9}, 0xA4 the euro sign.
        let read = client_text(b"SELECT 'caf\xe9 \xa4'", "LATIN9").unwrap();
        assert_eq!(read.text, "SELECT 'caf\u{e9} \u{20ac}'");
        assert!(read.lossless);
        // WIN1251: Cyrillic.
        let read = client_text(b"SELECT '\xcf\xf0\xe8'", "WIN1251").unwrap();
        assert_eq!(read.text, "SELECT '\u{41f}\u{440}\u{438}'");
        // Not UTF-8 under UTF8 (the server refuses it): read with U+FFFD, said so.
        let read = client_text(b"SELECT '\xe9'", "UTF8").unwrap();
        assert!(!read.lossless);
        assert!(read.text.contains('\u{fffd}'));
        // A Parse keeps its parameter types; the text is converted.
        let parse = write::frame(b'P', |b| {
            b.extend_from_slice(b"s1\0SELECT '\xe9'\0\0\x01\0\0\0\x19");
        });
        let t = transcode(&parse, "LATIN1").unwrap();
        let msg = crate::protocol::frontend::FrontendMessage::parse(&t.frame).unwrap();
        assert_eq!(
            msg,
            crate::protocol::frontend::FrontendMessage::Parse {
                statement: "s1",
                sql: "SELECT '\u{e9}'",
                param_types: vec![25],
            }
        );
    }

    #[test]
    fn names_in_every_message_are_read_alike_and_never_merge() {
        use crate::protocol::frontend::FrontendMessage;
        let parse = write::frame(b'P', |b| b.extend_from_slice(b"caf\xe9\0SELECT 1\0\0\0"));
        let bind = write::frame(b'B', |b| {
            b.extend_from_slice(b"p\xe9\0caf\xe9\0\0\0\0\0\0\0");
        });
        let describe = write::frame(b'D', |b| b.extend_from_slice(b"Scaf\xe9\0"));
        let close = write::frame(b'C', |b| b.extend_from_slice(b"Pp\xe9\0"));
        let execute = write::frame(b'E', |b| b.extend_from_slice(b"p\xe9\0\0\0\0\0"));
        let read = |f: &Frame| {
            let t = transcode(f, "LATIN9").unwrap();
            format!("{:?}", FrontendMessage::parse(&t.frame).unwrap())
        };
        assert!(read(&parse).contains("caf\u{e9}"), "{}", read(&parse));
        assert!(read(&bind).contains("\"p\u{e9}\""), "{}", read(&bind));
        assert!(read(&bind).contains("\"caf\u{e9}\""), "{}", read(&bind));
        assert!(read(&describe).contains("caf\u{e9}"), "{}", read(&describe));
        assert!(read(&close).contains("p\u{e9}"), "{}", read(&close));
        assert!(read(&execute).contains("p\u{e9}"), "{}", read(&execute));
        // ASCII names need nothing.
        let plain = write::frame(b'E', |b| b.extend_from_slice(b"p\0\0\0\0\0"));
        assert!(transcode(&plain, "LATIN9").is_none());
        // Bytes that are not text in the encoding: two names stay two.
        assert_ne!(name_text(b"\xff", "UTF8"), name_text(b"\xfe", "UTF8"));
        assert_ne!(name_text(b"\xff", "UTF8"), "\u{fffd}");
    }
}
