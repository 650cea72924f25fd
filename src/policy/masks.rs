//! The masks that apply to one session: every `[[mask]]` rule whose `unmasked_for` names
//! none of the session's roles, resolved against the catalog to table OIDs, attribute
//! numbers and type classes. Built once per session; read on every RowDescription.

use std::collections::HashMap;
use std::sync::Arc;

use super::mask::{function_name, Masker};
use super::pgtypes::TypeClass;
use crate::catalog::Catalog;
use crate::config::rules::{ColumnRef, MaskFunction, MaskRule, Origin, Rules};
use crate::identity::SessionIdentity;

/// One masked column as this session sees it.
#[derive(Debug)]
pub struct ColumnMask {
    pub column: ColumnRef,
    pub function: &'static str,
    /// The rule's function, for its SQL form (`policy::sqlmask`).
    pub definition: MaskFunction,
    /// The column's type name, to cast a masked expression back to it.
    pub type_name: String,
    /// `None` for `deny`: any statement reading the column is refused.
    pub masker: Option<Masker>,
    pub class: TypeClass,
    pub searchable: bool,
    pub origin: Origin,
}

impl ColumnMask {
    pub fn is_deny(&self) -> bool {
        self.masker.is_none()
    }
}

/// Masks of one session, by table OID and column name, and by (table OID, attnum).
#[derive(Debug, Default)]
pub struct SessionMasks {
    by_table: HashMap<u32, HashMap<String, Arc<ColumnMask>>>,
    by_attr: HashMap<(u32, i16), Arc<ColumnMask>>,
    /// Views (by OID) that read a masked table, with the first such table.
    masked_views: HashMap<u32, u32>,
    /// Masked columns the catalog does not have (yet: a migration may create the table or
    /// add the column at any time), by `schema.table`, with the rule behind each. A
    /// session with such masks is masked even if no other mask resolved.
    pending: HashMap<(String, String), Vec<(String, Origin)>>,
    /// The query that finds whether anything `pending` names exists now (built once).
    pending_probe: Option<Arc<str>>,
}

/// Whether `rule` masks the column for a session with `identity`'s roles.
pub fn applies(rule: &MaskRule, identity: &SessionIdentity) -> bool {
    !identity.has_any_role(&rule.unmasked_for)
}

