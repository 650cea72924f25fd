//! Statement analysis: PostgreSQL's lexing (`lex`), name scoping per query level
//! (`scope`), and sqlparser's AST over the server's tokens (never string matching), with a
//! bound on depth; identifier folding as PostgreSQL does it, statement kinds, and the
//! guard, masking and audit analyses. A statement that cannot be read as the server reads
//! it, or parsed, means "cannot prove safe".

pub mod analysis;
pub mod audit;
pub mod conditions;
pub mod guard;
pub mod lex;
pub mod scope;

use std::borrow::Cow;
use std::ops::ControlFlow;

use sqlparser::ast::{ObjectName, ObjectNamePart, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use lex::Lexed;
pub use lex::Strings;

/// Deep enough for real CRM queries, shallow enough to bound stack use on hostile input.
const RECURSION_LIMIT: usize = 64;

/// Parses a query string read with standard_conforming_strings on.
pub fn parse(sql: &str) -> Result<Vec<Statement>, ParserError> {
    parse_as(sql, Strings::Standard)
}

/// Parses a query string into its statements, for every analysis (masking, guard, audit):
/// the server's tokens (see [`lex`]) under the session's `strings` setting.
pub fn parse_as(sql: &str, strings: Strings) -> Result<Vec<Statement>, ParserError> {
    let lexed = lex::lex(sql, strings).map_err(|e| ParserError::ParserError(e.to_string()))?;
    parse_tokens(&lexed.tokens)
}

/// Parses the server's tokens of a query string: sqlparser reads their canonical text,
/// so it sees the tokens the server sees, whatever their spelling.
pub fn parse_tokens(tokens: &[lex::Token<'_>]) -> Result<Vec<Statement>, ParserError> {
    if Lexed::depth(tokens) > lex::DEPTH_LIMIT {
        return Err(ParserError::RecursionLimitExceeded);
    }
    let tokens = cursor_statements(tokens);
    let parser = Parser::new(&PostgreSqlDialect {}).with_recursion_limit(RECURSION_LIMIT);
    // The server's tokens go to sqlparser as they are; a form this mapping does not know
    // goes as canonical text, which sqlparser tokenizes alike.
    let statements = match parser_tokens(&tokens) {
        Some(t) => parser.with_tokens(t).parse_statements()?,
        None => parser
            .try_with_sql(&Lexed::canonical(&tokens))?
            .parse_statements()?,
    };
    if statements
        .iter()
        .any(|s| s.visit(&mut MisreadOnly).is_break())
    {
        return Err(ParserError::ParserError(
            "ONLY before a table name, which sqlparser reads as a table named only".into(),
        ));
    }
    if statements
        .iter()
        .any(|s| s.visit(&mut TableCommand).is_break())
    {
        return Err(ParserError::ParserError(
            "the TABLE command, which sqlparser reads without its table as a reference".into(),
        ));
    }
    Ok(statements)
}

/// The server's tokens as sqlparser's, for the forms whose sqlparser token is certain;
/// `None` for any other.
fn parser_tokens(tokens: &[lex::Token<'_>]) -> Option<Vec<sqlparser::tokenizer::Token>> {
    use lex::Kind;
    use sqlparser::ast::DollarQuotedString;
    use sqlparser::tokenizer::Token as T;
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        let v = t.value.as_ref();
        out.push(match t.kind {
            Kind::Word => T::make_word(v, None),
            Kind::QuotedIdent => T::make_word(v, Some('"')),
            Kind::Str => T::SingleQuotedString(v.to_string()),
            Kind::NationalStr => T::NationalStringLiteral(v.to_string()),
            Kind::Number => T::Number(v.to_string(), false),
            Kind::Param => T::Placeholder(v.to_string()),
            Kind::DollarStr => {
                let tag_end = v[1..].find('$')? + 1;
                let tag = &v[1..tag_end];
                T::DollarQuotedString(DollarQuotedString {
                    value: v[tag_end + 1..v.len() - tag_end - 1].to_string(),
                    tag: (!tag.is_empty()).then(|| tag.to_string()),
                })
            }
            Kind::BitStr(_) => return None,
            Kind::Op => match v {
                "," => T::Comma,
                "(" => T::LParen,
                ")" => T::RParen,
                "[" => T::LBracket,
                "]" => T::RBracket,
                "." => T::Period,
                ";" => T::SemiColon,
                ":" => T::Colon,
                "::" => T::DoubleColon,
                ":=" => T::Assignment,
                "=>" => T::RArrow,
                "+" => T::Plus,
                "-" => T::Minus,
                "*" => T::Mul,
                "/" => T::Div,
                "%" => T::Mod,
                "^" => T::Caret,
                "<" => T::Lt,
                ">" => T::Gt,
                "=" => T::Eq,
                "<=" => T::LtEq,
                ">=" => T::GtEq,
                "<>" | "!=" => T::Neq,
                "||" => T::StringConcat,
                "~" => T::Tilde,
                "~*" => T::TildeAsterisk,
                "!~" => T::ExclamationMarkTilde,
                "!~*" => T::ExclamationMarkTildeAsterisk,
                "~~" => T::DoubleTilde,
                "~~*" => T::DoubleTildeAsterisk,
                "!~~" => T::ExclamationMarkDoubleTilde,
                "!~~*" => T::ExclamationMarkDoubleTildeAsterisk,
                "->" => T::Arrow,
                "->>" => T::LongArrow,
                "#>" => T::HashArrow,
                "#>>" => T::HashLongArrow,
                "@>" => T::AtArrow,
                "<@" => T::ArrowAt,
                "&&" => T::Overlap,
                "<<" => T::ShiftLeft,
                ">>" => T::ShiftRight,
                "&" => T::Ampersand,
                "|" => T::Pipe,
                "#" => T::Sharp,
                _ => return None,
            },
        });
    }
    Some(out)
}

/// The tokens with the cursor statements sqlparser does not read written as the FETCH it
/// does: `MOVE` (a FETCH that returns no rows, to the analysis) and `FETCH n cur` without
/// FROM or IN. Borrowed as they are when no statement is one.
fn cursor_statements<'a, 't>(tokens: &'t [lex::Token<'a>]) -> Cow<'t, [lex::Token<'a>]> {
    let cursor_op = |t: &lex::Token<'_>| t.is_word("move") || t.is_word("fetch");
    let mut starts = tokens
        .first()
        .into_iter()
        .chain(tokens.windows(2).filter(|w| w[0].is_op(";")).map(|w| &w[1]));
    if !starts.any(cursor_op) {
        return Cow::Borrowed(tokens);
    }
    let word = |at: &lex::Token<'_>, w: &'static str| lex::Token {
        kind: lex::Kind::Word,
        span: at.span.clone(),
        value: Cow::Borrowed(w),
    };
    let mut out = Vec::with_capacity(tokens.len() + 2);
    for (i, segment) in tokens.split(|t| t.is_op(";")).enumerate() {
        if i > 0 {
            // The semicolon the split consumed.
            let at = segment.first().map_or(0, |t| t.span.start);
            out.push(lex::Token {
                kind: lex::Kind::Op,
                span: at..at,
                value: Cow::Borrowed(";"),
            });
        }
        match segment.split_first() {
            Some((first, rest)) if cursor_op(first) => {
                out.push(word(first, "fetch"));
                // A signed count (`MOVE -1 FROM c`, psycopg2's scroll(-1)) is one number.
                let signed = signed_counts(rest);
                let rest = signed.as_ref();
                let has_from = rest.iter().any(|t| t.is_word("from") || t.is_word("in"));
                match rest.split_last() {
                    Some((cursor, direction))
                        if !has_from
                            && matches!(cursor.kind, lex::Kind::Word | lex::Kind::QuotedIdent) =>
                    {
                        out.extend_from_slice(direction);
                        if direction.is_empty() {
                            out.push(word(first, "next"));
                        }
                        out.push(word(cursor, "from"));
                        out.push(cursor.clone());
                    }
                    _ => out.extend_from_slice(rest),
                }
            }
            _ => out.extend_from_slice(segment),
        }
    }
    Cow::Owned(out)
}

