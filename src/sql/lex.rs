//! PostgreSQL 15's lexer, as the server applies it to a query string: where each token
//! starts and ends, what a quoted identifier or a string literal stands for once its
//! escapes are decoded, and where one statement ends and the next begins.
//!
//! Every analysis reads the server's tokens through this module, never another lexer's:
//! sqlparser is given [`Lexed::canonical`] (the same tokens written in forms both read
//! alike), statements are split with [`Lexed::statements`] and cache keys come from
//! [`Lexed::shape`]. A form the server would reject, or whose reading depends on settings
//! pgveil does not know, is a [`LexError`], and the caller treats the statement as
//! unanalysable.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

/// The longest identifier the server keeps (NAMEDATALEN - 1); longer ones are truncated.
const MAX_IDENTIFIER: usize = 63;

/// How deep the expressions of one statement may nest (counting each operator of a chain,
/// since `1+1+...` builds a tree as deep as the chain is long) before the statement is
/// refused analysis: every recursive walk over the tree stays well inside a thread's stack.
pub const DEPTH_LIMIT: usize = 1000;

/// What the lexer needs of the session: how `'...'` treats a backslash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strings {
    /// `standard_conforming_strings = on`: a backslash is an ordinary character.
    Standard,
    /// `standard_conforming_strings = off`: `'...'` reads escapes as `E'...'` does.
    Escaped,
    /// The setting may be either (a change is in flight): a statement whose tokens differ
    /// between the two readings is an error.
    Unknown,
}

/// Why a query string cannot be read as the server would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LexError(pub Cow<'static, str>);

impl std::fmt::Display for LexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn error<T>(why: &'static str) -> Result<T, LexError> {
    Err(LexError(Cow::Borrowed(why)))
}

/// The kinds of tokens the server's lexer produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An unquoted identifier or keyword; its value is as written, truncated (see
    /// [`Token::folded`] for the name the server folds it to).
    Word,
    /// `"..."` or `U&"..."`: the value is decoded, not folded.
    QuotedIdent,
    /// `'...'`, `E'...'`, `U&'...'` (with any continuation): the value is decoded.
    Str,
    /// `N'...'`: a string literal of type `char`.
    NationalStr,
    /// `B'...'` or `X'...'`: a bit string, the value as written between the quotes.
    BitStr(u8),
    /// `$tag$...$tag$`: the value is the body.
    DollarStr,
    Number,
    /// `$1`
    Param,
    /// An operator or a punctuation character (`(`, `,`, `::`, `;`, ...).
    Op,
}

/// One token: where it is in the text and what it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind,
    pub span: Range<usize>,
    pub value: Cow<'a, str>,
}

impl Token<'_> {
    /// An unquoted word equal to `keyword` (given in lower case).
    pub fn is_word(&self, keyword: &str) -> bool {
        self.kind == Kind::Word && self.value.eq_ignore_ascii_case(keyword)
    }

    /// The value as the server takes it: an unquoted word with its ASCII letters in lower
    /// case, anything else as it is.
    pub fn folded(&self) -> Cow<'_, str> {
        if self.kind == Kind::Word && self.value.bytes().any(|c| c.is_ascii_uppercase()) {
            Cow::Owned(self.value.to_ascii_lowercase())
        } else {
            Cow::Borrowed(&self.value)
        }
    }

    pub fn is_op(&self, op: &str) -> bool {
        self.kind == Kind::Op && self.value == op
    }

    fn is_literal(&self) -> bool {
        matches!(
            self.kind,
            Kind::Str | Kind::NationalStr | Kind::BitStr(_) | Kind::Number
        )
    }
}

/// A query string as the server's lexer reads it.
#[derive(Clone, Debug)]
pub struct Lexed<'a> {
    pub sql: &'a str,
    pub tokens: Vec<Token<'a>>,
    /// The shape of the tokens without trailing semicolons, computed once for the guard
    /// and the audit (see [`Lexed::statement_shape`]).
    shape: std::cell::OnceCell<String>,
}

/// Reads `sql` as PostgreSQL 15 does under `strings`.
pub fn lex(sql: &str, strings: Strings) -> Result<Lexed<'_>, LexError> {
    match strings {
        Strings::Standard => Lexer::new(sql, false).run(),
        Strings::Escaped => Lexer::new(sql, true).run(),
        Strings::Unknown => {
            let on = Lexer::new(sql, false).run()?;
            // Only a backslash inside a plain string literal reads differently.
            if !sql.contains('\\') {
                return Ok(on);
            }
            let off = Lexer::new(sql, true).run()?;
            if on.tokens != off.tokens {
                return error(
                    "a string literal holds a backslash while standard_conforming_strings may be changing, so pgveil cannot know how the server reads it",
                );
            }
            Ok(on)
        }
    }
}

