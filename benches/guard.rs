//! The guard's per-statement cost: a TPC-B statement judged from its cached shape (what a
//! running application pays) and analysed in full (its first call), and the shape scan.
//!
//!     cargo bench --bench guard

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pgveil::catalog::testing::crm_catalog;
use pgveil::config::rules::Rules;
use pgveil::identity::SessionIdentity;
use pgveil::policy::guard::GuardPolicy;
use pgveil::policy::session_guard::SessionGuard;

const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + -4187 WHERE aid = 38451;";

fn guard() -> SessionGuard {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("r.toml"),
        "[settings]\nprotected = [\"insert\", \"update\", \"delete\"]\n\
         [[allow]]\nroles = [\"bench\"]\nstatements = [\"insert\", \"update\", \"delete\"]\ntables = [\"public.pgbench_*\"]\n",
    )
    .expect("rules");
    let rules = Rules::load(dir.path()).expect("valid rules");
    let identity = SessionIdentity::offline("bench", &[], "bench");
    let policy = GuardPolicy::for_session(&rules, &identity).expect("guarded");
    let catalog = std::sync::Arc::new(crm_catalog());
    SessionGuard::new(policy, catalog, "bench".into(), vec!["public".into()])
}

fn bench(c: &mut Criterion) {
    let mut g = guard();
    let mut n = 0u64;
    c.bench_function("guard: TPC-B UPDATE, cached shape", |b| {
        b.iter(|| {
            n += 1;
            let sql = format!(
                "UPDATE pgbench_accounts SET abalance = abalance + -{} WHERE aid = {};",
                n % 5000,
                n
            );
            black_box(g.screen(&sql, pgveil::sql::Strings::Standard)).expect("allowed")
        })
    });
    c.bench_function("guard: TPC-B UPDATE, full analysis", |b| {
        b.iter(|| {
            let mut fresh = guard_clone(&g);
            black_box(fresh.screen(UPDATE, pgveil::sql::Strings::Standard)).expect("allowed")
        })
    });
    let mut out = String::new();
    c.bench_function("lexing and shape of a TPC-B UPDATE", |b| {
        b.iter(|| {
            let lexed = pgveil::sql::lex::lex(black_box(UPDATE), pgveil::sql::Strings::Standard)
                .expect("lexes");
            pgveil::sql::lex::Lexed::shape(&lexed.tokens, &mut out);
            black_box(out.len())
        })
    });
}

fn guard_clone(g: &SessionGuard) -> SessionGuard {
    SessionGuard::new(
        g.policy().clone(),
        g.catalog.clone(),
        "bench".into(),
        vec!["public".into()],
    )
}

criterion_group!(benches, bench);
criterion_main!(benches);