impl SessionMasks {
    pub fn build(rules: &Rules, identity: &SessionIdentity, catalog: &Catalog) -> SessionMasks {
        let mut masks = SessionMasks::default();
        for rule in rules.masks.iter().filter(|r| applies(r, identity)) {
            let c = &rule.column;
            let Some((rel, col)) = catalog
                .relation(&c.schema, &c.table)
                .and_then(|rel| rel.column(&c.column).map(|col| (rel, col)))
            else {
                masks
                    .pending
                    .entry((c.schema.clone(), c.table.clone()))
                    .or_default()
                    .push((c.column.clone(), rule.origin.clone()));
                continue;
            };
            let class = TypeClass::of(col.type_oid, &col.type_name);
            // A mask that cannot run on this type hides the column entirely.
            let masker = match Masker::new(&rule.function, class, &col.type_name) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        "mask {} at {}: {e}; the column is refused instead",
                        c,
                        rule.origin
                    );
                    None
                }
            };
            let mask = Arc::new(ColumnMask {
                column: c.clone(),
                function: if masker.is_none() {
                    "deny"
                } else {
                    function_name(&rule.function)
                },
                definition: if masker.is_none() {
                    MaskFunction::Deny
                } else {
                    rule.function.clone()
                },
                type_name: col.type_name.clone(),
                masker,
                class,
                searchable: rule.searchable,
                origin: rule.origin.clone(),
            });
            masks
                .by_table
                .entry(rel.oid)
                .or_default()
                .insert(col.name.clone(), mask.clone());
            masks.by_attr.insert((rel.oid, col.attnum), mask.clone());
            // Children and partitions hold the same data under other OIDs (and maybe other
            // attribute numbers): the mask follows the column by name.
            for child in catalog.descendants(rel.oid) {
                let Some(child_col) = catalog.by_oid(child).and_then(|r| r.column(&col.name))
                else {
                    continue;
                };
                masks
                    .by_table
                    .entry(child)
                    .or_default()
                    .insert(col.name.clone(), mask.clone());
                masks
                    .by_attr
                    .insert((child, child_col.attnum), mask.clone());
            }
        }
        for rel in catalog.relations() {
            if let Some(t) = rel.reads.iter().find(|t| masks.by_table.contains_key(t)) {
                masks.masked_views.insert(rel.oid, *t);
            }
        }
        masks.pending_probe = masks.probe_sql().map(Arc::from);
        masks
    }

    /// The probe for pending masks (see [`Self::pending_probe`]): one index lookup per
    /// masked column, the relation found by its qualified name (`to_regclass`, no lock,
    /// NULL when absent), so it costs the server next to nothing.
    fn probe_sql(&self) -> Option<String> {
        // E'' reads alike whatever standard_conforming_strings is.
        let quote = |s: &str| format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"));
        let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let conditions: Vec<String> = self
            .pending_columns()
            .map(|(schema, table, column)| {
                // Operators spelled out: the session's search_path may hold others.
                format!(
                    "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid \
                     OPERATOR(pg_catalog.=) pg_catalog.to_regclass({}) \
                     AND a.attname OPERATOR(pg_catalog.=) {} AND NOT a.attisdropped)",
                    quote(&format!("{}.{}", ident(schema), ident(table))),
                    quote(column)
                )
            })
            .collect();
        (!conditions.is_empty()).then(|| format!("SELECT 1 WHERE {}", conditions.join(" OR ")))
    }

    /// For masks the catalog does not have yet: a one-row query of pg_class and
    /// pg_attribute that finds whether any of them exists now. A table or column renamed
    /// into a masked name behind pgveil's back keeps its OID and attribute number (a view
    /// created earlier reads it under them): only its name tells.
    pub fn pending_probe(&self) -> Option<&Arc<str>> {
        self.pending_probe.as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.by_table.is_empty() && self.pending.is_empty()
    }

    /// Masked columns of `schema.table` the catalog does not have, with their rules.
    pub fn pending(&self, schema: &str, table: &str) -> &[(String, Origin)] {
        self.pending
            .get(&(schema.to_string(), table.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    /// Every masked column the catalog does not have, as (schema, table, column).
    pub fn pending_columns(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.pending.iter().flat_map(|((schema, table), cols)| {
            cols.iter()
                .map(move |(c, _)| (schema.as_str(), table.as_str(), c.as_str()))
        })
    }

    /// Whether a mask rule names a table called `name` (in any schema) that the catalog
    /// does not have: a bare name may mean it once it exists.
    pub fn pending_table(&self, name: &str, catalog: &Catalog) -> Option<&Origin> {
        self.pending
            .iter()
            .find(|((schema, table), _)| table == name && catalog.relation(schema, table).is_none())
            .and_then(|(_, cols)| cols.first().map(|(_, o)| o))
    }

    /// What the masks are, independent of build order: to tell whether a rules reload
    /// changed anything for a session.
    pub fn fingerprint(&self) -> Vec<(String, &'static str, bool)> {
        let mut out: Vec<_> = self
            .by_table
            .values()
            .flat_map(|cols| cols.values())
            .map(|m| (m.column.to_string(), m.function, m.searchable))
            .chain(self.pending.iter().flat_map(|((schema, table), cols)| {
                cols.iter()
                    .map(move |(c, _)| (format!("{schema}.{table}.{c}"), "pending", false))
            }))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The masked columns of a table, by name.
    pub fn of_table(&self, oid: u32) -> Option<&HashMap<String, Arc<ColumnMask>>> {
        self.by_table.get(&oid)
    }

    /// The mask of a result column whose origin is (table OID, attribute number).
    pub fn of_attr(&self, table_oid: u32, attnum: i16) -> Option<&Arc<ColumnMask>> {
        if table_oid == 0 {
            return None;
        }
        self.by_attr.get(&(table_oid, attnum))
    }

    /// The rule behind masking `table_oid` (its first mask in rule order), or, for
    /// another relation or none, the session's first mask rule: what a masking refusal
    /// names.
    pub fn rule_for(&self, table_oid: Option<u32>) -> Option<&Origin> {
        fn first(cols: &HashMap<String, Arc<ColumnMask>>) -> Option<&Origin> {
            cols.values()
                .map(|m| &m.origin)
                .min_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)))
        }
        table_oid
            .and_then(|oid| self.by_table.get(&oid))
            .and_then(first)
            .or_else(|| {
                self.by_table
                    .values()
                    .filter_map(first)
                    .chain(self.pending.values().flatten().map(|(_, o)| o))
                    .min_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)))
            })
    }

    /// For a view reading a masked table: that table's OID.
    pub fn view_reads_masked(&self, oid: u32) -> Option<u32> {
        self.masked_views.get(&oid).copied()
    }
}
