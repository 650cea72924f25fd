//! What screening one simple-protocol statement costs a session, end to end on the client
//! side (analysis, decisions, audit facts), for a masked and for a guarded session, with
//! the literals changing at every call as an application's do.
//!
//!     cargo bench --bench analysis

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use pgveil::catalog::testing::crm_catalog;
use pgveil::config::rules::Rules;
use pgveil::identity::SessionIdentity;
use pgveil::metrics::Metrics;
use pgveil::policy::guard::GuardPolicy;
use pgveil::policy::session_guard::SessionGuard;
use pgveil::policy::session_masking::SessionPolicy;
use pgveil::protocol::frontend::FrontendMessage;
use pgveil::protocol::write;
use pgveil::session::audit::{AuditSetup, Sensitive, SessionAudit, Who};
use pgveil::session::screen::screen;
use pgveil::session::state::SessionState;

const MASKS: &str = r#"
[settings]
protected = ["delete", "truncate", "drop"]
[[mask]]
column = "customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
[[mask]]
column = "customers.email"
function = "email"
"#;

const GUARD: &str = r#"
[settings]
protected = ["insert", "update", "delete"]
[[allow]]
roles = ["bench"]
statements = ["insert", "update", "delete"]
tables = ["public.*"]
"#;

fn rules(toml: &str) -> Rules {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("r.toml"), toml).expect("rules");
    Rules::load(dir.path()).expect("valid rules")
}

fn session(toml: &str) -> SessionState {
    let rules = rules(toml);
    let identity = SessionIdentity::offline("bench", &[], "bench");
    let catalog = Arc::new(crm_catalog());
    let search_path = vec!["pg_catalog".to_string(), "public".to_string()];
    let mut st = SessionState::new(HashMap::new());
    let masks = pgveil::policy::SessionMasks::build(&rules, &identity, &catalog);
    if !masks.is_empty() {
        st.policy = Some(SessionPolicy::new(
            Arc::new(masks),
            Arc::default(),
            catalog.clone(),
            search_path.clone(),
            &rules.settings,
            "bench".into(),
        ));
    }
    st.guard = GuardPolicy::for_session(&rules, &identity)
        .map(|g| SessionGuard::new(g, catalog.clone(), "bench".into(), search_path.clone()));
    let who = Who {
        session: 1,
        user: "bench".into(),
        database: "bench".into(),
        client_addr: "127.0.0.1:50000".into(),
        application_name: "bench".into(),
    };
    st.audit = Some(
        SessionAudit::new(
            who,
            AuditSetup {
                log: None,
                metrics: Arc::new(Metrics::default()),
                redact: false,
                catalog: Some(catalog.clone()),
                search_path,
                sensitive: Sensitive::build(&rules, &identity, Some(&catalog)),
                alerts: None,
                counters: None,
            },
        )
        .recording(),
    );
    st
}

/// Screens `sql` as a Query and plays the server's answer, so nothing piles up.
fn round_trip(st: &mut SessionState, sql: &str, out: &mut BytesMut) {
    let frame = write::query(sql);
    let msg = FrontendMessage::Query { sql };
    screen(st, &msg, &frame, out, false, None);
    out.clear();
    if let Some(a) = st.audit.as_mut() {
        a.on_complete(Some("SELECT 1"), true);
        a.on_ready(pgveil::protocol::backend::TransactionStatus::Idle);
        black_box(a.take_completed());
    }
    st.on_server(b'C', None);
    st.on_server(b'Z', None);
}

/// A benchmark case: its name, the rules it runs under, and its statement for an iteration.
type Case = (&'static str, &'static str, fn(u64) -> String);

fn bench(c: &mut Criterion) {
    let mut out = BytesMut::new();
    let cases: [Case; 6] = [
        ("masked session: SELECT masked in flight", MASKS, |n| {
            format!("SELECT id, name, phone FROM customers WHERE id = {n}")
        }),
        ("masked session: SELECT rewritten", MASKS, |n| {
            format!("SELECT id, upper(phone) FROM customers c WHERE c.id = {n}")
        }),
        ("guarded session: UPDATE", GUARD, |n| {
            format!(
                "UPDATE deals SET amount = amount + {} WHERE id = {n};",
                n % 5000
            )
        }),
        ("guarded session: SELECT join", GUARD, |n| {
            format!("SELECT d.amount, c.name FROM deals d JOIN customers c ON c.id = d.customer_id WHERE d.id = {n}")
        }),
        // A shape never seen before (an alias that changes): no cache helps.
        (
            "masked session: a statement never seen before",
            MASKS,
            |n| format!("SELECT c{n}.id, c{n}.phone FROM customers c{n} WHERE c{n}.id = 1"),
        ),
        (
            "guarded session: a statement never seen before",
            GUARD,
            |n| format!("UPDATE deals d{n} SET amount = amount + 1 WHERE d{n}.id = 1"),
        ),
    ];
    for (name, toml, sql) in cases {
        let mut st = session(toml);
        let mut n = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                round_trip(&mut st, &sql(n), &mut out)
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
