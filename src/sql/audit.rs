//! What an audit record says about a statement: its kind for reviewers, the relations it
//! names, and the column names it mentions (to tell which sensitive columns it read).
//! Unlike the masking and guard analyses this one decides nothing; a statement it cannot
//! parse is still recorded, as kind `other` and `unanalysed`.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, ObjectName, Query, SelectItem, SetExpr, Statement, TableFactor, Visit,
    Visitor,
};

use super::lex::{lex, Lexed, Strings, Token};
use super::scope::CteScope;

use super::{fold, name_parts};

/// The audit view of one statement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartFacts {
    pub kind: &'static str,
    /// Relations named (folded parts), CTE names left out.
    pub relations: BTreeSet<Vec<String>>,
    /// Column names mentioned anywhere (folded; the last part of a qualified name).
    pub columns: BTreeSet<String>,
    /// Every column of the named relations may be read: `*`, `t.*`, a whole-row
    /// reference, `COPY t` without a column list.
    pub all_columns: bool,
    pub unanalysed: bool,
    /// The cursor (DECLARE) or SQL prepared statement (PREPARE) this statement defines.
    pub defines: Option<String>,
    /// The cursor (FETCH, MOVE) or prepared statement (EXECUTE) it runs.
    pub uses: Option<String>,
}

impl PartFacts {
    /// A statement pgveil cannot parse: recorded as kind `other`, unanalysed.
    pub fn unanalysed() -> PartFacts {
        PartFacts {
            kind: "other",
            unanalysed: true,
            ..Default::default()
        }
    }
}

/// Analyses one statement read with standard_conforming_strings on.
pub fn analyse(sql: &str) -> PartFacts {
    match lex(sql, Strings::Standard) {
        Ok(lexed) => analyse_tokens(&lexed.tokens),
        Err(_) => PartFacts::unanalysed(),
    }
}

/// Analyses the server's tokens of one statement (a part from `Lexed::statements`).
pub fn analyse_tokens(tokens: &[Token<'_>]) -> PartFacts {
    match super::parse_tokens(tokens) {
        Ok(s) if s.len() == 1 => analyse_statement(Some(&s[0]), tokens),
        _ => PartFacts::unanalysed(),
    }
}

/// The facts of one parsed statement whose tokens are `tokens`, or of one pgveil cannot
/// parse (`None`).
pub fn analyse_statement(stmt: Option<&Statement>, tokens: &[Token<'_>]) -> PartFacts {
    let Some(stmt) = stmt else {
        return PartFacts::unanalysed();
    };
    // MOVE is read as the FETCH it is to the analysis (see `sql::parse_tokens`).
    let moves = tokens.first().is_some_and(|t| t.is_word("move"));
    let mut v = Collector::default();
    let _ = stmt.visit(&mut v);
    let mut facts = PartFacts {
        kind: if moves { "move" } else { kind(stmt) },
        columns: v.columns,
        all_columns: v.all_columns,
        ..Default::default()
    };
    // A bare identifier naming a table or alias is a whole-row reference.
    if facts.columns.iter().any(|c| v.aliases.contains(c)) {
        facts.all_columns = true;
    }
    facts.relations = v.relations;
    match stmt {
        Statement::Copy {
            source: CopySource::Table { columns, .. },
            ..
        } if columns.is_empty() => facts.all_columns = true,
        Statement::Declare { stmts } => {
            facts.defines = stmts.first().and_then(|d| d.names.first()).map(fold)
        }
        Statement::Fetch { name, .. } => facts.uses = Some(fold(name)),
        Statement::Prepare { name, .. } => facts.defines = Some(fold(name)),
        Statement::Execute { name: Some(n), .. } => facts.uses = name_parts(n).map(|p| p.join(".")),
        Statement::Insert(i) => facts.all_columns |= has_wildcard(i.returning.as_deref()),
        Statement::Update(u) => facts.all_columns |= has_wildcard(u.returning.as_deref()),
        Statement::Delete(d) => facts.all_columns |= has_wildcard(d.returning.as_deref()),
        _ => {}
    }
    facts
}

fn has_wildcard(items: Option<&[SelectItem]>) -> bool {
    items.is_some_and(|items| {
        items.iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        })
    })
}

/// The statement kind for audit records and metrics: DML by name, `copy`, `ddl` for
/// CREATE/ALTER/DROP/COMMENT, `transaction` for BEGIN/COMMIT/ROLLBACK/SAVEPOINT.
pub fn kind(stmt: &Statement) -> &'static str {
    match stmt {
        Statement::Copy { .. } => "copy",
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => "transaction",
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => "show",
        Statement::Comment { .. } => "ddl",
        Statement::Close { .. } => "close",
        Statement::Discard { .. } => "discard",
        Statement::Deallocate { .. } => "deallocate",
        other => match super::kind_of(other) {
            "create" | "alter" | "drop" => "ddl",
            "copy_to" | "copy_from" => "copy",
            k => k,
        },
    }
}

