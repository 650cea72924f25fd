//! Rewrites that let the server compute on masked values: column references replaced by
//! their SQL masks, masked tables by masking derived tables, views by their definitions,
//! and `COPY table TO` by `COPY (SELECT ...) TO`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{Expr, Select, SelectItem, Statement, TableFactor};

use sqlparser::ast::{CopySource, Ident, TableAlias, VisitMut, VisitorMut};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{fold, kind_of, name_parts};
use crate::catalog::Relation;
use crate::policy::sqlmask;

use super::facts::TableMasks;
use super::{Context, Refusal};

/// `COPY t TO ...` of a masked or filtered table becomes `COPY (SELECT <its columns> FROM t) TO ...`,
/// which the analysis then masks column by column (COPY output has no RowDescription for
/// in-flight masking). Returns whether the statement changed.
pub(super) fn expand_copy_of_masked_table(stmt: &mut Statement, ctx: &Context<'_>) -> bool {
    let Statement::Copy {
        source: source @ CopySource::Table { .. },
        to: true,
        ..
    } = stmt
    else {
        return false;
    };
    let CopySource::Table {
        table_name,
        columns,
    } = &*source
    else {
        return false;
    };
    let Some(parts) = name_parts(table_name) else {
        return false;
    };
    let hidden = |oid| ctx.masks.of_table(oid).is_some() || ctx.filters.of_table(oid).is_some();
    let rel = match parts.as_slice() {
        [name] => ctx
            .catalog
            .named(name)
            .find(|r| hidden(r.oid))
            .or_else(|| ctx.catalog.resolve(ctx.search_path, name)),
        [schema, name] | [_, schema, name] => ctx.catalog.relation(schema, name),
        _ => None,
    };
    let Some(rel) = rel.filter(|r| hidden(r.oid)) else {
        return false;
    };
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let cols: Vec<String> = if columns.is_empty() {
        rel.columns.iter().map(|c| quote(&c.name)).collect()
    } else {
        columns.iter().map(|c| quote(&fold(c))).collect()
    };
    let select = format!(
        "SELECT {} FROM {}.{}",
        cols.join(", "),
        quote(&rel.schema),
        quote(&rel.name)
    );
    match Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&select)
        .and_then(|mut p| p.parse_query())
    {
        Ok(query) => {
            *source = CopySource::Query(query);
            true
        }
        Err(_) => false,
    }
}

