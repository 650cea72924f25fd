//! Property tests for the masking analysis over random CRM-shaped SQL: it never panics,
//! every rewrite re-parses and calls only pg_catalog-qualified masks, and a statement
//! forwarded unchanged uses masked columns only as bare output columns of the outermost
//! SELECT (where in-flight masking covers them). The generator tracks, for each
//! expression, whether it reads masked data, which gives the oracle.

use pgveil::policy::masking::{check, testing::crm_context, Verdict};
use proptest::prelude::*;

/// Leaves: (SQL, reads masked data, a plain column that in-flight masking covers).
fn column() -> impl Strategy<Value = (&'static str, bool, bool)> {
    prop::sample::select(vec![
        ("id", false, true),
        ("name", false, true),
        ("c.id", false, true),
        ("phone", true, true),
        ("email", true, true),
        ("card", true, true),
        ("c.phone", true, true),
        ("c.*", true, true),
        ("*", true, true),
        // A whole-row reference is never a plain column.
        ("c", true, false),
    ])
}

/// (SQL, reads masked data, is a bare leaf). Inside an expression a lone `*` becomes
/// `c.*` (the server itself rejects `upper(*)`).
fn expr() -> impl Strategy<Value = (String, bool, bool)> {
    let leaf = column().prop_map(|(s, m, b)| (s.to_string(), m, b));
    leaf.prop_recursive(3, 12, 3, |inner| {
        let inner = inner.prop_map(|(e, m, b)| {
            if e == "*" {
                ("c.*".to_string(), m, b)
            } else {
                (e, m, b)
            }
        });
        prop_oneof![
            inner
                .clone()
                .prop_map(|(e, m, _)| (format!("upper({e})"), m, false)),
            inner
                .clone()
                .prop_map(|(e, m, _)| (format!("({e})"), m, false)),
            (inner.clone(), inner.clone()).prop_map(|((a, ma, _), (b, mb, _))| (
                format!("{a} || {b}"),
                ma || mb,
                false
            )),
            inner
                .clone()
                .prop_map(|(e, m, _)| (format!("row_to_json({e})"), m, false)),
            inner.clone().prop_map(|(e, m, _)| (
                format!("(SELECT {e} FROM customers LIMIT 1)"),
                m,
                false
            )),
            inner
                .clone()
                .prop_map(|(e, m, _)| (format!("{e}::text"), m, false)),
        ]
    })
}

/// (SQL, whether forwarding it unchanged would be sound).
fn statement() -> impl Strategy<Value = (String, bool)> {
    (
        prop::collection::vec(expr(), 1..4),
        prop::option::of(expr()),
        prop::option::of(expr()),
        prop::bool::ANY,
    )
        .prop_map(|(items, filter, order, distinct)| {
            let masked_bare = items.iter().any(|(_, m, b)| *m && *b);
            let sound = items.iter().all(|(_, m, b)| !*m || *b)
                && !(distinct && masked_bare)
                && filter.as_ref().is_none_or(|(_, m, _)| !*m)
                && order.as_ref().is_none_or(|(_, m, _)| !*m);
            let list: Vec<&str> = items.iter().map(|(e, _, _)| e.as_str()).collect();
            let mut sql = format!(
                "SELECT {}{} FROM customers c JOIN deals d ON d.customer_id = c.id",
                if distinct { "DISTINCT " } else { "" },
                list.join(", ")
            );
            if let Some((f, _, _)) = filter {
                sql.push_str(&format!(" WHERE {f} LIKE '1%'"));
            }
            if let Some((o, _, _)) = order {
                sql.push_str(&format!(" ORDER BY {o}"));
            }
            (sql, sound)
        })
}

proptest! {
    // PROPTEST_CASES raises the count for a longer local hunt.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1500)
    ))]

    #[test]
    fn analysis_never_panics_on_noise(sql in "\\PC{0,200}") {
        crm_context(|ctx| { let _ = check(&sql, ctx); });
    }

    /// Lexing text made of the forms a lexer can trip on, under every
    /// standard_conforming_strings reading, and everything built on the tokens (splits,
    /// shapes, redaction, the guard's and the audit's analyses) never panics, and a
    /// statement's tokens lie within it.
    #[test]
    fn reading_never_panics_on_lexer_noise(parts in prop::collection::vec(prop::sample::select(vec![
        "'", "''", "\"", "\\", "E'", "U&'", "U&\"", "UESCAPE", "'!'", "$$", "$a$", "$1", "--", "/*",
        "*/", "\r", "\n", " ", ";", "\\u", "\\x4", "\\U0001F600", "\\uD83D", "é", "1e", ".5",
        "1..2", "::", "->>", "+-", "BEGIN ATOMIC", "END", "CASE", "(", ")", "[", "SELECT", "move",
        "fetch", "B'", "X'", "N'", "\u{0}", "\u{b}",
    ]), 0..40)) {
        use pgveil::sql::lex::{lex, Lexed, Strings};
        let sql = parts.concat();
        let catalog = pgveil::catalog::testing::crm_catalog();
        for strings in [Strings::Standard, Strings::Escaped, Strings::Unknown] {
            if let Ok(lexed) = lex(&sql, strings) {
                let mut shape = String::new();
                for range in lexed.statements() {
                    let tokens = lexed.within(&range);
                    prop_assert!(tokens.iter().all(|t| range.contains(&t.span.start)));
                    Lexed::shape(tokens, &mut shape);
                    let _ = Lexed::redacted(&sql, tokens);
                    let _ = pgveil::sql::audit::analyse_tokens(tokens);
                }
                // The one analysis: every statement's facts, shapes and parse.
                let analysis = pgveil::sql::analysis::Analysis::new(&lexed);
                let mut cache = pgveil::sql::analysis::FactsCache::default();
                let facts = analysis.guard_facts(&mut cache);
                let _ = pgveil::sql::guard::opaque_call(&facts.calls, &catalog);
                let _ = analysis.statements();
                let _ = analysis.whole(&mut cache);
            }
        }
        let _ = pgveil::sql::analysis::guard_facts(&sql, Strings::Unknown);
        crm_context(|ctx| { let _ = check(&sql, ctx); });
    }

    #[test]
    fn verdicts_are_sound((sql, sound) in statement()) {
        crm_context(|ctx| {
            match check(&sql, ctx).0 {
                Verdict::Rewritten(out) => {
                    prop_assert!(pgveil::sql::parse(&out).is_ok(), "{out}");
                    prop_assert!(out.contains("pg_catalog."), "{out}");
                }
                Verdict::Masked | Verdict::Pass => {
                    prop_assert!(sound, "forwarded unchanged: {sql}");
                }
                Verdict::CopyOut(copy) => {
                    prop_assert!(pgveil::sql::parse(&copy.sql).is_ok(), "{}", copy.sql);
                    prop_assert!(pgveil::sql::parse(&copy.inner).is_ok(), "{}", copy.inner);
                }
                Verdict::Refused(_) => {}
            }
            Ok(())
        })?;
    }
}
