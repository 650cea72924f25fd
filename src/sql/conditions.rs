//! Whether a statement's conditions could run on rows a row filter hides before the filter
//! does and leak them (through an error or a side effect), and spelling its comparisons
//! `OPERATOR(pg_catalog.…)` so that no search_path changes which code runs. SQL only: the
//! row filters themselves are `policy::masking::filter`'s.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, Query, SetExpr, Statement, TableFactor, Visit, VisitMut, Visitor,
    VisitorMut,
};

use crate::predicate::comparison;

/// Whether every condition of `stmt` is harmless: column references, constants,
/// parameters, comparisons, AND, OR, NOT, IS [NOT] NULL/TRUE/FALSE, EXISTS and scalar
/// subqueries. The outermost SELECT list and ORDER BY, an UPDATE's SET values and
/// RETURNING run only on rows every condition passed, and are not asked.
pub fn harmless(stmt: &Statement) -> bool {
    Harmless::of(stmt)
}

/// Writes every comparison of `stmt` as `(a OPERATOR(pg_catalog.op) b)`.
pub fn spell_comparisons(stmt: &mut Statement) {
    let _ = stmt.visit(&mut CatalogOperators);
}

/// Whether no condition of the statement could leak a hidden row before the filter runs.
struct Harmless {
    harmless: bool,
    /// Expressions computed only on rows every condition passed: the outermost SELECT
    /// list and ORDER BY, an UPDATE's SET values, RETURNING.
    exempt: HashSet<usize>,
    exempt_depth: usize,
    saved: Vec<usize>,
}

impl Harmless {
    fn of(stmt: &Statement) -> bool {
        let mut exempt = HashSet::new();
        let addr = |e: &Expr| e as *const Expr as usize;
        let mut returning = |r: &Option<Vec<sqlparser::ast::SelectItem>>| {
            for item in r.iter().flatten() {
                if let sqlparser::ast::SelectItem::UnnamedExpr(e)
                | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } = item
                {
                    exempt.insert(addr(e));
                }
            }
        };
        match stmt {
            Statement::Update(u) => {
                returning(&u.returning);
                for a in &u.assignments {
                    exempt.insert(addr(&a.value));
                }
            }
            Statement::Delete(d) => returning(&d.returning),
            Statement::Insert(i) => returning(&i.returning),
            _ => {}
        }
        if let Statement::Query(q) = stmt {
            if let SetExpr::Select(s) = q.body.as_ref() {
                for item in &s.projection {
                    if let sqlparser::ast::SelectItem::UnnamedExpr(e)
                    | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } = item
                    {
                        exempt.insert(addr(e));
                    }
                }
            }
            if let Some(o) = &q.order_by {
                if let sqlparser::ast::OrderByKind::Expressions(exprs) = &o.kind {
                    for e in exprs {
                        exempt.insert(addr(&e.expr));
                    }
                }
            }
        }
        let mut h = Harmless {
            harmless: true,
            exempt,
            exempt_depth: 0,
            saved: Vec::new(),
        };
        let _ = stmt.visit(&mut h);
        h.harmless
    }
}

impl Visitor for Harmless {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.saved.push(self.exempt_depth);
        self.exempt_depth = 0;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.exempt_depth = self.saved.pop().unwrap_or(0);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        // A function in FROM runs on its arguments, maybe a hidden row's columns.
        if matches!(tf, TableFactor::Table { args: Some(_), .. })
            || !matches!(
                tf,
                TableFactor::Table { .. }
                    | TableFactor::Derived { .. }
                    | TableFactor::NestedJoin { .. }
            )
        {
            self.harmless = false;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &sqlparser::ast::Select) -> ControlFlow<()> {
        use sqlparser::ast::{JoinConstraint, JoinOperator as J};
        for t in &s.from {
            for j in &t.joins {
                let c = match &j.join_operator {
                    J::Join(c)
                    | J::Inner(c)
                    | J::Left(c)
                    | J::LeftOuter(c)
                    | J::Right(c)
                    | J::RightOuter(c)
                    | J::FullOuter(c)
                    | J::CrossJoin(c) => c,
                    _ => {
                        self.harmless = false;
                        return ControlFlow::Break(());
                    }
                };
                // USING and NATURAL compare with `=` as the search_path finds it.
                if matches!(c, JoinConstraint::Using(_) | JoinConstraint::Natural) {
                    self.harmless = false;
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.exempt.contains(&(e as *const Expr as usize)) {
            self.exempt_depth += 1;
        }
        if self.exempt_depth > 0 {
            return ControlFlow::Continue(());
        }
        let ok = match e {
            Expr::Identifier(_)
            | Expr::CompoundIdentifier(_)
            | Expr::Value(_)
            | Expr::Nested(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsNotTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsNotFalse(_)
            | Expr::Exists { .. }
            | Expr::Subquery(_) => true,
            Expr::UnaryOp { op, .. } => matches!(op, sqlparser::ast::UnaryOperator::Not),
            Expr::BinaryOp { op, .. } => {
                matches!(op, BinaryOperator::And | BinaryOperator::Or) || comparison(op).is_some()
            }
            _ => false,
        };
        if !ok {
            self.harmless = false;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.exempt.contains(&(e as *const Expr as usize)) {
            self.exempt_depth = self.exempt_depth.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }
}

/// Spells every comparison `OPERATOR(pg_catalog.…)`: the session's search_path may hold
/// operators of the same name that would run on hidden rows.
struct CatalogOperators;

impl VisitorMut for CatalogOperators {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::BinaryOp { left, op, right } = e {
            if let Some(name) = comparison(op) {
                *op =
                    BinaryOperator::PGCustomBinaryOperator(vec!["pg_catalog".into(), name.into()]);
                // OPERATOR(...) binds like any other operator, tighter than `=`: in
                // `a = b || c` each side must stay whole, and so must the comparison.
                for side in [left, right] {
                    if !matches!(
                        side.as_ref(),
                        Expr::Identifier(_)
                            | Expr::CompoundIdentifier(_)
                            | Expr::Value(_)
                            | Expr::Nested(_)
                    ) {
                        let inner = std::mem::replace(
                            side.as_mut(),
                            Expr::Value(sqlparser::ast::Value::Null.into()),
                        );
                        **side = Expr::Nested(Box::new(inner));
                    }
                }
                let inner = std::mem::replace(e, Expr::Value(sqlparser::ast::Value::Null.into()));
                *e = Expr::Nested(Box::new(inner));
            }
        }
        ControlFlow::Continue(())
    }
}
