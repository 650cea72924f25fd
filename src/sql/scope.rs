//! Which `WITH` names a table reference can mean, query level by query level, as
//! PostgreSQL resolves them: a CTE is visible in the body of its own query and in the
//! queries nested there, in the CTEs after it, and in itself only under `WITH RECURSIVE`.
//! A name outside that reach is a relation, however many CTEs elsewhere in the statement
//! share it.
//!
//! Every analysis that walks a statement with a `Visitor` keeps one [`CteScope`]: it calls
//! [`CteScope::enter`] from `pre_visit_query` and [`CteScope::leave`] from
//! `post_visit_query`, and asks [`CteScope::is_cte`] about each table reference.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use sqlparser::ast::Query;

use super::fold;

#[derive(Debug, Default)]
pub struct CteScope {
    /// The names visible in each query level being walked, innermost last.
    stack: Vec<Rc<HashSet<String>>>,
    /// What a CTE's own query sees, by the query's address, set when its WITH is entered.
    assigned: HashMap<usize, Rc<HashSet<String>>>,
}

impl CteScope {
    /// A query level begins (its WITH, if any, not walked yet).
    pub fn enter(&mut self, q: &Query) {
        let addr = q as *const Query as usize;
        let base = self
            .assigned
            .remove(&addr)
            .or_else(|| self.stack.last().cloned())
            .unwrap_or_default();
        let Some(with) = &q.with else {
            self.stack.push(base);
            return;
        };
        let names: Vec<String> = with
            .cte_tables
            .iter()
            .map(|c| fold(&c.alias.name))
            .collect();
        for (i, cte) in with.cte_tables.iter().enumerate() {
            let reach = if with.recursive { names.len() } else { i };
            let mut seen = (*base).clone();
            seen.extend(names[..reach].iter().cloned());
            self.assigned
                .insert(&*cte.query as *const Query as usize, Rc::new(seen));
        }
        let mut body = (*base).clone();
        body.extend(names);
        self.stack.push(Rc::new(body));
    }

    /// The query level entered last ends.
    pub fn leave(&mut self) {
        self.stack.pop();
    }

    /// Whether a table reference with these folded name parts means a CTE here.
    pub fn is_cte(&self, parts: &[String]) -> bool {
        match parts {
            [name] => self.stack.last().is_some_and(|s| s.contains(name)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use sqlparser::ast::{Query, TableFactor, Visit, Visitor};

    use super::*;
    use crate::sql::name_parts;

    /// Each table reference of a statement, in order, and whether it means a CTE.
    #[derive(Default)]
    struct Refs {
        scope: CteScope,
        seen: Vec<(String, bool)>,
    }

    impl Visitor for Refs {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            self.scope.enter(q);
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.scope.leave();
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table { name, .. } = tf {
                let parts = name_parts(name).unwrap();
                self.seen.push((parts.join("."), self.scope.is_cte(&parts)));
            }
            ControlFlow::Continue(())
        }
    }

    fn refs(sql: &str) -> Vec<(String, bool)> {
        let stmts = crate::sql::parse(sql).unwrap();
        let mut r = Refs::default();
        let _ = stmts[0].visit(&mut r);
        r.seen
    }

    fn r(name: &str, cte: bool) -> (String, bool) {
        (name.to_string(), cte)
    }

    #[test]
    fn ctes_are_seen_where_postgres_sees_them() {
        // A CTE's own body and the CTEs before it do not see it.
        assert_eq!(
            refs("WITH customers AS (SELECT * FROM customers) SELECT * FROM customers"),
            vec![r("customers", false), r("customers", true)]
        );
        assert_eq!(
            refs("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b"),
            vec![r("b", false), r("a", true), r("b", true)]
        );
        // A CTE of a nested query is not visible outside it.
        assert_eq!(
            refs("SELECT * FROM customers WHERE EXISTS (WITH customers AS (SELECT 1) SELECT * FROM customers)"),
            vec![r("customers", false), r("customers", true)]
        );
        // ... and an outer one is visible in nested queries.
        assert_eq!(
            refs("WITH t AS (SELECT 1) SELECT * FROM (SELECT * FROM t) s, public.t"),
            vec![r("t", true), r("public.t", false)]
        );
        assert_eq!(
            refs("WITH RECURSIVE t AS (SELECT 1 UNION ALL SELECT * FROM t) SELECT * FROM t"),
            vec![r("t", true), r("t", true)]
        );
    }
}