impl<'a> Lexed<'a> {
    /// The statements of the query string as byte ranges of its text, split at top-level
    /// semicolons (not inside a `BEGIN ATOMIC ... END` body), each trimmed of
    /// whitespace, those without a token dropped. A statement keeps its comments.
    pub fn statements(&self) -> Vec<Range<usize>> {
        let mut parts = Vec::new();
        let mut from = 0;
        // Whether the statement since `from` has a token.
        let mut any = false;
        // Inside `BEGIN ATOMIC`: how many CASE ... END are open, plus one.
        let mut atomic = 0usize;
        for (i, t) in self.tokens.iter().enumerate() {
            if t.is_word("atomic") && i > 0 && self.tokens[i - 1].is_word("begin") {
                atomic = 1;
            } else if atomic > 0 && t.is_word("case") {
                atomic += 1;
            } else if atomic > 0 && t.is_word("end") {
                atomic -= 1;
            } else if atomic == 0 && t.is_op(";") {
                if any {
                    parts.push(from..t.span.start);
                }
                from = t.span.end;
                any = false;
                continue;
            }
            any = true;
        }
        if any {
            parts.push(from..self.sql.len());
        }
        parts
            .into_iter()
            .filter_map(|r| {
                let text = &self.sql[r.clone()];
                let start = r.start + (text.len() - text.trim_start().len());
                let end = r.start + text.trim_end().len();
                (start < end).then_some(start..end)
            })
            .collect()
    }

    /// The tokens within a byte range of the text (one of [`Lexed::statements`]).
    pub fn within(&self, range: &Range<usize>) -> &[Token<'a>] {
        let start = self.tokens.partition_point(|t| t.span.start < range.start);
        let end = self.tokens.partition_point(|t| t.span.start < range.end);
        &self.tokens[start..end]
    }