/// A cursor operation's tokens with each `+`/`-` before a number folded into the number.
fn signed_counts<'a, 't>(tokens: &'t [lex::Token<'a>]) -> Cow<'t, [lex::Token<'a>]> {
    let sign = |w: &[lex::Token<'_>]| {
        (w[0].is_op("-") || w[0].is_op("+")) && w[1].kind == lex::Kind::Number
    };
    if !tokens.windows(2).any(sign) {
        return Cow::Borrowed(tokens);
    }
    let mut out: Vec<lex::Token<'a>> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        if i + 1 < tokens.len() && sign(&tokens[i..i + 2]) {
            let number = &tokens[i + 1];
            let value = format!(
                "{}{}",
                if tokens[i].is_op("-") { "-" } else { "" },
                number.value
            );
            out.push(lex::Token {
                kind: lex::Kind::Number,
                span: tokens[i].span.start..number.span.end,
                value: Cow::Owned(value),
            });
            i += 2;
        } else {
            out.push(tokens[i].clone());
            i += 1;
        }
    }
    Cow::Owned(out)
}

/// sqlparser reads `FROM ONLY t`, `UPDATE ONLY t` and `DELETE FROM ONLY t` as a table named
/// `only` with alias `t`. ONLY is reserved in PostgreSQL, so an unquoted relation of that
/// name is always this misreading, and the statement is not what the AST says.
struct MisreadOnly;