#[derive(Default)]
struct Collector {
    relations: BTreeSet<Vec<String>>,
    columns: BTreeSet<String>,
    /// Table names and aliases in FROM clauses.
    aliases: BTreeSet<String>,
    scope: CteScope,
    all_columns: bool,
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.scope.enter(q);
        self.note_wildcards(&q.body);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.scope.leave();
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
        if let Some(parts) = name_parts(r) {
            // A name that means a CTE where it stands is not a relation.
            if !self.scope.is_cte(&parts) {
                self.relations.insert(parts);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, alias, .. } = t {
            if let Some(last) = name_parts(name).and_then(|mut p| p.pop()) {
                self.aliases.insert(last);
            }
            if let Some(a) = alias {
                self.aliases.insert(fold(&a.name));
            }
        } else if let TableFactor::Derived { alias: Some(a), .. } = t {
            self.aliases.insert(fold(&a.name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(i) => {
                self.columns.insert(fold(i));
            }
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    self.columns.insert(fold(last));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Collector {
    fn note_wildcards(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(s) => self.all_columns |= has_wildcard(Some(&s.projection)),
            SetExpr::SetOperation { left, right, .. } => {
                self.note_wildcards(left);
                self.note_wildcards(right);
            }
            _ => {}
        }
    }
}

/// `statement` with its literals (strings of every kind, numbers) replaced by `?` and its
/// comments by a space: what the `redact` option writes, since people type customer data
/// into WHERE clauses. A string the lexer cannot read is replaced whole.
pub fn redact(sql: &str) -> String {
    match lex(sql, Strings::Standard) {
        Ok(lexed) => Lexed::redacted(sql, &lexed.tokens),
        Err(_) => UNREADABLE.into(),
    }
}

/// The audit text of a statement pgveil could not read to redact it.
pub const UNREADABLE: &str = "? (pgveil could not read this statement to redact its literals)";

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sql: &str) -> Vec<&str> {
        let lexed = lex(sql, Strings::Standard).unwrap();
        lexed.statements().into_iter().map(|r| &sql[r]).collect()
    }

    #[test]
    fn splits_where_the_server_does() {
        assert_eq!(split("SELECT 1"), vec!["SELECT 1"]);
        assert_eq!(
            split("SELECT ';'; SELECT $$a;b$$ ;\n-- x;\nSELECT \"a;\" ;;"),
            vec!["SELECT ';'", "SELECT $$a;b$$", "-- x;\nSELECT \"a;\""]
        );
        assert_eq!(split("  ; "), Vec::<&str>::new());
        assert_eq!(split("BEGIN;\n"), vec!["BEGIN"]);
        assert_eq!(split("SELECT ';' ;"), vec!["SELECT ';'"]);
        assert_eq!(
            split("SELECT 'é'; SELECT 2"),
            vec!["SELECT 'é'", "SELECT 2"]
        );
        assert_eq!(split("SELECT 1; -- done\n"), vec!["SELECT 1"]);
        assert_eq!(
            split("SELECT 1 -- c\r; DELETE FROM t"),
            vec!["SELECT 1 -- c", "DELETE FROM t"]
        );
    }

    #[test]
    fn relations_and_columns() {
        let f = analyse(
            "WITH x AS (SELECT id, phone FROM public.customers) SELECT c.email FROM x JOIN contacts c ON true",
        );
        assert_eq!(f.kind, "select");
        let rels: Vec<String> = f.relations.iter().map(|r| r.join(".")).collect();
        assert_eq!(rels, vec!["contacts", "public.customers"]);
        assert!(f.columns.contains("phone") && f.columns.contains("email"));
        assert!(!f.all_columns);
        assert!(analyse("SELECT c FROM customers c").all_columns);
        assert!(analyse("SELECT * FROM customers").all_columns);
        assert!(analyse("COPY customers TO STDOUT").all_columns);
        assert!(!analyse("COPY customers (id) TO STDOUT").all_columns);
        assert!(analyse("DELETE FROM customers RETURNING *").all_columns);
        assert_eq!(analyse("COPY customers TO STDOUT").kind, "copy");
        assert_eq!(analyse("create table t (a int)").kind, "ddl");
        assert_eq!(analyse("BEGIN").kind, "transaction");
        let bad = analyse("SELEC 1");
        assert!(bad.unanalysed && bad.kind == "other");
        assert_eq!(
            analyse("DECLARE c CURSOR FOR SELECT 1").defines.as_deref(),
            Some("c")
        );
        assert_eq!(analyse("FETCH 10 FROM c").uses.as_deref(), Some("c"));
        for (sql, kind) in [
            ("FETCH 10 c", "fetch"),
            ("fetch next \"C\"", "fetch"),
            ("FETCH c", "fetch"),
            ("MOVE ABSOLUTE 5 FROM c", "move"),
            ("MOVE FORWARD ALL IN c", "move"),
            ("MOVE c", "move"),
            // psycopg2's scroll(-1) and scroll(1, 'absolute').
            ("MOVE -1 FROM \"drivers_cursor\"", "move"),
            ("MOVE ABSOLUTE 1 FROM c", "move"),
            ("MOVE +2 IN c", "move"),
            ("FETCH -3 c", "fetch"),
            ("FETCH BACKWARD 2 FROM c", "fetch"),
        ] {
            let f = analyse(sql);
            assert!(!f.unanalysed, "{sql}");
            assert_eq!(f.kind, kind, "{sql}");
            assert!(f.uses.is_some(), "{sql}");
        }
        assert_eq!(analyse("EXECUTE p(1)").uses.as_deref(), Some("p"));
    }

    #[test]
    fn redacts_literals_and_comments() {
        assert_eq!(
            redact("SELECT * FROM customers WHERE phone = '13912345678' AND id > 42 /* Alice */"),
            "SELECT * FROM customers WHERE phone = ? AND id > ?"
        );
        assert_eq!(
            redact("SELECT E'a\\'b', $$x$$, \"Name\" FROM t WHERE x = $1"),
            "SELECT ?, ?, \"Name\" FROM t WHERE x = $1"
        );
    }
}
