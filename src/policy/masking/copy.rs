//! `COPY (SELECT ...) TO STDOUT` of masked columns: its rows are masked in flight like a
//! query's, from a description of the inner query (COPY's own output carries no column
//! origins). This module reads what the rows will look like from the COPY's options.

use crate::sql::fold;
use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Query, SetExpr,
    Statement,
};

/// A COPY whose rows a masked session receives masked in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOut {
    /// The COPY statement to send.
    pub sql: String,
    /// Its inner query, which pgveil describes (unseen by the client) to learn each output
    /// column's origin.
    pub inner: String,
    pub format: CopyFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    Text,
    Csv,
    Binary,
}

/// How a COPY writes its rows (PostgreSQL's defaults unless an option says otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyFormat {
    pub kind: CopyKind,
    pub delimiter: u8,
    /// The NULL string, as it appears in the output.
    pub null: Vec<u8>,
    pub quote: u8,
    pub escape: u8,
    /// CSV: the first line names the columns.
    pub header: bool,
    /// ENCODING: the rows come in this encoding instead of the client_encoding.
    pub encoding: Option<String>,
    /// CSV: the columns FORCE_QUOTE names (as the server reads the names), whose non-NULL
    /// values are always quoted.
    pub force_quote: Vec<String>,
}

/// The inner query of a `COPY (SELECT ...) TO STDOUT`, whose outermost SELECT list is
/// masked in flight like a query's. `None` for any other COPY (to a file or program, of a
/// table, of a set operation), whose masked columns are computed masked in SQL.
pub(super) fn in_flight_query(stmt: &Statement) -> Option<&Query> {
    match stmt {
        Statement::Copy {
            source: CopySource::Query(q),
            to: true,
            target: CopyTarget::Stdout,
            ..
        } if matches!(q.body.as_ref(), SetExpr::Select(_)) => Some(q),
        _ => None,
    }
}

/// The format a COPY statement's options give its rows, or why pgveil cannot mask them.
pub(super) fn format_of(stmt: &Statement) -> Result<CopyFormat, String> {
    let Statement::Copy {
        options,
        legacy_options,
        ..
    } = stmt
    else {
        return Err("not a COPY".into());
    };
    let mut kind = CopyKind::Text;
    let mut delimiter = None;
    let mut null = None;
    let mut quote = None;
    let mut escape = None;
    let mut header = false;
    let mut encoding = None;
    let mut force_quote = Vec::new();
    for o in options {
        match o {
            CopyOption::Format(f) => {
                kind = match f.value.to_ascii_lowercase().as_str() {
                    "text" => CopyKind::Text,
                    "csv" => CopyKind::Csv,
                    "binary" => CopyKind::Binary,
                    other => return Err(format!("unknown COPY format {other}")),
                }
            }
            CopyOption::Delimiter(c) => delimiter = Some(*c),
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = Some(*c),
            CopyOption::Escape(c) => escape = Some(*c),
            CopyOption::Encoding(e) => encoding = Some(e.clone()),
            CopyOption::ForceQuote(columns) => force_quote.extend(columns.iter().map(fold)),
            other => return Err(format!("COPY option {other} is not one pgveil masks under")),
        }
    }
    for o in legacy_options {
        match o {
            CopyLegacyOption::Binary => kind = CopyKind::Binary,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            CopyLegacyOption::Csv(csv) => {
                kind = CopyKind::Csv;
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) => quote = Some(*q),
                        CopyLegacyCsvOption::Escape(e) => escape = Some(*e),
                        CopyLegacyCsvOption::ForceQuote(columns) => {
                            force_quote.extend(columns.iter().map(fold))
                        }
                        other => {
                            return Err(format!(
                                "COPY option {other} is not one pgveil masks under"
                            ))
                        }
                    }
                }
            }
            other => return Err(format!("COPY option {other} is not one pgveil masks under")),
        }
    }
    let byte = |c: Option<char>, default: u8, what: &str| match c {
        None => Ok(default),
        // (sqlparser writes `'` back unescaped: the statement sent would not parse.)
        Some('\'') => Err(format!("a COPY {what} of ' (write the option another way)")),
        Some(c) if c.is_ascii() && c != '\0' => Ok(c as u8),
        Some(_) => Err(format!("a COPY {what} that is not one ASCII character")),
    };
    let delimiter = byte(
        delimiter,
        if kind == CopyKind::Csv { b',' } else { b'\t' },
        "delimiter",
    )?;
    let quote = byte(quote, b'"', "quote")?;
    let escape = byte(escape, quote, "escape")?;
    let null = match null {
        Some(n) if !n.is_ascii() => return Err("a COPY NULL string that is not ASCII".into()),
        Some(n) => n.into_bytes(),
        None if kind == CopyKind::Csv => Vec::new(),
        None => b"\\N".to_vec(),
    };
    // In text format the NULL string is written as is, so a value that reads like it
    // would pass for NULL: a masked value must never be one.
    if kind == CopyKind::Text && !unambiguous_null(&null, delimiter) {
        return Err(
            "a COPY NULL string that a value could be written as (text format; it must hold a backslash not followed by b, f, n, r, t, v, a backslash or the delimiter)"
                .into(),
        );
    }
    if let Some(e) = &encoding {
        if !ascii_safe_encoding(e) {
            return Err(format!(
                "COPY ENCODING '{e}' is not one whose rows pgveil can read"
            ));
        }
    }
    Ok(CopyFormat {
        kind,
        delimiter,
        null,
        quote,
        escape,
        header,
        encoding,
        force_quote,
    })
}

