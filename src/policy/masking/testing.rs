//! A small CRM catalog and mask set, for property tests and the fuzz target of the
//! analysis (no database needed).

use std::collections::HashSet;

use super::Context;
use crate::catalog::testing::crm_catalog;
use crate::config::rules::{ColumnRef, MaskFunction, MaskRule, Origin, Rules, Unanalysable};
use crate::identity::SessionIdentity;
use crate::policy::SessionMasks;

/// Runs `f` with a masked session's context over the catalog of
/// `catalog::testing::crm_catalog`: phone `partial`, email `email`, card `tokenize`
/// (keyed).
pub fn crm_context<R>(f: impl FnOnce(&Context<'_>) -> R) -> R {
    std::env::set_var(
        "PGVEIL_TESTING_KEY",
        "a testing key of thirty-two bytes or more",
    );
    let catalog = crm_catalog();
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
    let filters = crate::policy::filters::SessionFilters::build(&rules, &identity, &catalog);
    let search_path = vec!["pg_catalog".to_string(), "public".to_string()];
    let temp = HashSet::new();
    let ctx = Context {
        catalog: &catalog,
        masks: &masks,
        filters: &filters,
        search_path: &search_path,
        temp_tables: &temp,
        unanalysable: Unanalysable::Deny,
        settings: None,
        strings: crate::sql::Strings::Standard,
    };
    f(&ctx)
}
