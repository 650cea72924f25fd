//! Feeds arbitrary text to the statement analysis with a masked session: parsing, the
//! masking checker and the rewrites must never panic, and a rewrite must re-parse.
//!
//! Run with: `cargo +nightly fuzz run analyser` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgveil::sql::masking::{testing::crm_context, Verdict};

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        crm_context(|ctx| {
            if let (Verdict::Rewritten(out), _) = pgveil::sql::masking::check(sql, ctx) {
                assert!(pgveil::sql::parse(&out).is_ok(), "rewrite does not parse: {out}");
            }
        });
    }
});
