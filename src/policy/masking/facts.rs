//! One walk over a statement's AST gathers what the masking checker needs (tables,
//! column-like references with their addresses, functions, wildcards, joins), and a
//! scope tells which references read masked columns.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, JoinConstraint, JoinOperator, Query,
    Select, SelectItem, TableFactor, TableWithJoins, Visitor,
};

use super::{fold, name_parts};
use crate::catalog::{Catalog, Relation};
use crate::policy::ColumnMask;
use crate::sql::scope::CteScope;

/// One table reference in FROM, UPDATE, DELETE or COPY.
pub(super) struct TableRef {
    /// Address of the TableFactor, to replace it when the table must be masked whole.
    pub(super) addr: usize,
    pub(super) parts: Vec<String>,
    pub(super) alias: Option<String>,
    pub(super) alias_columns: bool,
    pub(super) function: bool,
    /// The name means a CTE visible where the reference is.
    pub(super) cte: bool,
}

/// Everything the checker needs from one statement, gathered in one walk.
#[derive(Default)]
pub(super) struct Facts {
    pub(super) tables: Vec<TableRef>,
    pub(super) ctes: CteScope,
    /// Column-like references: (address of the Expr, its folded parts, its SQL).
    pub(super) idents: Vec<(usize, Vec<String>, String)>,
    pub(super) functions: Vec<Vec<String>>,
    /// `x.*` passed to a function (`row_to_json(c.*)`).
    pub(super) row_args: Vec<Vec<String>>,
    /// SELECTs (by address) that have `*` or `x.*` in their list.
    pub(super) wildcard_selects: Vec<usize>,
    pub(super) using_columns: Vec<String>,
    /// Field names after a dot in `(x).field`: names, not column references.
    pub(super) field_names: HashSet<usize>,
    pub(super) natural_join: bool,
    /// A bare `*` inside an expression: the whole row of every table in scope.
    pub(super) expr_wildcard: bool,
    pub(super) select_into: bool,
    /// How deep the walk is in statements (a data-modifying CTE's or a COPY's statement
    /// is one level down).
    statement_depth: usize,
    /// `RETURNING *` of a statement inside the statement (a data-modifying CTE, a COPY's
    /// UPDATE): its rows have no outermost SELECT to be masked in.
    pub(super) nested_returning_wildcard: bool,
}

/// The RETURNING list of an INSERT, UPDATE or DELETE.
pub(super) fn returning(stmt: &sqlparser::ast::Statement) -> Option<&[SelectItem]> {
    use sqlparser::ast::Statement;
    match stmt {
        Statement::Insert(i) => i.returning.as_deref(),
        Statement::Update(u) => u.returning.as_deref(),
        Statement::Delete(d) => d.returning.as_deref(),
        _ => None,
    }
}

/// Whether a statement returns `*` (or `t.*`).
pub(super) fn returning_wildcard(stmt: &sqlparser::ast::Statement) -> bool {
    returning(stmt).is_some_and(|items| {
        items.iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        })
    })
}