/// Views that read a masked or filtered table are replaced by their definitions (as derived tables
/// under the view's name), so that the masked columns inside are seen, and masked, like
/// any other use. Returns whether the statement changed. Materialized views are left
/// alone: their rows were computed in clear when refreshed, and stay refused.
pub(super) fn inline_masked_views(stmt: &mut Statement, ctx: &Context<'_>) -> bool {
    struct Inline<'a, 'b> {
        ctx: &'b Context<'a>,
        changed: bool,
        /// The targets of writes (by address): a definition cannot stand there, so the
        /// view stays, for the checks to refuse.
        targets: std::collections::HashSet<usize>,
    }
    impl VisitorMut for Inline<'_, '_> {
        type Break = ();
        fn pre_visit_statement(&mut self, stmt: &mut Statement) -> ControlFlow<()> {
            let addr = |tf: &TableFactor| tf as *const TableFactor as usize;
            match stmt {
                Statement::Update(u) => {
                    self.targets.insert(addr(&u.table.relation));
                }
                Statement::Delete(d) => {
                    let (sqlparser::ast::FromTable::WithFromKeyword(from)
                    | sqlparser::ast::FromTable::WithoutKeyword(from)) = &d.from;
                    self.targets.extend(from.iter().map(|t| addr(&t.relation)));
                }
                Statement::Merge(m) => {
                    self.targets.insert(addr(&m.table));
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
            if self.targets.contains(&(tf as *const TableFactor as usize)) {
                return ControlFlow::Continue(());
            }
            let TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } = tf
            else {
                return ControlFlow::Continue(());
            };
            let Some(parts) = name_parts(name) else {
                return ControlFlow::Continue(());
            };
            let masked_view = |r: &&Arc<Relation>| {
                r.kind == 'v'
                    && (self.ctx.masks.view_reads_masked(r.oid).is_some()
                        || self.ctx.filters.view_reads_filtered(r.oid).is_some())
            };
            let rel = match parts.as_slice() {
                [n] => self.ctx.catalog.named(n).find(masked_view).cloned(),
                [schema, n] | [_, schema, n] => self
                    .ctx
                    .catalog
                    .relation(schema, n)
                    .filter(masked_view)
                    .cloned(),
                _ => None,
            };
            let Some((rel, def)) = rel.and_then(|r| r.definition.clone().map(|d| (r, d))) else {
                return ControlFlow::Continue(());
            };
            let Ok(subquery) = Parser::new(&PostgreSqlDialect {})
                .with_recursion_limit(64)
                .try_with_sql(&def)
                .and_then(|mut p| p.parse_query())
            else {
                return ControlFlow::Continue(());
            };
            let alias = alias.clone().unwrap_or_else(|| TableAlias {
                explicit: true,
                name: Ident::with_quote('"', rel.name.clone()),
                columns: Vec::new(),
                at: None,
            });
            *tf = TableFactor::Derived {
                lateral: false,
                subquery,
                alias: Some(alias),
                sample: None,
            };
            self.changed = true;
            ControlFlow::Continue(())
        }
    }
    let mut changed = false;
    // Views over views: a few rounds, each inlining one level.
    for _ in 0..8 {
        let mut inline = Inline {
            ctx,
            changed: false,
            targets: Default::default(),
        };
        let _ = stmt.visit(&mut inline);
        if !inline.changed {
            break;
        }
        changed = true;
    }
    changed
}

/// A masked column reference to replace by its SQL mask; `name` keeps the output column's
/// name when the reference is a whole SELECT list item.
pub(super) struct Substitution {
    pub(super) sql: String,
    pub(super) name: String,
}

/// What to replace in one statement: column references by their SQL masks, and (for
/// whole-row uses) masked tables by derived tables that mask every column.
#[derive(Default)]
pub(super) struct Substitutions {
    pub(super) exprs: HashMap<usize, Substitution>,
    /// TableFactor address → (the masking SELECT, the name the table is referred to by).
    pub(super) tables: HashMap<usize, (String, String)>,
}

impl Substitutions {
    pub(super) fn is_empty(&self) -> bool {
        self.exprs.is_empty() && self.tables.is_empty()
    }
}

/// Replaces the referenced expressions (by address, from the analysis of this very tree).
pub(super) fn substitute(stmt: &mut Statement, subs: Substitutions) -> Result<(), Refusal> {
    struct Apply {
        subs: HashMap<usize, Substitution>,
        tables: HashMap<usize, (String, String)>,
        failed: Option<String>,
    }
    impl Apply {
        fn parsed(&mut self, sql: &str) -> Option<Expr> {
            match Parser::new(&PostgreSqlDialect {})
                .try_with_sql(sql)
                .and_then(|mut p| p.parse_expr())
            {
                Ok(e) => Some(e),
                Err(e) => {
                    self.failed = Some(e.to_string());
                    None
                }
            }
        }
    }
    impl VisitorMut for Apply {
        type Break = ();
        fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
            let addr = tf as *const TableFactor as usize;
            let Some((sql, name)) = self.tables.remove(&addr) else {
                return ControlFlow::Continue(());
            };
            let alias = match tf {
                TableFactor::Table { alias: Some(a), .. } => a.clone(),
                _ => TableAlias {
                    explicit: true,
                    name: Ident::with_quote('"', name),
                    columns: Vec::new(),
                    at: None,
                },
            };
            match Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&sql)
                .and_then(|mut p| p.parse_query())
            {
                Ok(subquery) => {
                    *tf = TableFactor::Derived {
                        lateral: false,
                        subquery,
                        alias: Some(alias),
                        sample: None,
                    }
                }
                Err(e) => self.failed = Some(e.to_string()),
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_select(&mut self, s: &mut Select) -> ControlFlow<()> {
            for item in s.projection.iter_mut() {
                if let SelectItem::UnnamedExpr(e) = item {
                    let addr = e as *const Expr as usize;
                    if let Some(sub) = self.subs.remove(&addr) {
                        if let Some(expr) = self.parsed(&sub.sql) {
                            *item = SelectItem::ExprWithAlias {
                                expr,
                                alias: Ident::with_quote('"', sub.name),
                            };
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            let addr = e as *const Expr as usize;
            if let Some(sub) = self.subs.remove(&addr) {
                if let Some(expr) = self.parsed(&sub.sql) {
                    *e = Expr::Nested(Box::new(expr));
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut apply = Apply {
        subs: subs.exprs,
        tables: subs.tables,
        failed: None,
    };
    let _ = stmt.visit(&mut apply);
    match (
        apply.failed,
        apply.subs.is_empty() && apply.tables.is_empty(),
    ) {
        (None, true) => Ok(()),
        // Every planned replacement must have happened, or the statement is not safe.
        (failed, _) => Err(Refusal {
            kind: kind_of(stmt),
            table: "(rewrite)".into(),
            reason: format!(
                "pgveil could not rewrite the statement safely{}",
                failed.map(|f| format!(": {f}")).unwrap_or_default()
            ),
            rule: None,
        }),
    }
}

/// `SELECT <every column, masked ones as their SQL masks> FROM schema.table`.
pub(super) fn masking_select(rel: &Relation, masks: Option<&TableMasks>) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let cols: Vec<String> =
        rel.columns
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                match masks.and_then(|m| m.get(&c.name)).and_then(|m| {
                    sqlmask::mask_sql(&m.definition, &q, &m.type_name, m.class.is_text())
                }) {
                    Some(masked) => format!("{masked} AS {q}"),
                    None => q,
                }
            })
            .collect();
    format!(
        "SELECT {} FROM {}.{}",
        cols.join(", "),
        quote(&rel.schema),
        quote(&rel.name)
    )
}