    /// The token stream written so that sqlparser reads the same tokens the server does:
    /// comments dropped, identifiers folded and truncated, escapes decoded, adjacent
    /// literals joined, one space between tokens.
    pub fn canonical(tokens: &[Token<'_>]) -> String {
        let mut out = String::with_capacity(tokens.iter().map(|t| t.span.len() + 1).sum());
        for t in tokens {
            if !out.is_empty() {
                out.push(' ');
            }
            write_canonical(t, &mut out);
        }
        out
    }

    /// The shape of a token stream: its canonical text with number and string literals
    /// replaced by `?`. Two statements with the same shape are the same statement to the
    /// server but for the values of those literals.
    pub fn shape(tokens: &[Token<'_>], out: &mut String) {
        out.clear();
        for t in tokens {
            if !out.is_empty() {
                out.push(' ');
            }
            if t.is_literal() {
                out.push('?');
            } else {
                write_canonical(t, out);
            }
        }
    }

    /// The tokens of the whole text but its trailing semicolons: for a text that holds
    /// one statement, the statement's tokens.
    pub fn statement_tokens(&self) -> &[Token<'a>] {
        let end = self
            .tokens
            .iter()
            .rposition(|t| !t.is_op(";"))
            .map_or(0, |i| i + 1);
        &self.tokens[..end]
    }

    /// The shape of [`Lexed::statement_tokens`], computed once however many analyses ask.
    pub fn statement_shape(&self) -> &str {
        self.shape.get_or_init(|| {
            let mut out = String::new();
            Lexed::shape(self.statement_tokens(), &mut out);
            out
        })
    }

    /// The shape of `tokens`, a slice of this text's tokens: the shared
    /// [`Lexed::statement_shape`] when they are the statement's tokens, else written into
    /// `scratch`.
    pub fn shape_of<'s>(&'s self, tokens: &[Token<'_>], scratch: &'s mut String) -> &'s str {
        let whole = self.statement_tokens();
        if std::ptr::eq(tokens.as_ptr(), whole.as_ptr()) && tokens.len() == whole.len() {
            self.statement_shape()
        } else {
            Lexed::shape(tokens, scratch);
            scratch
        }
    }

    /// The text of `tokens` (taken from `sql`) with every literal's value replaced by
    /// `?`, comments dropped and each run of whitespace made one space, keeping the
    /// client's spelling of everything else (for audit records).
    pub fn redacted(sql: &str, tokens: &[Token<'_>]) -> String {
        let mut out = String::with_capacity(tokens.iter().map(|t| t.span.len() + 1).sum());
        let mut at = tokens.first().map_or(0, |t| t.span.start);
        for t in tokens {
            if t.span.start > at {
                out.push(' ');
            }
            if t.is_literal() || t.kind == Kind::DollarStr {
                out.push('?');
            } else {
                out.push_str(&sql[t.span.clone()]);
            }
            at = t.span.end;
        }
        out
    }

    /// An upper bound on how deep the expression trees of these tokens nest; past
    /// [`DEPTH_LIMIT`] a statement is not analysed.
    pub fn depth(tokens: &[Token<'_>]) -> usize {
        // Per open parenthesis, bracket or CASE: the operators of the current chain.
        let mut chains: Vec<usize> = vec![0];
        let mut sum = 0usize;
        let mut deepest = 0usize;
        let mut word = [0u8; 16];
        for t in tokens {
            // Keywords are short: fold them without allocating.
            let value = match t.kind {
                Kind::Word if t.value.len() <= word.len() => {
                    let w = &mut word[..t.value.len()];
                    w.copy_from_slice(t.value.as_bytes());
                    w.make_ascii_lowercase();
                    std::str::from_utf8(w).unwrap_or("")
                }
                Kind::Word => "",
                _ => t.value.as_ref(),
            };
            match (t.kind, value) {
                (Kind::Op, "(" | "[") | (Kind::Word, "case") => chains.push(0),
                (Kind::Op, ")" | "]") | (Kind::Word, "end") if chains.len() > 1 => {
                    sum -= chains.pop().unwrap_or(0);
                }
                (Kind::Op, ")" | "]") | (Kind::Word, "end") => {}
                (Kind::Op, "," | ";") | (Kind::Word, "when" | "then" | "else") => {
                    let top = chains.last_mut().expect("never empty");
                    sum -= *top;
                    *top = 0;
                }
                (Kind::Op, "." | ":") => {}
                (Kind::Op, _)
                | (
                    Kind::Word,
                    "and" | "or" | "not" | "is" | "isnull" | "notnull" | "like" | "ilike"
                    | "similar" | "in" | "between" | "collate" | "at" | "overlaps" | "escape"
                    | "any" | "all" | "some" | "array" | "row" | "distinct",
                ) => {
                    *chains.last_mut().expect("never empty") += 1;
                    sum += 1;
                }
                _ => {}
            }
            deepest = deepest.max(sum + chains.len());
        }
        deepest
    }
}

fn write_canonical(t: &Token<'_>, out: &mut String) {
    match t.kind {
        Kind::Word if t.value.is_ascii() => {
            let start = out.len();
            out.push_str(&t.value);
            out[start..].make_ascii_lowercase();
        }
        Kind::Word => {
            out.push('"');
            out.push_str(&t.folded().replace('"', "\"\""));
            out.push('"');
        }
        Kind::QuotedIdent => {
            out.push('"');
            out.push_str(&t.value.replace('"', "\"\""));
            out.push('"');
        }
        Kind::Str | Kind::NationalStr => {
            if t.kind == Kind::NationalStr {
                out.push('N');
            }
            out.push('\'');
            out.push_str(&t.value.replace('\'', "''"));
            out.push('\'');
        }
        Kind::BitStr(prefix) => {
            let _ = write!(out, "{}'{}'", prefix as char, t.value);
        }
        Kind::DollarStr | Kind::Number | Kind::Param | Kind::Op => {
            // Written as the client wrote it: these forms have no escapes.
            out.push_str(&t.value)
        }
    }
}

const OP_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";
const SELF_CHARS: &[u8] = b",()[].;:+-*/%^<>=";

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Cuts an identifier to the server's length limit on a character boundary.
fn truncate(mut s: String) -> String {
    if s.len() > MAX_IDENTIFIER {
        let mut end = MAX_IDENTIFIER;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

struct Lexer<'a> {
    sql: &'a str,
    b: &'a [u8],
    i: usize,
    /// standard_conforming_strings is off.
    escapes: bool,
    tokens: Vec<Token<'a>>,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str, escapes: bool) -> Self {
        Lexer {
            sql,
            b: sql.as_bytes(),
            i: 0,
            escapes,
            tokens: Vec::with_capacity(sql.len() / 4 + 1),
        }
    }

    fn peek(&self, k: usize) -> Option<u8> {
        self.b.get(self.i + k).copied()
    }

    fn push(&mut self, kind: Kind, start: usize, value: Cow<'a, str>) {
        self.tokens.push(Token {
            kind,
            span: start..self.i,
            value,
        });
    }

    fn run(mut self) -> Result<Lexed<'a>, LexError> {
        while self.i < self.b.len() {
            let c = self.b[self.i];
            let start = self.i;
            match c {
                _ if is_space(c) => self.i += 1,
                b'-' if self.peek(1) == Some(b'-') => self.line_comment(),
                b'/' if self.peek(1) == Some(b'*') => self.block_comment()?,
                b'\'' => {
                    let v = if self.escapes {
                        self.escaped_string()?
                    } else {
                        self.plain_string()?
                    };
                    self.push(Kind::Str, start, Cow::Owned(v));
                }
                b'"' => {
                    let v = self.quoted_ident()?;
                    self.push(Kind::QuotedIdent, start, Cow::Owned(v));
                }
                b'e' | b'E' if self.peek(1) == Some(b'\'') => {
                    self.i += 1;
                    let v = self.escaped_string()?;
                    self.push(Kind::Str, start, Cow::Owned(v));
                }
                b'n' | b'N' if self.peek(1) == Some(b'\'') => {
                    self.i += 1;
                    let v = if self.escapes {
                        self.escaped_string()?
                    } else {
                        self.plain_string()?
                    };
                    self.push(Kind::NationalStr, start, Cow::Owned(v));
                }
                b'b' | b'B' | b'x' | b'X' if self.peek(1) == Some(b'\'') => {
                    self.i += 1;
                    let v = self.bit_string()?;
                    self.push(Kind::BitStr(c.to_ascii_uppercase()), start, Cow::Owned(v));
                }
                b'u' | b'U' if self.peek(1) == Some(b'&') && self.peek(2) == Some(b'\'') => {
                    if self.escapes {
                        return error(
                            "a U&'...' literal while standard_conforming_strings is off, which the server refuses",
                        );
                    }
                    self.i += 2;
                    let raw = self.plain_string()?;
                    let v = self.unicode_escapes(&raw)?;
                    self.push(Kind::Str, start, Cow::Owned(v));
                }
                b'u' | b'U' if self.peek(1) == Some(b'&') && self.peek(2) == Some(b'"') => {
                    self.i += 2;
                    let raw = self.quoted_ident_raw()?;
                    let v = truncate(self.unicode_escapes(&raw)?);
                    if v.is_empty() {
                        return error("a zero-length quoted identifier");
                    }
                    self.push(Kind::QuotedIdent, start, Cow::Owned(v));
                }
                b'$' => self.dollar()?,
                b'0'..=b'9' => self.number()?,
                b'.' if self.peek(1).is_some_and(|d| d.is_ascii_digit()) => self.number()?,
                _ if ident_start(c) => {
                    while self.peek(0).is_some_and(ident_cont) {
                        self.i += 1;
                    }
                    // Folding keeps byte lengths, so truncating first is the same.
                    let mut end = self.i.min(start + MAX_IDENTIFIER);
                    while !self.sql.is_char_boundary(end) {
                        end -= 1;
                    }
                    self.push(Kind::Word, start, Cow::Borrowed(&self.sql[start..end]));
                }
                b':' if self.peek(1) == Some(b':') || self.peek(1) == Some(b'=') => {
                    self.i += 2;
                    self.push(Kind::Op, start, Cow::Borrowed(&self.sql[start..self.i]));
                }
                b'.' if self.peek(1) == Some(b'.') => {
                    self.i += 2;
                    self.push(Kind::Op, start, Cow::Borrowed(".."));
                }
                _ if OP_CHARS.contains(&c) => self.operator(),
                _ if SELF_CHARS.contains(&c) => {
                    self.i += 1;
                    self.push(Kind::Op, start, Cow::Borrowed(&self.sql[start..self.i]));
                }
                _ => {
                    return error("a character the server's lexer does not accept here");
                }
            }
        }
        Ok(Lexed {
            sql: self.sql,
            tokens: self.tokens,
            shape: std::cell::OnceCell::new(),
        })
    }

    fn line_comment(&mut self) {
        while self.peek(0).is_some_and(|c| c != b'\n' && c != b'\r') {
            self.i += 1;
        }
    }

    fn block_comment(&mut self) -> Result<(), LexError> {
        let mut depth = 0usize;
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b'/'), Some(b'*')) => {
                    depth += 1;
                    self.i += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    self.i += 2;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (Some(_), _) => self.i += 1,
                (None, _) => return error("an unterminated /* comment"),
            }
        }
    }

    /// After a literal's closing quote: whether whitespace holding a newline (and `--`
    /// comments) separates it from another quote, which continues the same literal.
    /// Consumes the separator and the quote when it does.
    fn continues(&mut self) -> bool {
        let mut j = self.i;
        let mut newline = false;
        loop {
            match self.b.get(j) {
                Some(b' ' | b'\t' | b'\x0c') => j += 1,
                Some(b'\n' | b'\r') => {
                    newline = true;
                    j += 1;
                }
                Some(b'-') if self.b.get(j + 1) == Some(&b'-') => {
                    while self.b.get(j).is_some_and(|&c| c != b'\n' && c != b'\r') {
                        j += 1;
                    }
                }
                Some(b'\'') if newline => {
                    self.i = j + 1;
                    return true;
                }
                _ => return false,
            }
        }
    }

    /// `E'...'` (or `'...'` with standard_conforming_strings off), the opening quote at
    /// `self.i`.
    fn escaped_string(&mut self) -> Result<String, LexError> {
        self.i += 1;
        let mut v: Vec<u8> = Vec::new();
        // A high surrogate from `\uD8xx` waiting for its low half.
        let mut high: Option<u32> = None;
        loop {
            let Some(c) = self.peek(0) else {
                return error("an unterminated quoted string");
            };
            if high.is_some() && c != b'\\' {
                return error("an invalid Unicode surrogate pair in a string literal");
            }
            match c {
                b'\'' if self.peek(1) == Some(b'\'') => {
                    v.push(b'\'');
                    self.i += 2;
                }
                b'\'' => {
                    self.i += 1;
                    if !self.continues() {
                        break;
                    }
                }
                b'\\' => {
                    let Some(e) = self.peek(1) else {
                        return error("an unterminated quoted string");
                    };
                    self.i += 2;
                    let is_unicode = matches!(e, b'u' | b'U');
                    if high.is_some() && !is_unicode {
                        return error("an invalid Unicode surrogate pair in a string literal");
                    }
                    match e {
                        b'b' => v.push(8),
                        b'f' => v.push(12),
                        b'n' => v.push(b'\n'),
                        b'r' => v.push(b'\r'),
                        b't' => v.push(b'\t'),
                        b'0'..=b'7' => {
                            let mut n = u32::from(e - b'0');
                            for _ in 0..2 {
                                match self.peek(0) {
                                    Some(d @ b'0'..=b'7') => {
                                        n = n * 8 + u32::from(d - b'0');
                                        self.i += 1;
                                    }
                                    _ => break,
                                }
                            }
                            v.push(n as u8);
                        }
                        b'x' if self.peek(0).is_some_and(|d| d.is_ascii_hexdigit()) => {
                            let mut n = 0u32;
                            for _ in 0..2 {
                                match self.peek(0) {
                                    Some(d) if d.is_ascii_hexdigit() => {
                                        n = n * 16 + (d as char).to_digit(16).unwrap_or(0);
                                        self.i += 1;
                                    }
                                    _ => break,
                                }
                            }
                            v.push(n as u8);
                        }
                        b'u' | b'U' => {
                            let len = if e == b'u' { 4 } else { 8 };
                            let digits = self.b.get(self.i..self.i + len);
                            let Some(n) = digits
                                .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
                                .and_then(|d| std::str::from_utf8(d).ok())
                                .and_then(|d| u32::from_str_radix(d, 16).ok())
                            else {
                                return error("an invalid Unicode escape in a string literal");
                            };
                            self.i += len;
                            let n = match (high.take(), n) {
                                (None, 0xD800..=0xDBFF) => {
                                    high = Some(n);
                                    continue;
                                }
                                (Some(h), 0xDC00..=0xDFFF) => {
                                    0x10000 + ((h - 0xD800) << 10) + (n - 0xDC00)
                                }
                                (Some(_), _) | (None, 0xDC00..=0xDFFF) => {
                                    return error(
                                        "an invalid Unicode surrogate pair in a string literal",
                                    )
                                }
                                (None, n) => n,
                            };
                            match char::from_u32(n).filter(|&ch| ch != '\0') {
                                Some(ch) => {
                                    let mut buf = [0u8; 4];
                                    v.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                                }
                                None => {
                                    return error("an invalid Unicode escape in a string literal")
                                }
                            }
                        }
                        _ => {
                            // Any other character stands for itself (a multibyte one
                            // whole).
                            let from = self.i - 1;
                            let mut end = self.i;
                            while !self.sql.is_char_boundary(end) {
                                end += 1;
                            }
                            v.extend_from_slice(&self.b[from..end]);
                            self.i = end;
                        }
                    }
                }
                _ => {
                    v.push(c);
                    self.i += 1;
                }
            }
        }
        if high.is_some() {
            return error("an invalid Unicode surrogate pair in a string literal");
        }
        if v.contains(&0) {
            return error("a zero byte in a string literal, which the server refuses");
        }
        String::from_utf8(v).map_err(|_| {
            LexError(Cow::Borrowed(
                "an escape in a string literal that makes an invalid character",
            ))
        })
    }

    /// A quoted run whose quote is at `self.i`: its text up to the closing `quote`, a
    /// doubled quote standing for one where `doubled`, and, where `continued`, the same
    /// literal going on after whitespace with a newline (see `continues`).
    fn quoted(
        &mut self,
        quote: u8,
        doubled: bool,
        continued: bool,
        unterminated: &'static str,
    ) -> Result<String, LexError> {
        self.i += 1;
        let mut v = String::new();
        loop {
            let from = self.i;
            while self.peek(0).is_some_and(|c| c != quote) {
                self.i += 1;
            }
            v.push_str(&self.sql[from..self.i]);
            if self.peek(0).is_none() {
                return error(unterminated);
            }
            self.i += 1;
            if doubled && self.peek(0) == Some(quote) {
                v.push(quote as char);
                self.i += 1;
            } else if !(continued && self.continues()) {
                return Ok(v);
            }
        }
    }

    /// `'...'` with standard strings, the opening quote at `self.i`.
    fn plain_string(&mut self) -> Result<String, LexError> {
        self.quoted(b'\'', true, true, "an unterminated quoted string")
    }

    /// `B'...'` or `X'...'`, the quote at `self.i`.
    fn bit_string(&mut self) -> Result<String, LexError> {
        self.quoted(b'\'', false, true, "an unterminated bit string literal")
    }

    /// `"..."`, the quote at `self.i`, before truncation.
    fn quoted_ident_raw(&mut self) -> Result<String, LexError> {
        self.quoted(b'"', true, false, "an unterminated quoted identifier")
    }

    fn quoted_ident(&mut self) -> Result<String, LexError> {
        let v = self.quoted_ident_raw()?;
        if v.is_empty() {
            return error("a zero-length quoted identifier");
        }
        Ok(truncate(v))
    }

    /// Decodes the escapes of a `U&` literal or identifier, reading an `UESCAPE 'c'`
    /// clause after it.
    fn unicode_escapes(&mut self, raw: &str) -> Result<String, LexError> {
        let escape = self.uescape()?;
        let chars: Vec<char> = raw.chars().collect();
        let mut out = String::with_capacity(raw.len());
        let mut high: Option<u32> = None;
        let mut k = 0;
        let hex = |from: usize, n: usize| -> Option<u32> {
            let s: String = chars.get(from..from + n)?.iter().collect();
            if s.chars().all(|c| c.is_ascii_hexdigit()) {
                u32::from_str_radix(&s, 16).ok()
            } else {
                None
            }
        };
        while k < chars.len() {
            let c = chars[k];
            if c != escape {
                if high.is_some() {
                    return error("an invalid Unicode surrogate pair");
                }
                out.push(c);
                k += 1;
                continue;
            }
            let n = if chars.get(k + 1) == Some(&escape) {
                if high.is_some() {
                    return error("an invalid Unicode surrogate pair");
                }
                out.push(escape);
                k += 2;
                continue;
            } else if chars.get(k + 1) == Some(&'+') {
                let Some(n) = hex(k + 2, 6) else {
                    return error("an invalid Unicode escape");
                };
                k += 8;
                n
            } else {
                let Some(n) = hex(k + 1, 4) else {
                    return error("an invalid Unicode escape");
                };
                k += 5;
                n
            };
            let n = match (high.take(), n) {
                (None, 0xD800..=0xDBFF) => {
                    high = Some(n);
                    continue;
                }
                (Some(h), 0xDC00..=0xDFFF) => 0x10000 + ((h - 0xD800) << 10) + (n - 0xDC00),
                (Some(_), _) | (None, 0xDC00..=0xDFFF) => {
                    return error("an invalid Unicode surrogate pair")
                }
                (None, n) => n,
            };
            match char::from_u32(n).filter(|&ch| ch != '\0') {
                Some(ch) => out.push(ch),
                None => return error("an invalid Unicode escape value"),
            }
        }
        if high.is_some() {
            return error("an invalid Unicode surrogate pair");
        }
        Ok(out)
    }

    /// An optional `UESCAPE 'c'` at `self.i` (after whitespace and comments): the escape
    /// character, `\` without one.
    fn uescape(&mut self) -> Result<char, LexError> {
        let save = self.i;
        let skip = |l: &mut Self| -> Result<(), LexError> {
            loop {
                match (l.peek(0), l.peek(1)) {
                    (Some(c), _) if is_space(c) => l.i += 1,
                    (Some(b'-'), Some(b'-')) => l.line_comment(),
                    (Some(b'/'), Some(b'*')) => l.block_comment()?,
                    _ => return Ok(()),
                }
            }
        };
        skip(self)?;
        let word = self.b.get(self.i..self.i + 7);
        if !word.is_some_and(|w| w.eq_ignore_ascii_case(b"uescape"))
            || self.peek(7).is_some_and(ident_cont)
        {
            self.i = save;
            return Ok('\\');
        }
        self.i += 7;
        skip(self)?;
        if self.peek(0) != Some(b'\'') {
            return error("UESCAPE without a quoted escape character");
        }
        let v = self.plain_string()?;
        let mut chars = v.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None)
                if !c.is_ascii_hexdigit()
                    && !matches!(c, '+' | '\'' | '"')
                    && !c.is_whitespace() =>
            {
                Ok(c)
            }
            _ => error("an invalid Unicode escape character"),
        }
    }

    /// `$1`, or a dollar-quoted string.
    fn dollar(&mut self) -> Result<(), LexError> {
        let start = self.i;
        if self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
            while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.peek(0).is_some_and(ident_start) {
                return error("trailing junk after a parameter");
            }
            self.push(Kind::Param, start, Cow::Borrowed(&self.sql[start..self.i]));
            return Ok(());
        }
        let mut j = self.i + 1;
        if self.b.get(j).is_some_and(|&c| ident_start(c)) {
            j += 1;
            while self.b.get(j).is_some_and(|&c| ident_cont(c) && c != b'$') {
                j += 1;
            }
        }
        if self.b.get(j) != Some(&b'$') {
            return error("a $ that starts neither a parameter nor a dollar quote");
        }
        let tag = &self.sql[start..=j];
        let body_start = j + 1;
        let Some(len) = self.sql[body_start..].find(tag) else {
            return error("an unterminated dollar-quoted string");
        };
        self.i = body_start + len + tag.len();
        self.tokens.push(Token {
            kind: Kind::DollarStr,
            span: start..self.i,
            value: Cow::Borrowed(&self.sql[start..self.i]),
        });
        Ok(())
    }

    fn number(&mut self) -> Result<(), LexError> {
        let start = self.i;
        let digits = |l: &mut Self| {
            while l.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                l.i += 1;
            }
        };
        digits(self);
        if self.peek(0) == Some(b'.') && self.peek(1) != Some(b'.') {
            self.i += 1;
            digits(self);
        }
        if matches!(self.peek(0), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.peek(1), Some(b'+' | b'-')));
            if self.peek(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1 + sign;
                digits(self);
            }
        }
        if self.peek(0).is_some_and(ident_start) {
            return error("trailing junk after a numeric literal");
        }
        self.push(Kind::Number, start, Cow::Borrowed(&self.sql[start..self.i]));
        Ok(())
    }

    fn operator(&mut self) {
        let start = self.i;
        let mut end = start;
        while self.b.get(end).is_some_and(|c| OP_CHARS.contains(c)) {
            // A comment start inside the run ends the operator.
            let rest = &self.b[end..];
            if end > start && (rest.starts_with(b"--") || rest.starts_with(b"/*")) {
                break;
            }
            end += 1;
        }
        let mut text = &self.sql[start..end];
        if text.len() > 1 && !text.bytes().any(|c| b"~!@#^&|`?%".contains(&c)) {
            text = text.trim_end_matches(['+', '-']);
            if text.is_empty() {
                text = &self.sql[start..start + 1];
            }
        }
        self.i = start + text.len();
        self.push(Kind::Op, start, Cow::Borrowed(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(sql: &str) -> Vec<(Kind, String)> {
        lex(sql, Strings::Standard)
            .unwrap()
            .tokens
            .into_iter()
            .map(|t| (t.kind, t.folded().into_owned()))
            .collect()
    }

    #[test]
    fn comments_end_where_the_server_ends_them() {
        let l = lex("SELECT 1 -- x\rDELETE FROM t", Strings::Standard).unwrap();
        assert_eq!(l.statements().len(), 1);
        assert!(l.tokens.iter().any(|t| t.is_word("delete")));
        let l = lex("/* a /* b */ c */ SELECT 1", Strings::Standard).unwrap();
        assert_eq!(l.tokens.len(), 2);
        assert!(lex("/* a /* b */ SELECT 1", Strings::Standard).is_err());
    }

    #[test]
    fn identifiers_fold_decode_and_truncate() {
        assert_eq!(
            values(r#"SELECT U&"\0070hone", u&"d!0061ta" UESCAPE '!', "A""b", Phone"#)
                .into_iter()
                .filter(|(k, _)| *k != Kind::Op)
                .map(|(_, v)| v)
                .collect::<Vec<_>>(),
            vec!["select", "phone", "data", "A\"b", "phone"]
        );
        let long = "a".repeat(70);
        assert_eq!(values(&long)[0].1.len(), 63);
        assert!(lex("SELECT \"\"", Strings::Standard).is_err());
    }

    #[test]
    fn strings_as_the_server_reads_them() {
        assert_eq!(values("'a''b'")[0].1, "a'b");
        assert_eq!(values("'a\\'")[0].1, "a\\");
        assert_eq!(values("E'a\\'b\\n\\x41\\101\\u00e9'")[0].1, "a'b\nAAé");
        assert_eq!(values("'a'\n  'b'")[0].1, "ab");
        assert_eq!(values("'a' -- c\n'b'")[0].1, "ab");
        assert_eq!(values("'a' 'b'").len(), 2);
        assert_eq!(values("U&'\\0041\\+000042'")[0].1, "AB");
        let both = "SELECT '\\' , 1 --'";
        assert_eq!(lex(both, Strings::Escaped).unwrap().tokens.len(), 2);
        assert_eq!(lex(both, Strings::Standard).unwrap().tokens.len(), 4);
        assert!(lex(both, Strings::Unknown).is_err());
        assert!(lex("SELECT 'plain'", Strings::Unknown).is_ok());
        assert!(lex("E'\\xff'", Strings::Standard).is_err());
    }

    #[test]
    fn operators_and_numbers() {
        let ops: Vec<String> = values("a*-1 <> b::int @-1 x=>y !=- 1.5e3 .5")
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            ops,
            vec![
                "a", "*", "-", "1", "<>", "b", "::", "int", "@-", "1", "x", "=>", "y", "!=-",
                "1.5e3", ".5"
            ]
        );
        assert!(lex("SELECT 1abc", Strings::Standard).is_err());
        assert!(lex("SELECT 0x1F", Strings::Standard).is_err());
        assert_eq!(values("a+--c\n1").len(), 3);
    }

    #[test]
    fn dollar_quotes_and_statements() {
        let l = lex("SELECT $a$;$a$; DO $$ x; $$ ; SELECT $1", Strings::Standard).unwrap();
        let parts: Vec<&str> = l.statements().into_iter().map(|r| &l.sql[r]).collect();
        assert_eq!(parts, vec!["SELECT $a$;$a$", "DO $$ x; $$", "SELECT $1"]);
        let l = lex(
            "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT 3",
            Strings::Standard,
        )
        .unwrap();
        assert_eq!(l.statements().len(), 2);
    }

    #[test]
    fn canonical_and_shape() {
        let l = lex(
            "SELECT U&\"\\0070hone\" FROM T -- x\nWHERE a = E'it''s' AND b = 42",
            Strings::Standard,
        )
        .unwrap();
        assert_eq!(
            Lexed::canonical(&l.tokens),
            "select \"phone\" from t where a = 'it''s' and b = 42"
        );
        let mut s = String::new();
        Lexed::shape(&l.tokens, &mut s);
        assert_eq!(s, "select \"phone\" from t where a = ? and b = ?");
    }

    #[test]
    fn depth_counts_chains_and_nesting() {
        let deep = format!("SELECT 1{}", "+1".repeat(5000));
        let l = lex(&deep, Strings::Standard).unwrap();
        assert!(Lexed::depth(&l.tokens) > DEPTH_LIMIT);
        let wide = format!(
            "SELECT * FROM t WHERE id IN ({})",
            vec!["-1"; 5000].join(",")
        );
        let l = lex(&wide, Strings::Standard).unwrap();
        assert!(Lexed::depth(&l.tokens) < 10);
    }
}