impl Visitor for Facts {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &sqlparser::ast::Statement) -> ControlFlow<()> {
        if self.statement_depth > 0 && returning_wildcard(s) {
            self.nested_returning_wildcard = true;
        }
        self.statement_depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &sqlparser::ast::Statement) -> ControlFlow<()> {
        self.statement_depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.ctes.enter(q);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.ctes.leave();
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        if s.projection.iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        }) {
            self.wildcard_selects.push(s as *const Select as usize);
        }
        if s.into.is_some() {
            self.select_into = true;
        }
        for twj in &s.from {
            self.joins(twj);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, alias, args, ..
        } = tf
        {
            let parts = name_parts(name).unwrap_or_default();
            self.tables.push(TableRef {
                addr: tf as *const TableFactor as usize,
                cte: args.is_none() && self.ctes.is_cte(&parts),
                parts,
                alias: alias.as_ref().map(|a| fold(&a.name)),
                alias_columns: alias.as_ref().is_some_and(|a| !a.columns.is_empty()),
                function: args.is_some(),
            });
        }
        if let TableFactor::NestedJoin {
            table_with_joins, ..
        } = tf
        {
            self.joins(table_with_joins);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        let addr = e as *const Expr as usize;
        if self.field_names.contains(&addr) {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::CompoundFieldAccess { access_chain, .. } => {
                for a in access_chain {
                    if let sqlparser::ast::AccessExpr::Dot(field) = a {
                        self.field_names.insert(field as *const Expr as usize);
                    }
                }
            }
            // `(c.*)` and `(*)` inside an expression are whole rows, not expansions.
            Expr::QualifiedWildcard(name, _) => {
                // Classified by the relation it names, as a whole-row reference.
                let relation = name_parts(name)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_else(|| "?".into());
                self.idents.push((addr, vec![relation], e.to_string()));
            }
            Expr::Wildcard(_) => self.expr_wildcard = true,
            Expr::Identifier(i) => self.idents.push((addr, vec![fold(i)], e.to_string())),
            Expr::CompoundIdentifier(parts) => {
                self.idents
                    .push((addr, parts.iter().map(fold).collect(), e.to_string()))
            }
            Expr::Function(f) => {
                self.functions
                    .push(name_parts(&f.name).unwrap_or_else(|| vec!["?".into()]));
                if let FunctionArguments::List(list) = &f.args {
                    for arg in &list.args {
                        let a = match arg {
                            FunctionArg::Unnamed(a)
                            | FunctionArg::Named { arg: a, .. }
                            | FunctionArg::ExprNamed { arg: a, .. } => a,
                        };
                        if let FunctionArgExpr::QualifiedWildcard(n) = a {
                            self.row_args.push(name_parts(n).unwrap_or_default());
                        }
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Facts {
    fn joins(&mut self, twj: &TableWithJoins) {
        for j in &twj.joins {
            let constraint = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c) => Some(c),
                _ => None,
            };
            match constraint {
                Some(JoinConstraint::Using(cols)) => {
                    for c in cols {
                        if let Some(p) = name_parts(c) {
                            self.using_columns.extend(p.last().cloned());
                        }
                    }
                }
                Some(JoinConstraint::Natural) => self.natural_join = true,
                _ => {}
            }
        }
    }
}

/// The masked columns of one table, by name.
pub(super) type TableMasks = HashMap<String, Arc<ColumnMask>>;

/// The statement's tables as the session's masks see them.
pub(super) struct Scope<'a> {
    /// Alias (or bare table name) → the relations it names somewhere in the statement
    /// (one name can mean different relations at different query levels).
    pub(super) by_alias: HashMap<String, Vec<Arc<Relation>>>,
    /// `excluded` in an `INSERT ... ON CONFLICT DO UPDATE` is the row proposed for
    /// insertion, the client's own values, unless a table in the statement is so named.
    pub(super) excluded: bool,
    pub(super) masked: Vec<(Arc<Relation>, &'a TableMasks)>,
    /// Each reference to a masked table: (TableFactor address, relation, alias).
    pub(super) masked_refs: Vec<(usize, Arc<Relation>, Option<String>)>,
    /// To tell a function called in attribute notation (`t.row_to_json` is
    /// `row_to_json(t)`, a whole row) from a column.
    pub(super) catalog: &'a Catalog,
}

impl<'a> Scope<'a> {
    pub(super) fn masked_column(&self, col: &str) -> Option<&'a Arc<ColumnMask>> {
        // A deny mask wins over any other mask on a column of the same name.
        let mut found: Option<&'a Arc<ColumnMask>> = None;
        for (_, cols) in &self.masked {
            if let Some(m) = cols.get(col) {
                if found.is_none() || m.is_deny() {
                    found = Some(m);
                }
            }
        }
        found
    }

    pub(super) fn masked_relation(&self, name: &str) -> Option<&Arc<Relation>> {
        self.by_alias
            .get(name)
            .and_then(|rels| {
                rels.iter()
                    .find(|r| self.masked.iter().any(|(m, _)| m.oid == r.oid))
            })
            .or_else(|| self.masked.iter().map(|(r, _)| r).find(|r| r.name == name))
    }

    pub(super) fn masks_of(&self, rel: &Relation) -> Option<&'a TableMasks> {
        self.masked
            .iter()
            .find(|(r, _)| r.oid == rel.oid)
            .map(|(_, m)| *m)
    }
}

/// How one column-like reference reads masked data.
pub(super) enum Use<'a> {
    Column(&'a Arc<ColumnMask>),
    WholeRow(String),
    None,
}

pub(super) fn classify<'a>(parts: &[String], scope: &Scope<'a>) -> Use<'a> {
    let col = parts.last().map(String::as_str).unwrap_or("");
    if parts.len() == 1 {
        if let Some(m) = scope.masked_column(col) {
            return Use::Column(m);
        }
        if let Some(r) = scope.masked_relation(col) {
            return Use::WholeRow(r.qualified());
        }
        return Use::None;
    }
    // `q.f` where q is a row and f a function is `f(q)`, the whole row, when no relation
    // q names has a column f (PostgreSQL tries the column first).
    let function = scope.catalog.is_builtin_function(col) || scope.catalog.is_user_function(col);
    // A qualifier that names a non-masked relation makes the reference safe; anything
    // else (a masked relation, schema.table, a composite column) is judged by name.
    if parts.len() == 2 {
        if let Some(rels) = scope.by_alias.get(&parts[0]) {
            // Masked if any relation the qualifier names in the statement masks it (a
            // deny mask first).
            let mut found: Option<&'a Arc<ColumnMask>> = None;
            for m in rels.iter().filter_map(|r| scope.masks_of(r)?.get(col)) {
                if found.is_none() || m.is_deny() {
                    found = Some(m);
                }
            }
            if let Some(m) = found {
                return Use::Column(m);
            }
            let called = function
                && rels
                    .iter()
                    .any(|r| !r.columns.iter().any(|c| c.name == col));
            return match rels.iter().find(|r| scope.masks_of(r).is_some()) {
                Some(r) if called => Use::WholeRow(r.qualified()),
                _ => Use::None,
            };
        }
        if scope.excluded && parts[0] == "excluded" {
            return Use::None;
        }
    }
    for p in &parts[..parts.len() - 1] {
        if let Some(m) = scope.masked_column(p) {
            return Use::Column(m);
        }
    }
    match scope.masked_column(col) {
        Some(m) => Use::Column(m),
        // A function called on a row pgveil cannot see into (a derived table, a CTE, a
        // table named with its schema): taken as a whole row of the masked tables.
        None if function => match scope.masked.first() {
            Some((r, _)) => Use::WholeRow(r.qualified()),
            None => Use::None,
        },
        None => Use::None,
    }
}
