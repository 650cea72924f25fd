//! In-flight masking of `COPY ... TO STDOUT` rows: each CopyData's rows are read in the
//! COPY's format (text, CSV or binary), their masked fields replaced by what the same
//! maskers give a DataRow, and the rows written back in that format. Rows may span
//! CopyData messages; what is not a whole row yet waits for the next one.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::policy::masking::{CopyFormat, CopyKind};
use crate::policy::ColumnMask;

/// Why COPY rows could not be masked: the session ends rather than forward them.
#[derive(Debug, thiserror::Error)]
#[error("pgveil could not read the COPY rows to mask them: {0}")]
pub struct CopyError(&'static str);

impl CopyError {
    pub fn unexpected() -> CopyError {
        CopyError("COPY data arrived without a CopyOutResponse")
    }
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The rows of one COPY, as they stream.
#[derive(Debug)]
pub struct CopyRewriter {
    /// Per output column, its mask.
    columns: Vec<Option<Arc<ColumnMask>>>,
    /// Per output column, whether FORCE_QUOTE names it (CSV).
    forced: Vec<bool>,
    /// One past the last masked column: the rest of a row is copied as it is.
    masked_end: usize,
    format: CopyFormat,
    /// The header line (HEADER) or the binary header has not come yet.
    header_left: bool,
    /// The binary trailer came: nothing may follow.
    ended: bool,
    /// The start of a row whose end has not come yet.
    carry: Vec<u8>,
    field: Vec<u8>,
    masked: Vec<u8>,
}

impl CopyRewriter {
    /// The rewriter of a COPY whose output columns are named `names` and masked by
    /// `columns`.
    pub fn new(
        columns: Vec<Option<Arc<ColumnMask>>>,
        names: &[&str],
        format: CopyFormat,
    ) -> CopyRewriter {
        let masked_end = columns
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        let header_left = format.header || format.kind == CopyKind::Binary;
        let forced = names
            .iter()
            .map(|n| format.force_quote.iter().any(|f| f == n))
            .collect();
        CopyRewriter {
            columns,
            forced,
            masked_end,
            format,
            header_left,
            ended: false,
            carry: Vec::new(),
            field: Vec::new(),
            masked: Vec::new(),
        }
    }

    /// Appends to `out` one CopyData with the whole rows of `data` (the body of a
    /// CopyData), their masked fields rewritten; the start of an unfinished row is kept
    /// for the next call.
    pub fn rewrite(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), CopyError> {
        let mut carry = std::mem::take(&mut self.carry);
        let input: &[u8] = if carry.is_empty() {
            data
        } else {
            carry.extend_from_slice(data);
            &carry
        };
        let start = out.len();
        out.put_u8(b'd');
        out.put_i32(0);
        let mut pos = 0;
        while pos < input.len() {
            let mark = out.len();
            match self.row(&input[pos..], out)? {
                Some(n) => pos += n,
                None => {
                    out.truncate(mark);
                    break;
                }
            }
        }
        let rest = input[pos..].to_vec();
        carry.clear();
        self.carry = if rest.is_empty() { carry } else { rest };
        if out.len() == start + 5 {
            out.truncate(start);
        } else {
            let len = (out.len() - start - 1) as i32;
            out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        }
        Ok(())
    }

    /// At CopyDone: every row came whole.
    pub fn finish(&self) -> Result<(), CopyError> {
        if !self.carry.is_empty() {
            return Err(CopyError("the COPY ended inside a row"));
        }
        if self.format.kind == CopyKind::Binary && !self.ended {
            return Err(CopyError("the binary COPY ended without its trailer"));
        }
        Ok(())
    }

    /// Rewrites the row (or header) at the start of `input` into `out`: how many bytes
    /// of `input` it took, or `None` when it is not whole yet.
    fn row(&mut self, input: &[u8], out: &mut BytesMut) -> Result<Option<usize>, CopyError> {
        if self.ended {
            return Err(CopyError("data after the binary trailer"));
        }
        match self.format.kind {
            CopyKind::Binary if self.header_left => {
                let Some(n) = binary_header(input)? else {
                    return Ok(None);
                };
                out.put_slice(&input[..n]);
                self.header_left = false;
                Ok(Some(n))
            }
            CopyKind::Binary => self.binary_row(input, out),
            CopyKind::Text => {
                let Some(end) = memchr::memchr(b'\n', input) else {
                    return Ok(None);
                };
                if self.header_left {
                    // The column names (a text-format HEADER, PostgreSQL 15 and later).
                    self.header_left = false;
                    out.put_slice(&input[..=end]);
                } else {
                    self.text_row(&input[..=end], out)?;
                }
                Ok(Some(end + 1))
            }
            CopyKind::Csv => {
                let Some(end) = self.csv_row_end(input) else {
                    return Ok(None);
                };
                if self.header_left {
                    self.header_left = false;
                    out.put_slice(&input[..=end]);
                } else {
                    self.csv_row(&input[..=end], out)?;
                }
                Ok(Some(end + 1))
            }
        }
    }

    /// Masks one value (`self.field`) of masked column `column` into `self.masked`:
    /// false for NULL.
    fn mask_field(&mut self, column: usize, binary: bool) -> bool {
        self.masked.clear();
        let Some(mask) = self.columns.get(column).and_then(Option::as_ref) else {
            return false;
        };
        match &mask.masker {
            Some(m) => m.apply(mask.class, binary, &self.field, &mut self.masked),
            None => false,
        }
    }

    /// A text-format row, ending in its newline.
    fn text_row(&mut self, row: &[u8], out: &mut BytesMut) -> Result<(), CopyError> {
        let delimiter = self.format.delimiter;
        let body = &row[..row.len() - 1];
        let mut copied = 0;
        let mut start = 0;
        let mut column = 0;
        // One vectorised pass finds every delimiter not escaped by a backslash.
        let mut escaped_until = 0;
        let ends = memchr::memchr2_iter(b'\\', delimiter, body)
            .filter(|&at| {
                if at < escaped_until {
                    return false;
                }
                if body[at] == b'\\' {
                    escaped_until = at + 2;
                    return false;
                }
                true
            })
            .chain(std::iter::once(body.len()));
        for end in ends {
            if column < self.masked_end && self.columns[column].is_some() {
                let raw = &body[start..end];
                if raw != self.format.null.as_slice() {
                    out.put_slice(&body[copied..start]);
                    unescape_text(raw, &mut self.field);
                    if self.mask_field(column, false) {
                        escape_text(&self.masked, delimiter, out);
                    } else {
                        out.put_slice(&self.format.null);
                    }
                    copied = end;
                }
            }
            column += 1;
            start = end + 1;
        }
        if column != self.columns.len() {
            return Err(CopyError("a text row with another number of columns"));
        }
        out.put_slice(&row[copied..]);
        Ok(())
    }

    /// Where the CSV row at the start of `input` ends (its newline outside quotes).
    fn csv_row_end(&self, input: &[u8]) -> Option<usize> {
        let (quote, escape) = (self.format.quote, self.format.escape);
        // Most rows quote nothing: their newline comes before any quote.
        match memchr::memchr2(b'\n', quote, input) {
            None => return None,
            Some(i) if input[i] == b'\n' => return Some(i),
            Some(_) => {}
        }
        let mut quoted = false;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if quoted {
                if b == escape && escape != quote && i + 1 < input.len() {
                    let next = input[i + 1];
                    if next == quote || next == escape {
                        i += 2;
                        continue;
                    }
                }
                if b == quote {
                    // A doubled quote (when the escape is the quote) stays inside.
                    if escape == quote && input.get(i + 1) == Some(&quote) {
                        i += 2;
                        continue;
                    }
                    if escape == quote && i + 1 == input.len() {
                        // The next byte decides: wait for it.
                        return None;
                    }
                    quoted = false;
                }
            } else if b == quote {
                quoted = true;
            } else if b == b'\n' {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// A CSV row, ending in its newline.
    fn csv_row(&mut self, row: &[u8], out: &mut BytesMut) -> Result<(), CopyError> {
        let body = &row[..row.len() - 1];
        let mut copied = 0;
        let mut start = 0;
        let mut column = 0;
        loop {
            let masked = column < self.masked_end && self.columns[column].is_some();
            let (end, quoted) = self.csv_field(body, start, masked)?;
            if column < self.masked_end && self.columns[column].is_some() {
                let raw = &body[start..end];
                if quoted || raw != self.format.null.as_slice() {
                    out.put_slice(&body[copied..start]);
                    if self.mask_field(column, false) {
                        // Quoted as the masked value needs (or FORCE_QUOTE says), never
                        // as the clear one was: the server's quoting tells whether the
                        // clear value held the delimiter or equalled the NULL string.
                        let forced = self.forced.get(column).copied().unwrap_or(false);
                        self.write_csv(forced, out);
                    } else {
                        out.put_slice(&self.format.null);
                    }
                    copied = end;
                }
            }
            column += 1;
            if end == body.len() {
                break;
            }
            start = end + 1;
        }
        if column != self.columns.len() {
            return Err(CopyError("a CSV row with another number of columns"));
        }
        out.put_slice(&row[copied..]);
        Ok(())
    }

    /// The CSV field starting at `start`: where it ends (its delimiter or the row's end),
    /// and whether it was quoted; with `want`, its value is left in `self.field`.
    fn csv_field(
        &mut self,
        body: &[u8],
        start: usize,
        want: bool,
    ) -> Result<(usize, bool), CopyError> {
        let f = &self.format;
        self.field.clear();
        let mut i = start;
        if body.get(i) != Some(&f.quote) {
            let end = memchr::memchr(f.delimiter, &body[start..]).map_or(body.len(), |n| start + n);
            if want {
                self.field.extend_from_slice(&body[start..end]);
            }
            return Ok((end, false));
        }
        i += 1;
        loop {
            let Some(&b) = body.get(i) else {
                return Err(CopyError("a CSV field without its closing quote"));
            };
            if b == f.escape && f.escape != f.quote {
                if let Some(&next) = body
                    .get(i + 1)
                    .filter(|n| **n == f.quote || **n == f.escape)
                {
                    self.field.push(next);
                    i += 2;
                    continue;
                }
            }
            if b == f.quote {
                if f.escape == f.quote && body.get(i + 1) == Some(&f.quote) {
                    self.field.push(b);
                    i += 2;
                    continue;
                }
                i += 1;
                break;
            }
            self.field.push(b);
            i += 1;
        }
        match body.get(i) {
            None => Ok((i, true)),
            Some(&d) if d == f.delimiter => Ok((i, true)),
            Some(_) => Err(CopyError("a CSV field with text after its closing quote")),
        }
    }

    /// Writes `self.masked` as a CSV field, quoted when `forced` or when it must be.
    fn write_csv(&self, forced: bool, out: &mut BytesMut) {
        let f = &self.format;
        let v = &self.masked;
        let must = v.iter().any(|&b| {
            b == f.delimiter || b == f.quote || b == f.escape || b == b'\n' || b == b'\r'
        }) || *v == f.null
            || v.as_slice() == b"\\.";
        if !(forced || must) {
            out.put_slice(v);
            return;
        }
        out.put_u8(f.quote);
        for &b in v {
            if b == f.quote || b == f.escape {
                out.put_u8(f.escape);
            }
            out.put_u8(b);
        }
        out.put_u8(f.quote);
    }

    /// A binary tuple (or the trailer).
    fn binary_row(&mut self, input: &[u8], out: &mut BytesMut) -> Result<Option<usize>, CopyError> {
        let Some(count) = input.get(..2) else {
            return Ok(None);
        };
        let count = i16::from_be_bytes([count[0], count[1]]);
        if count == -1 {
            self.ended = true;
            out.put_slice(&input[..2]);
            return Ok(Some(2));
        }
        if count as usize != self.columns.len() {
            return Err(CopyError("a binary row with another number of columns"));
        }
        // First find the whole tuple, then rewrite it.
        let mut pos = 2;
        for _ in 0..count {
            let Some(len) = input.get(pos..pos + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            pos += 4;
            if len > 0 {
                pos += len as usize;
            } else if len < -1 {
                return Err(CopyError("a binary field of negative length"));
            }
        }
        if pos > input.len() {
            return Ok(None);
        }
        let mut copied = 0;
        let mut at = 2;
        for column in 0..self.columns.len() {
            let len = i32::from_be_bytes([input[at], input[at + 1], input[at + 2], input[at + 3]]);
            let value_at = at + 4;
            let next = value_at + len.max(0) as usize;
            if column < self.masked_end && len >= 0 && self.columns[column].is_some() {
                out.put_slice(&input[copied..at]);
                self.field.clear();
                self.field.extend_from_slice(&input[value_at..next]);
                if self.mask_field(column, true) {
                    out.put_i32(self.masked.len() as i32);
                    out.put_slice(&self.masked);
                } else {
                    out.put_i32(-1);
                }
                copied = next;
            }
            at = next;
        }
        out.put_slice(&input[copied..pos]);
        Ok(Some(pos))
    }
}

/// The length of the binary COPY header at the start of `input`, once it is whole.
fn binary_header(input: &[u8]) -> Result<Option<usize>, CopyError> {
    if input.len() < BINARY_SIGNATURE.len() + 8 {
        return Ok(None);
    }
    if &input[..BINARY_SIGNATURE.len()] != BINARY_SIGNATURE {
        return Err(CopyError("no binary COPY signature"));
    }
    let at = BINARY_SIGNATURE.len();
    let flags = u32::from_be_bytes([input[at], input[at + 1], input[at + 2], input[at + 3]]);
    if flags != 0 {
        return Err(CopyError("binary COPY flags pgveil does not know"));
    }
    let ext = u32::from_be_bytes([input[at + 4], input[at + 5], input[at + 6], input[at + 7]]);
    let n = at + 8 + ext as usize;
    Ok((input.len() >= n).then_some(n))
}

/// A text-format field's value: COPY's backslash escapes undone.
fn unescape_text(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    if !raw.contains(&b'\\') {
        out.extend_from_slice(raw);
        return;
    }
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 == raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        out.push(match c {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            other => other,
        });
        i += 2;
    }
}

/// A value written as COPY's text format writes it.
fn escape_text(value: &[u8], delimiter: u8, out: &mut BytesMut) {
    // Without early exit, so that it vectorises.
    let plain = !value.iter().fold(false, |special, &b| {
        special | (b < 0x20) | (b == b'\\') | (b == delimiter)
    });
    if plain {
        out.put_slice(value);
        return;
    }
    for &b in value {
        let named = match b {
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            0x0b => Some(b'v'),
            _ => None,
        };
        match named {
            Some(c) => {
                out.put_u8(b'\\');
                out.put_u8(c);
            }
            None if b == b'\\' || b == delimiter => {
                out.put_u8(b'\\');
                out.put_u8(b);
            }
            None => out.put_u8(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::{ColumnRef, MaskFunction, Origin};
    use crate::policy::mask::Masker;
    use crate::policy::pgtypes::TypeClass;

    fn redact() -> Arc<ColumnMask> {
        Arc::new(ColumnMask {
            column: ColumnRef {
                schema: "public".into(),
                table: "t".into(),
                column: "c".into(),
            },
            function: "redact",
            definition: MaskFunction::Redact {
                replacement: Some("x\t\"y".into()),
            },
            type_name: "text".into(),
            masker: Some(Masker::Redact(b"x\t\"y".to_vec())),
            class: TypeClass::Text,
            searchable: false,
            origin: Origin {
                file: "t.toml".into(),
                line: 1,
            },
        })
    }

    fn format(kind: CopyKind) -> CopyFormat {
        CopyFormat {
            kind,
            delimiter: if kind == CopyKind::Csv { b',' } else { b'\t' },
            null: if kind == CopyKind::Csv {
                Vec::new()
            } else {
                b"\\N".to_vec()
            },
            quote: b'"',
            escape: b'"',
            header: false,
            encoding: None,
            force_quote: Vec::new(),
        }
    }

    /// The rows of `chunks` (CopyData bodies) through a rewriter masking column 1 of 3.
    fn run(kind: CopyKind, header: bool, chunks: &[&[u8]]) -> Vec<u8> {
        let mut f = format(kind);
        f.header = header;
        let mut r = CopyRewriter::new(vec![None, Some(redact()), None], &["a", "b", "c"], f);
        let mut out = BytesMut::new();
        for c in chunks {
            r.rewrite(c, &mut out).unwrap();
        }
        r.finish().unwrap();
        // The bodies of the CopyData frames written.
        let mut bodies = Vec::new();
        let mut at = 0;
        while at < out.len() {
            assert_eq!(out[at], b'd');
            let len = i32::from_be_bytes(out[at + 1..at + 5].try_into().unwrap()) as usize;
            bodies.extend_from_slice(&out[at + 5..at + 1 + len]);
            at += 1 + len;
        }
        bodies
    }

    #[test]
    fn text_rows_are_masked_and_escaped() {
        let rows = b"1\tse\\tcret\\\\\tend\n2\t\\N\tz\\\\\n";
        assert_eq!(
            run(CopyKind::Text, false, &[rows]),
            b"1\tx\\t\"y\tend\n2\t\\N\tz\\\\\n"
        );
        // Split anywhere, the same.
        for cut in 1..rows.len() {
            let (a, b) = rows.split_at(cut);
            assert_eq!(
                run(CopyKind::Text, false, &[a, b]),
                b"1\tx\\t\"y\tend\n2\t\\N\tz\\\\\n"
            );
        }
    }

    #[test]
    fn csv_rows_keep_their_quoting_and_the_header() {
        let rows: &[u8] = b"id,c,n\n1,\"se,\"\"c\nret\",\"a\"\"b\"\n2,,x\n3,\"\",y\n";
        let want: &[u8] = b"id,c,n\n1,\"x\t\"\"y\",\"a\"\"b\"\n2,,x\n3,\"x\t\"\"y\",y\n";
        assert_eq!(run(CopyKind::Csv, true, &[rows]), want);
        for cut in 1..rows.len() {
            let (a, b) = rows.split_at(cut);
            assert_eq!(run(CopyKind::Csv, true, &[a, b]), want, "cut at {cut}");
        }
    }

    #[test]
    fn binary_rows_are_masked() {
        let mut rows = BINARY_SIGNATURE.to_vec();
        rows.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        let tuple = |rows: &mut Vec<u8>, c: Option<&[u8]>| {
            rows.extend_from_slice(&3i16.to_be_bytes());
            rows.extend_from_slice(&1i32.to_be_bytes());
            rows.push(b'1');
            match c {
                Some(v) => {
                    rows.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    rows.extend_from_slice(v);
                }
                None => rows.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            rows.extend_from_slice(&0i32.to_be_bytes());
        };
        let mut want = rows.clone();
        tuple(&mut rows, Some(b"secret"));
        tuple(&mut rows, None);
        rows.extend_from_slice(&(-1i16).to_be_bytes());
        tuple(&mut want, Some(b"x\t\"y"));
        tuple(&mut want, None);
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(run(CopyKind::Binary, false, &[&rows]), want);
        for cut in 1..rows.len() {
            let (a, b) = rows.split_at(cut);
            assert_eq!(run(CopyKind::Binary, false, &[a, b]), want, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_rows_are_errors_not_forwarded() {
        let mut r = CopyRewriter::new(
            vec![None, Some(redact()), None],
            &["a", "b", "c"],
            format(CopyKind::Text),
        );
        let mut out = BytesMut::new();
        assert!(r.rewrite(b"1\tsecret\n", &mut out).is_err());
        let mut r = CopyRewriter::new(
            vec![None, Some(redact()), None],
            &["a", "b", "c"],
            format(CopyKind::Text),
        );
        r.rewrite(b"1\tsecr", &mut out).unwrap();
        assert!(r.finish().is_err());
    }
}
