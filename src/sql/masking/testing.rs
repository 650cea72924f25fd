//! A small CRM catalog and mask set, for property tests and the fuzz target of the
//! analysis (no database needed).

use std::collections::HashSet;

use super::Context;
use crate::catalog::CatalogRows;
use crate::config::rules::{ColumnRef, MaskFunction, MaskRule, Origin, Rules, Unanalysable};
use crate::policy::SessionMasks;
use crate::session::identity::SessionIdentity;

/// (column name, attribute number, type OID).
type ColumnSpec<'a> = (&'a str, &'a str, &'a str);
/// (table name, OID, columns).
type TableSpec<'a> = (&'a str, u32, &'a [ColumnSpec<'a>]);

/// Runs `f` with a masked session's context over `customers(id, name, phone, email,
/// card)` and `deals(id, customer_id, amount)`: phone `partial`, email `email`, card
/// `tokenize` (keyed).
pub fn crm_context<R>(f: impl FnOnce(&Context<'_>) -> R) -> R {
    std::env::set_var("PGVEIL_TESTING_KEY", "k");
    let mut rows = CatalogRows::default();
    let cols: [TableSpec<'_>; 2] = [
        (
            "customers",
            100,
            &[
                ("id", "1", "20"),
                ("name", "2", "25"),
                ("phone", "3", "25"),
                ("email", "4", "25"),
                ("card", "5", "25"),
            ],
        ),
        (
            "deals",
            200,
            &[
                ("id", "1", "20"),
                ("customer_id", "2", "20"),
                ("amount", "3", "1700"),
            ],
        ),
    ];
    for (table, oid, columns) in cols {
        for (name, attnum, ty) in columns {
            let type_name = match *ty {
                "20" => "int8",
                "1700" => "numeric",
                _ => "text",
            };
            let oid = oid.to_string();
            let row: Vec<&str> = vec!["c", "public", table, &oid, "r", name, attnum, ty, type_name];
            rows.push(&row.iter().map(|s| Some(s.as_bytes())).collect::<Vec<_>>());
        }
    }
    for b in [
        "upper",
        "lower",
        "substr",
        "length",
        "count",
        "sum",
        "string_agg",
        "row_to_json",
        "concat",
        "now",
    ] {
        rows.push(&[
            Some(b"b".as_slice()),
            Some(b"pg_catalog".as_slice()),
            Some(b.as_bytes()),
        ]);
    }
    let catalog = rows.finish();
    let origin = Origin {
        file: "t.toml".into(),
        line: 1,
    };
    let rule = |column: &str, function: MaskFunction| MaskRule {
        column: ColumnRef {
            schema: "public".into(),
            table: "customers".into(),
            column: column.into(),
        },
        function,
        unmasked_for: vec![],
        searchable: false,
        origin: origin.clone(),
    };
    let rules = Rules {
        masks: vec![
            rule(
                "phone",
                MaskFunction::Partial {
                    keep_first: 3,
                    keep_last: 4,
                },
            ),
            rule("email", MaskFunction::Email),
            rule(
                "card",
                MaskFunction::Tokenize {
                    key_env: "PGVEIL_TESTING_KEY".into(),
                },
            ),
        ],
        ..Default::default()
    };
    let identity = SessionIdentity::offline("alice", &[], "");
    let masks = SessionMasks::build(&rules, &identity, &catalog);
    let search_path = vec!["pg_catalog".to_string(), "public".to_string()];
    let temp = HashSet::new();
    let ctx = Context {
        catalog: &catalog,
        masks: &masks,
        search_path: &search_path,
        temp_tables: &temp,
        unanalysable: Unanalysable::Deny,
        settings: None,
        strings: crate::sql::Strings::Standard,
    };
    f(&ctx)
}
