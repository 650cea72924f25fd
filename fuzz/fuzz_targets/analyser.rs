//! Feeds arbitrary text to the one reading of statements every analysis shares: the
//! lexer (under every standard_conforming_strings reading), statement splitting, shapes
//! and redaction, the guard's and the audit's analyses, and the masking checker with a
//! masked session. None may panic, a statement's tokens lie within it, and a rewrite must
//! re-parse.
//!
//! Run with: `cargo +nightly fuzz run analyser` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgveil::sql::lex::{lex, Lexed, Strings};
use pgveil::policy::masking::{testing::crm_context, Verdict};

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let catalog = pgveil::catalog::testing::crm_catalog();
    for strings in [Strings::Standard, Strings::Escaped, Strings::Unknown] {
        if let Ok(lexed) = lex(sql, strings) {
            let mut shape = String::new();
            for range in lexed.statements() {
                let tokens = lexed.within(&range);
                assert!(tokens.iter().all(|t| range.contains(&t.span.start)));
                Lexed::shape(tokens, &mut shape);
                let _ = Lexed::redacted(sql, tokens);
                let _ = pgveil::sql::audit::analyse_tokens(tokens);
            }
        }
    }
    crm_context(|ctx| {
        let _ = pgveil::sql::analysis::guard_facts(sql, Strings::Standard);
        if let (Verdict::Rewritten(out), _) = pgveil::policy::masking::check(sql, ctx) {
            assert!(pgveil::sql::parse(&out).is_ok(), "rewrite does not parse: {out}");
        }
    });
});