/// Whether no value's text form can be written as `null` in COPY's text format (which
/// escapes backslashes, the delimiter and control characters): `null` holds a backslash
/// no value's escaping would produce.
fn unambiguous_null(null: &[u8], delimiter: u8) -> bool {
    let mut i = 0;
    while i < null.len() {
        if null[i] == b'\\' {
            match null.get(i + 1) {
                // A backslash at the end would escape the delimiter after the field.
                None => return false,
                Some(c) if b"bfnrtv\\".contains(c) || *c == delimiter => i += 2,
                Some(_) => return true,
            }
        } else {
            i += 1;
        }
    }
    false
}

/// Whether text in this encoding (a name PostgreSQL accepts) never has an ASCII byte
/// inside a multibyte character: COPY's delimiters, quotes and backslashes can then be
/// found byte by byte. SJIS, BIG5, GBK, UHC, JOHAB and GB18030 are not.
pub fn ascii_safe_encoding(name: &str) -> bool {
    // PostgreSQL's own normalization of encoding names: lower case, letters and digits.
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const UNSAFE: [&str; 18] = [
        "sjis",
        "shiftjis",
        "mskanji",
        "win932",
        "windows932",
        "shiftjis2004",
        "big5",
        "win950",
        "windows950",
        "gbk",
        "cp936",
        "win936",
        "windows936",
        "gb18030",
        "uhc",
        "win949",
        "windows949",
        "johab",
    ];
    !clean.is_empty() && !UNSAFE.contains(&clean.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn format(sql: &str) -> Result<CopyFormat, String> {
        let stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        format_of(&stmt)
    }

    #[test]
    fn options_old_and_new() {
        let f = format("COPY (SELECT 1) TO STDOUT").unwrap();
        assert_eq!(
            (f.kind, f.delimiter, f.null.as_slice()),
            (CopyKind::Text, b'\t', &b"\\N"[..])
        );
        let f = format("COPY (SELECT 1) TO STDOUT (FORMAT csv, HEADER, DELIMITER ';')").unwrap();
        assert_eq!((f.kind, f.delimiter, f.header), (CopyKind::Csv, b';', true));
        assert_eq!(
            (f.quote, f.escape, f.null.as_slice()),
            (b'"', b'"', &b""[..])
        );
        let f = format("COPY (SELECT 1) TO STDOUT WITH CSV HEADER QUOTE '|' ESCAPE '\\'").unwrap();
        assert_eq!(
            (f.kind, f.header, f.quote, f.escape),
            (CopyKind::Csv, true, b'|', b'\\')
        );
        assert!(format("COPY (SELECT 1) TO STDOUT WITH CSV QUOTE ''''").is_err());
        assert_eq!(
            format("COPY (SELECT 1) TO STDOUT BINARY").unwrap().kind,
            CopyKind::Binary
        );
        assert_eq!(
            format("COPY (SELECT 1) TO STDOUT (FORMAT binary)")
                .unwrap()
                .kind,
            CopyKind::Binary
        );
    }

    #[test]
    fn null_strings_a_value_could_take_are_refused_in_text() {
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL '')").is_err());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL 'NULL')").is_err());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL '\\\\')").is_err());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL '\\N')").is_ok());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL 'x\\y')").is_ok());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL 'x\\')").is_err());
        assert!(format("COPY (SELECT 1) TO STDOUT (NULL '\\')").is_err());
        // CSV quotes a value that reads like the NULL string.
        assert!(format("COPY (SELECT 1) TO STDOUT (FORMAT csv, NULL 'NULL')").is_ok());
    }

    #[test]
    fn encodings_with_ascii_inside_characters_are_refused() {
        assert!(format("COPY (SELECT 1) TO STDOUT (ENCODING 'LATIN1')").is_ok());
        assert!(format("COPY (SELECT 1) TO STDOUT (ENCODING 'utf8')").is_ok());
        for e in [
            "SJIS",
            "Shift_JIS",
            "gbk",
            "WIN936",
            "big5",
            "UHC",
            "GB18030",
        ] {
            let sql = format!("COPY (SELECT 1) TO STDOUT (ENCODING '{e}')");
            assert!(format(&sql).is_err(), "{e}");
        }
    }
}
