//! The in-flight maskers' cost per value (what a masked result or COPY pays per masked
//! column and row), and a COPY row's rewrite with four masked columns.
//!
//!     cargo bench --bench masks

use std::hint::black_box;

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use pgveil::config::rules::{ColumnRef, MaskFunction, Origin};
use pgveil::policy::mask::Masker;
use pgveil::policy::masking::{CopyFormat, CopyKind};
use pgveil::policy::pgtypes::TypeClass;
use pgveil::policy::ColumnMask;
use pgveil::session::copy_out::CopyRewriter;

fn masker(f: MaskFunction) -> Masker {
    Masker::new(&f, TypeClass::Text, "text")
        .expect("key")
        .expect("not deny")
}

fn bench(c: &mut Criterion) {
    std::env::set_var(
        "PGVEIL_BENCH_KEY",
        "a bench key of at least thirty-two bytes",
    );
    let key_env = "PGVEIL_BENCH_KEY".to_string();
    let cases = [
        (
            "tokenize",
            masker(MaskFunction::Tokenize {
                key_env: key_env.clone(),
            }),
            &b"4111000012345678"[..],
        ),
        (
            "hash",
            masker(MaskFunction::Hash { key_env }),
            b"user1@example.com",
        ),
        (
            "partial",
            masker(MaskFunction::Partial {
                keep_first: 3,
                keep_last: 4,
            }),
            b"13910007919",
        ),
        (
            "redact",
            masker(MaskFunction::Redact { replacement: None }),
            b"ID000104729",
        ),
    ];
    let mut out = Vec::with_capacity(128);
    for (name, m, value) in &cases {
        c.bench_function(&format!("mask: {name}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(m.apply(TypeClass::Text, false, black_box(value), &mut out));
            })
        });
    }
    // One COPY row of the benchmark's table (scripts/bench_copy.py), four columns masked.
    let column = |m: &Masker| {
        Some(Arc::new(ColumnMask {
            column: ColumnRef {
                schema: "public".into(),
                table: "people".into(),
                column: "c".into(),
            },
            function: "bench",
            definition: MaskFunction::Null,
            type_name: "text".into(),
            masker: Some(m.clone()),
            class: TypeClass::Text,
            searchable: false,
            origin: Origin {
                file: "bench.toml".into(),
                line: 1,
            },
        }))
    };
    let plan = vec![
        None,
        None,
        column(&cases[2].1),
        column(&cases[1].1),
        column(&cases[3].1),
        column(&cases[0].1),
        None,
    ];
    let format = |kind| CopyFormat {
        kind,
        delimiter: b'\t',
        null: b"\\N".to_vec(),
        quote: b'"',
        escape: b'"',
        header: false,
        encoding: None,
        force_quote: Vec::new(),
    };
    const NAMES: [&str; 7] = [
        "id",
        "name",
        "phone",
        "email",
        "national_id",
        "card",
        "balance",
    ];
    let text_row: &[u8] =
        b"1\tPerson 1\t13910007919\tuser1@example.com\tID000000001\t4111000000104729\t0.33\n";
    let mut rewriter = CopyRewriter::new(plan.clone(), &NAMES, format(CopyKind::Text));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    c.bench_function("copy: text row, 4 masked columns", |b| {
        b.iter(|| {
            buf.clear();
            rewriter.rewrite(black_box(text_row), &mut buf).unwrap();
        })
    });
    let mut binary_row = Vec::new();
    binary_row.extend_from_slice(&7i16.to_be_bytes());
    for field in text_row[..text_row.len() - 1].split(|b| *b == b'\t') {
        binary_row.extend_from_slice(&(field.len() as i32).to_be_bytes());
        binary_row.extend_from_slice(field);
    }
    let mut rewriter = CopyRewriter::new(plan, &NAMES, format(CopyKind::Binary));
    let mut header = b"PGCOPY\n\xff\r\n\0".to_vec();
    header.extend_from_slice(&[0; 8]);
    rewriter.rewrite(&header, &mut buf).unwrap();
    c.bench_function("copy: binary row, 4 masked columns", |b| {
        b.iter(|| {
            buf.clear();
            rewriter.rewrite(black_box(&binary_row), &mut buf).unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