impl Visitor for MisreadOnly {
    type Break = ();

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table { name, .. }
                if matches!(name.0.as_slice(), [ObjectNamePart::Identifier(i)]
                    if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("only")) =>
            {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// `TABLE name` (short for `SELECT * FROM name`): sqlparser keeps it as a bare name, not a
/// table reference, so no analysis would see the table it reads. It is not analysed.
struct TableCommand;

impl Visitor for TableCommand {
    type Break = ();

    fn pre_visit_query(&mut self, q: &sqlparser::ast::Query) -> ControlFlow<()> {
        fn has_table(set: &sqlparser::ast::SetExpr) -> bool {
            use sqlparser::ast::SetExpr;
            match set {
                SetExpr::Table(_) => true,
                SetExpr::SetOperation { left, right, .. } => has_table(left) || has_table(right),
                _ => false,
            }
        }
        if has_table(&q.body) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Statement-opening keywords, for naming a statement that could not be analysed.
const LEADING_KEYWORDS: [&str; 52] = [
    "abort",
    "alter",
    "analyze",
    "begin",
    "call",
    "checkpoint",
    "close",
    "cluster",
    "comment",
    "commit",
    "copy",
    "create",
    "deallocate",
    "declare",
    "delete",
    "discard",
    "do",
    "drop",
    "end",
    "execute",
    "explain",
    "fetch",
    "grant",
    "import",
    "insert",
    "listen",
    "load",
    "lock",
    "merge",
    "move",
    "notify",
    "prepare",
    "reassign",
    "refresh",
    "reindex",
    "release",
    "reset",
    "revoke",
    "rollback",
    "savepoint",
    "security",
    "select",
    "set",
    "show",
    "start",
    "table",
    "truncate",
    "unlisten",
    "update",
    "vacuum",
    "values",
    "with",
];

/// The opening keyword (`do`, `select`, ...) of a query string that holds one statement:
/// what a refusal can name of a statement pgveil could not analyse. `None` for several
/// statements, or when the first word is not a statement keyword.
pub fn leading_keyword(sql: &str) -> Option<&'static str> {
    let lexed = lex::lex(sql, Strings::Standard).ok()?;
    let parts = lexed.statements();
    let [one] = parts.as_slice() else {
        return None;
    };
    let word = lexed.within(one).iter().find(|t| !t.is_op("("))?;
    if word.kind != lex::Kind::Word {
        return None;
    }
    LEADING_KEYWORDS
        .iter()
        .copied()
        .find(|k| word.value.eq_ignore_ascii_case(k))
}

pub use crate::predicate::fold;

/// The folded parts of a dotted name; `None` if a part is not a plain identifier.
pub fn name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(fold(i)),
            _ => None,
        })
        .collect()
}

/// The statement kind as rules and audit records name it.
pub fn kind_of(stmt: &Statement) -> &'static str {
    match stmt {
        Statement::Query(_) => "select",
        Statement::Insert(_) => "insert",
        Statement::Update(_) => "update",
        Statement::Delete(_) => "delete",
        Statement::Merge(_) => "merge",
        Statement::Truncate(_) => "truncate",
        Statement::Drop { .. } | Statement::DropFunction(_) => "drop",
        Statement::Copy { to: true, .. } => "copy_to",
        Statement::Copy { to: false, .. } => "copy_from",
        Statement::Call(_) => "call",
        Statement::Set(_) => "set",
        Statement::Grant(_) => "grant",
        Statement::Revoke(_) => "revoke",
        Statement::Explain { .. } => "explain",
        Statement::Prepare { .. } => "prepare",
        Statement::Execute { .. } => "execute",
        Statement::Declare { .. } => "declare",
        Statement::Fetch { .. } => "fetch",
        Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::CreateIndex(_)
        | Statement::CreateFunction(_)
        | Statement::CreateSchema { .. } => "create",
        Statement::AlterTable(_) | Statement::AlterIndex { .. } | Statement::AlterView { .. } => {
            "alter"
        }
        _ => "other",
    }
}

