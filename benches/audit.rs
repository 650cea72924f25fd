//! The audit log's per-statement cost inside pgveil: a prepared statement's Execute turned
//! into a record (facts from the session's cache, the canonical JSON), and the writer's
//! share (the hash chain and the line) without the write(2) itself.
//!
//!     cargo bench --bench audit

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use pgveil::audit::record::{chain_hash, line, GENESIS};
use pgveil::metrics::Metrics;
use pgveil::protocol::frontend::FrontendMessage;
use pgveil::session::audit::{AuditSetup, Sensitive, SessionAudit, Who};
use pgveil::sql::analysis::{Analysis, FactsCache};
use pgveil::sql::lex::lex;
use pgveil::sql::Strings;

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

fn session() -> SessionAudit {
    let who = Who {
        session: 1,
        user: "bench".into(),
        database: "bench".into(),
        client_addr: "127.0.0.1:50000".into(),
        application_name: "pgbench".into(),
    };
    SessionAudit::new(
        who,
        AuditSetup {
            log: None,
            metrics: Arc::new(Metrics::default()),
            redact: false,
            catalog: None,
            search_path: vec!["public".into()],
            sensitive: Sensitive::default(),
            alerts: None,
            counters: None,
        },
    )
    .recording()
}

fn bench(c: &mut Criterion) {
    let mut a = session();
    let mut facts = FactsCache::default();
    let lexed = lex(SELECT, Strings::Standard);
    // What the session state keeps with the prepared statement, and its portal runs.
    let prepared = a.on_client(
        &FrontendMessage::Parse {
            statement: "P0_1",
            sql: SELECT,
            param_types: vec![],
        },
        Some(&Analysis::of(&lexed)),
        &mut facts,
        None,
        None,
        None,
    );
    let portal = prepared.as_ref();
    c.bench_function(
        "audit: Bind + Execute + DataRow + CommandComplete -> record",
        |b| {
            b.iter(|| {
                a.on_client(
                    &FrontendMessage::Bind {
                        portal: "",
                        statement: "P0_1",
                        result_formats: Default::default(),
                    },
                    None,
                    &mut facts,
                    None,
                    None,
                    None,
                );
                a.on_client(
                    &FrontendMessage::Execute {
                        portal: "",
                        max_rows: 0,
                    },
                    None,
                    &mut facts,
                    None,
                    portal,
                    None,
                );
                a.on_client(&FrontendMessage::Sync, None, &mut facts, None, None, None);
                a.on_data_row();
                a.on_complete(Some("SELECT 1"), true);
                a.on_ready(pgveil::protocol::backend::TransactionStatus::Idle);
                black_box(a.take_completed())
            })
        },
    );
    let record = {
        a.on_client(
            &FrontendMessage::Execute {
                portal: "",
                max_rows: 0,
            },
            None,
            &mut facts,
            None,
            portal,
            None,
        );
        a.on_complete(Some("SELECT 1"), false);
        a.take_completed().pop().expect("a record")
    };
    let mut out = Vec::with_capacity(1024);
    c.bench_function("audit: chain hash + line of one record", |b| {
        b.iter(|| {
            out.clear();
            let h = chain_hash(GENESIS, black_box(&record));
            line(&record, GENESIS, &h, &mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
