//! What the server reads in a statement's bytes under a client_encoding other than UTF-8.
//!
//! The server converts a statement from the client's encoding before it lexes it. The
//! bytes pgveil receives are valid UTF-8 (the protocol reader requires it), but in SJIS,
//! BIG5, GBK, UHC or GB18030 a byte after a non-ASCII one can belong to its character,
//! a quote or a backslash included, so the server's statement can end its literals
//! elsewhere. Analyses read the text decoded as the server decodes it.

use std::borrow::Cow;

use encoding_rs::Encoding;

/// The text the server reads in `sql` under `client_encoding` (its name as the server
/// reports it). `None` when pgveil cannot tell: an encoding it cannot decode, or bytes
/// that are not valid in the encoding (which the server refuses too).
pub fn server_text<'a>(sql: &'a str, client_encoding: &str) -> Option<Cow<'a, str>> {
    if sql.is_ascii() {
        return Some(Cow::Borrowed(sql));
    }
    let label = match client_encoding.to_ascii_uppercase().as_str() {
        "UTF8" | "UNICODE" | "SQL_ASCII" => return Some(Cow::Borrowed(sql)),
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
        _ => return None,
    };
    let encoding = Encoding::for_label(label.as_bytes())?;
    encoding.decode_without_bom_handling_and_without_replacement(sql.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sjis_takes_the_backslash_into_a_character() {
        // C3 81 5C: a half-width katakana, then 81 5C (one character).
        let sql = "SELECT E'\u{c1}\\' OR true --'";
        let read = server_text(sql, "SJIS").unwrap();
        assert!(!read.contains('\\'), "{read}");
        assert!(read.ends_with("' OR true --'"));
        assert_eq!(server_text(sql, "UTF8").unwrap(), sql);
        assert_eq!(server_text("SELECT 1", "JOHAB").unwrap(), "SELECT 1");
        assert!(server_text(sql, "JOHAB").is_none());
        assert!(server_text(sql, "possibly changing").is_none());
    }
}