/// Built-ins that run SQL given as text, read files or large objects, or change settings
/// behind the analysis's back.
pub(crate) fn is_dangerous(name: &str) -> bool {
    name.contains("_to_xml")
        || name.starts_with("dblink")
        || name.starts_with("lo_")
        || matches!(
            name,
            "ts_stat"
                | "loread"
                | "pg_read_file"
                | "pg_read_binary_file"
                | "pg_ls_dir"
                | "pg_stat_file"
                | "set_config"
                | "ts_rewrite"
                | "query_to_xmlschema"
        )
}

/// Functions that are SQL grammar rather than pg_proc entries.
pub(crate) fn is_grammar_function(name: &str) -> bool {
    matches!(
        name,
        "coalesce"
            | "nullif"
            | "greatest"
            | "least"
            | "current_date"
            | "current_time"
            | "current_timestamp"
            | "localtime"
            | "localtimestamp"
            | "current_user"
            | "session_user"
            | "user"
            | "current_role"
            | "current_catalog"
            | "current_schema"
            | "grouping"
            | "xmlconcat"
            | "xmlforest"
            | "xmlelement"
            | "array"
            | "row"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_like_postgres() {
        let stmts = parse("SELECT \"Phone\", Email FROM Public.\"Customers\"").unwrap();
        assert_eq!(stmts.len(), 1);
        assert_eq!(fold(&sqlparser::ast::Ident::new("Email")), "email");
        assert_eq!(
            fold(&sqlparser::ast::Ident::with_quote('"', "Phone")),
            "Phone"
        );
    }

    #[test]
    fn leading_keywords_name_single_statements_only() {
        assert_eq!(leading_keyword("DO $$ BEGIN END $$"), Some("do"));
        assert_eq!(
            leading_keyword("  /* c */ -- x\n (SELECT 1);"),
            Some("select")
        );
        assert_eq!(
            leading_keyword("with d AS (SELECT 1) SELECT * FROM d"),
            Some("with")
        );
        assert_eq!(leading_keyword("SELECT 1; DO $$ BEGIN END $$"), None);
        assert_eq!(leading_keyword("\"select\" 1"), None);
        assert_eq!(leading_keyword("wipe()"), None);
        assert_eq!(leading_keyword(""), None);
        assert!(LEADING_KEYWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let sql = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(parse(&sql).is_err());
    }

    #[test]
    fn token_feed_parses_as_the_canonical_text_does() {
        for sql in [
            "SELECT id, upper(phone) FROM customers c WHERE c.id = $1 AND name ~* 'x' OR a->>'k' = E'\\n'",
            "SELECT a::text[], b[1:2], c #>> '{a,b}', d @> '{}'::jsonb, e <> 1, f != 2, g || 'x'",
            "WITH x AS (SELECT 1) INSERT INTO t (a) SELECT * FROM x ON CONFLICT (a) DO UPDATE SET a = excluded.a RETURNING a",
            "SELECT $q$it's$q$, $$x$$, N'n', U&\"\\0070hone\" FROM \"Customers\" -- c\r; DELETE FROM t WHERE x IN (1, -2.5e3)",
            "UPDATE deals SET amount = amount + -4187 WHERE id = 38451;",
            "SELECT f(a => 1, b := 2), count(*) FILTER (WHERE x % 2 = 0) OVER (PARTITION BY y)",
        ] {
            let lexed = lex::lex(sql, Strings::Standard).unwrap();
            let fed = parser_tokens(&lexed.tokens).expect("every token mapped");
            let by_tokens = Parser::new(&PostgreSqlDialect {})
                .with_tokens(fed)
                .parse_statements()
                .unwrap();
            let by_text = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&Lexed::canonical(&lexed.tokens))
                .unwrap()
                .parse_statements()
                .unwrap();
            let show = |s: &[Statement]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!(show(&by_tokens), show(&by_text), "{sql}");
        }
    }

    #[test]
    fn long_chains_are_bounded_and_fit_a_worker_stack() {
        let over = format!("SELECT 1{}", "+1".repeat(lex::DEPTH_LIMIT));
        assert!(parse(&over).is_err());
        // Just under the limit, every recursive walk (visiting, printing, dropping) fits
        // the stack of a tokio worker thread (2 MiB).
        let under = format!("SELECT 1{}", "+1".repeat(lex::DEPTH_LIMIT - 10));
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let stmts = parse(&under).unwrap();
                let _ = stmts[0].visit(&mut MisreadOnly);
                assert!(stmts[0].to_string().len() > 1000);
                drop(stmts);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
