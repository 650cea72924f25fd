//! The shape of a query string: its text with plain numeric and string literals replaced
//! by `?`, used as a cache key for verdicts that cannot depend on literal values (which
//! tables a statement deletes from does not change with the numbers in its WHERE clause).
//!
//! The scan is deliberately narrower than PostgreSQL's lexer: every form whose extent it
//! could misjudge (escape strings, dollar quotes, Unicode escapes, bit and hex strings, a
//! backslash inside a string, an unterminated comment) makes [`shape`] give up, and the
//! caller analyses the statement in full. Giving up is always safe; ending a literal later
//! than the server does would not be, so a literal is only ever cut where the server cuts
//! it.

/// Writes the shape of `sql` into `out` (cleared first). `false` when the text holds a
/// form this scanner does not handle; `out` is then meaningless.
pub fn shape(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    let mut i = 0;
    // Whether the previous byte continues an identifier or keyword.
    let mut in_word = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => {
                if in_word {
                    // E'..', B'..', X'..', N'..', U&'..' and friends.
                    return false;
                }
                i += 1;
                loop {
                    match b.get(i) {
                        None => return false,
                        Some(b'\\') => return false,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break,
                        Some(_) => i += 1,
                    }
                }
                out.push('?');
                i += 1;
                in_word = false;
                continue;
            }
            b'"' => {
                if in_word || out.ends_with('&') {
                    return false;
                }
                let start = i;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return false,
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                out.push_str(&sql[start..=i]);
                i += 1;
                in_word = false;
                continue;
            }
            b'$' if !in_word => {
                // `$1` is a parameter; anything else here opens a dollar quote.
                if !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return false;
                }
                out.push('$');
                i += 1;
                in_word = true;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                out.push(' ');
                in_word = false;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                loop {
                    match (b.get(i), b.get(i + 1)) {
                        (None, _) => return false,
                        (Some(b'/'), Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some(b'*'), Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => i += 1,
                    }
                }
                out.push(' ');
                in_word = false;
                continue;
            }
            b'0'..=b'9' if !in_word => {
                i = number_end(b, i);
                out.push('?');
                // A letter right after a number starts a new word, as for the server.
                in_word = false;
                continue;
            }
            b'.' if !in_word && b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i = number_end(b, i);
                out.push('?');
                in_word = false;
                continue;
            }
            _ => {}
        }
        in_word = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        // Copy a run of plain bytes at once (UTF-8 sequences stay whole).
        let start = i;
        i += 1;
        while i < b.len() && b[i] >= 0x80 {
            i += 1;
        }
        out.push_str(&sql[start..i]);
    }
    true
}

/// The end of the numeric literal starting at `i`: digits, a fraction, an exponent.
fn number_end(b: &[u8], mut i: usize) -> usize {
    let digits = |b: &[u8], mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    i = digits(b, i);
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i = digits(b, i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(b, i + 1 + sign);
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(sql: &str) -> Option<String> {
        let mut out = String::new();
        shape(sql, &mut out).then_some(out)
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            of("UPDATE pgbench_accounts SET abalance = abalance + -4187 WHERE aid = 38451;")
                .unwrap(),
            "UPDATE pgbench_accounts SET abalance = abalance + -? WHERE aid = ?;"
        );
        assert_eq!(
            of("SELECT 'it''s', 1.5e-3, .5, t1.c2 FROM t1").unwrap(),
            "SELECT ?, ?, ?, t1.c2 FROM t1"
        );
        assert_eq!(
            of("SELECT $1, a$2 FROM \"T \"\"x\"\"\" -- c\n/* a /* b */ */").unwrap(),
            "SELECT $1, a$2 FROM \"T \"\"x\"\"\"  \n "
        );
    }

    #[test]
    fn forms_it_cannot_bound_give_up() {
        for sql in [
            "SELECT E'a\\'b'",
            "SELECT 'a\\'",
            "SELECT $$x$$",
            "SELECT $a$x$a$",
            "SELECT U&'\\0041'",
            "SELECT U&\"a\"",
            "SELECT B'101'",
            "SELECT X'1f'",
            "SELECT 'open",
            "SELECT /* open",
            "SELECT \"open",
        ] {
            assert_eq!(of(sql), None, "{sql}");
        }
    }

    #[test]
    fn different_statements_have_different_shapes() {
        assert_ne!(
            of("SELECT 1 FROM t WHERE a = 1").unwrap(),
            of("DELETE FROM t WHERE a = 1").unwrap()
        );
        assert_eq!(
            of("SELECT 'x; DELETE FROM t'").unwrap(),
            of("SELECT 'y'").unwrap()
        );
        assert_ne!(
            of("SELECT 'a' ; DELETE FROM t; SELECT 'b'").unwrap(),
            of("SELECT 'a'").unwrap()
        );
    }
}
