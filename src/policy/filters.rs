//! The row filters that apply to one session: every `[[filter]]` rule whose `roles` the
//! session holds and whose `unfiltered_for` it does not, resolved against the catalog to
//! table OIDs (partitions and children included). Several filters on one table combine
//! with OR. Built once per session, beside its masks.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::rules::{FilterRule, Origin, Rules};
use crate::identity::SessionIdentity;
use crate::predicate::Predicate;

/// The filter of one table for one session.
#[derive(Debug)]
pub struct TableFilter {
    /// Each applying rule's condition (rows are visible when any holds).
    pub conditions: Vec<(Predicate, Origin)>,
    /// Why the filter cannot be applied (a column it reads is missing, a child of the
    /// table is filtered and it is not): then the table is refused whole.
    pub broken: Option<String>,
    /// The rule a refusal names when `conditions` is empty.
    origin: Option<Origin>,
}

impl TableFilter {
    /// The condition as SQL over columns qualified by `qualifier`.
    pub fn sql(&self, qualifier: &str) -> String {
        let parts: Vec<String> = self
            .conditions
            .iter()
            .map(|(p, _)| p.sql(qualifier))
            .collect();
        match parts.len() {
            1 => parts.into_iter().next().unwrap_or_default(),
            _ => format!("({})", parts.join(" OR ")),
        }
    }

    /// The rule a refusal on this table names (the first in rule order).
    pub fn origin(&self) -> Option<&Origin> {
        self.conditions
            .first()
            .map(|(_, o)| o)
            .or(self.origin.as_ref())
    }

    /// Whether a new row is proven visible: some condition is only `column = value`
    /// conditions, and `writes(column, value)` says the row holds each such value.
    pub fn proven_by(&self, writes: impl Fn(&str, &Predicate) -> bool) -> bool {
        self.conditions.iter().any(|(p, _)| {
            p.required_values()
                .is_some_and(|req| req.iter().all(|(col, value)| writes(col, value)))
        })
    }

    /// Every column some condition reads.
    pub fn columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in self.conditions.iter().flat_map(|(p, _)| p.columns()) {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }
}

/// The filters of one session, by table OID; views that read a filtered table; filtered
/// tables the catalog does not have yet.
#[derive(Debug, Default)]
pub struct SessionFilters {
    by_table: HashMap<u32, Arc<TableFilter>>,
    /// Views and materialized views (by OID) that read a filtered table, with that table.
    views: HashMap<u32, u32>,
    /// `schema.table` of filters whose table the catalog lacks, with the rule.
    pending: Vec<(String, String, Origin)>,
}

/// Whether `rule` filters a session with `identity`'s roles.
pub fn applies(rule: &FilterRule, identity: &SessionIdentity) -> bool {
    identity.has_any_role(&rule.roles) && !identity.has_any_role(&rule.unfiltered_for)
}

impl SessionFilters {
    pub fn build(rules: &Rules, identity: &SessionIdentity, catalog: &Catalog) -> SessionFilters {
        let mut grouped: HashMap<u32, Vec<&FilterRule>> = HashMap::new();
        let mut filters = SessionFilters::default();
        for rule in rules.filters.iter().filter(|r| applies(r, identity)) {
            match catalog.relation(&rule.schema, &rule.table) {
                Some(rel) => grouped.entry(rel.oid).or_default().push(rule),
                None => filters.pending.push((
                    rule.schema.clone(),
                    rule.table.clone(),
                    rule.origin.clone(),
                )),
            }
        }
        for (oid, rules) in grouped {
            // Children and partitions hold rows of the table under their own OIDs.
            let tables = std::iter::once(oid).chain(catalog.descendants(oid));
            for table in tables.collect::<Vec<_>>() {
                let Some(rel) = catalog.by_oid(table) else {
                    continue;
                };
                let missing: Vec<&str> = rules
                    .iter()
                    .flat_map(|r| r.predicate.columns())
                    .filter(|c| rel.column(c).is_none())
                    .collect();
                let broken = (!missing.is_empty()).then(|| {
                    format!(
                        "{} has no column {} that its [[filter]] reads",
                        rel.qualified(),
                        missing.join(", ")
                    )
                });
                let conditions = rules
                    .iter()
                    .map(|r| (r.predicate.clone(), r.origin.clone()))
                    .collect();
                let filter = TableFilter {
                    conditions,
                    broken,
                    origin: None,
                };
                filters.by_table.insert(table, Arc::new(filter));
            }
        }
        if filters.by_table.is_empty() {
            return filters;
        }
        // A parent reads its children's rows: one whose child or partition is filtered
        // and that is not filtered itself cannot be read as a whole.
        let parents: Vec<(u32, String)> = catalog
            .relations()
            .filter(|r| matches!(r.kind, 'r' | 'p') && !filters.by_table.contains_key(&r.oid))
            .filter_map(|r| {
                let child = catalog
                    .descendants(r.oid)
                    .into_iter()
                    .find(|c| filters.by_table.contains_key(c))?;
                let child = catalog.by_oid(child)?.qualified();
                Some((r.oid, child))
            })
            .collect();
        for (parent, child) in parents {
            let origin = filters.by_table.values().find_map(|f| f.origin().cloned());
            let broken = format!("its child or partition {child} has a row filter that it lacks");
            let filter = TableFilter {
                conditions: Vec::new(),
                broken: Some(broken),
                origin,
            };
            filters.by_table.insert(parent, Arc::new(filter));
        }
        for rel in catalog.relations() {
            if let Some(t) = rel.reads.iter().find(|t| filters.by_table.contains_key(t)) {
                filters.views.insert(rel.oid, *t);
            }
        }
        filters
    }

    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty() && self.pending.is_empty()
    }

    /// The first filter rule of the session, in rule order: what a refusal that no one
    /// table decided names.
    pub fn any_origin(&self) -> Option<&Origin> {
        self.by_table
            .values()
            .filter_map(|f| f.origin())
            .chain(self.pending.iter().map(|(_, _, o)| o))
            .min_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)))
    }

    /// The filter of a table.
    pub fn of_table(&self, oid: u32) -> Option<&Arc<TableFilter>> {
        self.by_table.get(&oid)
    }

    /// For a view reading a filtered table: that table's OID.
    pub fn view_reads_filtered(&self, oid: u32) -> Option<u32> {
        self.views.get(&oid).copied()
    }

    /// The rule of a filter whose table the catalog does not have, by the table's name.
    pub fn pending_table(&self, name: &str, catalog: &Catalog) -> Option<&Origin> {
        self.pending
            .iter()
            .find(|(schema, table, _)| table == name && catalog.relation(schema, table).is_none())
            .map(|(_, _, o)| o)
    }

    /// The rule of a filter on `schema.table` the catalog does not have.
    pub fn pending(&self, schema: &str, table: &str) -> Option<&Origin> {
        self.pending
            .iter()
            .find(|(s, t, _)| s == schema && t == table)
            .map(|(_, _, o)| o)
    }

    /// What the filters are, independent of build order: to tell whether a rules reload
    /// changed anything for a session.
    pub fn fingerprint(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .by_table
            .iter()
            .map(|(oid, f)| format!("{oid}:{}", f.sql("t")))
            .chain(
                self.pending
                    .iter()
                    .map(|(s, t, o)| format!("pending {s}.{t} {o}")),
            )
            .collect();
        out.sort();
        out
    }
}
