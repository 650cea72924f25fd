//! Can a statement run for a masked session, and must its results be masked in flight?
//!
//! pgveil masks result columns in flight, by the origin (table OID, attribute number)
//! the server reports in RowDescription. That origin exists only for bare column
//! references in the outermost SELECT list (and `*` expansions of it), so those are the
//! only uses of a masked column this checker lets through (plus `searchable` columns in
//! the outermost WHERE). Every other use, in expressions, predicates, ORDER BY, subqueries,
//! CTEs, set operations, whole-row references, RETURNING, COPY, cursors, SQL PREPARE, views
//! over masked tables, functions that are not built in or that run SQL, is refused: what
//! cannot be proven safe does not run.

mod copy;
mod facts;
mod filter;
mod judge;
mod rewrite;
pub mod testing;

pub use copy::{ascii_safe_encoding, CopyFormat, CopyKind, CopyOut};
use facts::{Facts, Scope, TableRef};
use judge::check_masked;
use rewrite::{expand_copy_of_masked_table, inline_masked_views, substitute, Substitutions};

use std::collections::{HashMap, HashSet};

use sqlparser::ast::{Expr, SetExpr, Statement, Visit};

use crate::catalog::Catalog;
use crate::config::rules::{Origin, Unanalysable};
use crate::policy::filters::SessionFilters;
pub use crate::policy::Refusal;
use crate::policy::SessionMasks;
use crate::sql::analysis::{Analysed, Analysis};
use crate::sql::{fold, is_dangerous, kind_of, name_parts, Strings};

/// What the session knows when a statement arrives.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub masks: &'a SessionMasks,
    pub filters: &'a SessionFilters,
    pub search_path: &'a [String],
    pub temp_tables: &'a HashSet<String>,
    pub unanalysable: Unanalysable,
    /// Where `[settings]` is in the rules, if it is.
    pub settings: Option<&'a Origin>,
    /// How the session's server reads string literals now.
    pub strings: Strings,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Reads no masked table: forward as is.
    Pass,
    /// Reads masked columns only where in-flight masking covers them.
    Masked,
    /// Forward this SQL instead: masked columns outside in-flight reach are replaced by
    /// their masks computed in SQL.
    Rewritten(String),
    /// A `COPY (SELECT ...) TO STDOUT` (sent as `CopyOut::sql`) whose rows are masked in
    /// flight, from pgveil's own description of the inner query.
    CopyOut(std::sync::Arc<CopyOut>),
    Refused(Refusal),
}

/// Why a masked session's statement naming a relation pgveil's catalog does not have is
/// refused (the session reads the catalog again and tries once more, when it can).
pub const UNKNOWN_RELATION: &str = "the relation is unknown to pgveil's catalog";
/// Likewise for a masked column the catalog does not have (followed by its name).
pub const UNKNOWN_COLUMN: &str = "pgveil's catalog does not have column";

const STATS_VIEWS: [&str; 4] = [
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
];

/// Checks a whole query string; one refused statement refuses the string. Also returns
/// the tables the string creates, which the session's catalog does not know yet.
pub fn check(sql: &str, ctx: &Context<'_>) -> (Verdict, Vec<String>) {
    let lexed = crate::sql::lex::lex(sql, ctx.strings);
    check_analysed(sql, &Analysis::of(&lexed), ctx)
}

/// [`check`] of a text already read as the server reads it (under `ctx.strings`).
pub fn check_analysed(
    sql: &str,
    analysed: &Analysed<'_>,
    ctx: &Context<'_>,
) -> (Verdict, Vec<String>) {
    let (mut verdict, created) = check_string(sql, analysed, ctx);
    if let Verdict::Refused(r) = &mut verdict {
        if r.rule.is_none() {
            r.rule = refusal_rule(r, ctx);
        }
    }
    (verdict, created)
}

/// The rule behind a masking refusal that no single mask decided: the mask of the
/// table it names, or else the session's first mask (what subjects the session to the
/// analysis). A refusal under an explicit `unanalysable = "deny"` names `[settings]`.
fn refusal_rule(r: &Refusal, ctx: &Context<'_>) -> Option<Origin> {
    if r.kind == crate::policy::UNANALYSABLE {
        if let Some(o) = ctx.settings {
            return Some(o.clone());
        }
    }
    let table = r
        .table
        .split_once('.')
        .and_then(|(schema, name)| ctx.catalog.relation(schema, name))
        .map(|rel| rel.oid);
    ctx.masks.rule_for(table).cloned()
}

fn check_string(sql: &str, analysed: &Analysed<'_>, ctx: &Context<'_>) -> (Verdict, Vec<String>) {
    if ctx.masks.is_empty() && ctx.filters.is_empty() {
        return (Verdict::Pass, Vec::new());
    }
    // A rewrite is written with standard strings: only a session known to read them so
    // can be given one (a text without a backslash reads alike either way).
    if ctx.strings == Strings::Escaped && sql.contains('\\') {
        let reason = "standard_conforming_strings is off, so pgveil cannot read string literals as the server does";
        return (unanalysable(ctx, reason, analysed), Vec::new());
    }
    let mut statements = match analysed.as_ref().ok().and_then(Analysis::statements) {
        Some(s) => s,
        None => {
            return (
                unanalysable(ctx, "pgveil cannot analyse this statement", analysed),
                Vec::new(),
            )
        }
    };
    let mut verdict = Verdict::Pass;
    let mut created = Vec::new();
    let mut rewritten = false;
    // A COPY's rows are masked in flight only when it is sent on its own (pgveil sends
    // its description ahead of it).
    let alone = statements.len() == 1;
    let mut copy_format = None;
    for stmt in statements.iter_mut() {
        let expanded = expand_copy_of_masked_table(stmt, ctx) | inline_masked_views(stmt, ctx);
        let (v, subs) = check_statement(stmt, ctx, alone);
        match v {
            Verdict::Refused(r) => return (Verdict::Refused(r), Vec::new()),
            Verdict::Pass => {}
            _ => verdict = Verdict::Masked,
        }
        if alone && verdict != Verdict::Pass && copy::in_flight_query(stmt).is_some() {
            match copy::format_of(stmt) {
                Ok(f) => copy_format = Some(f),
                Err(reason) => {
                    let reason = format!("pgveil cannot mask the rows of this COPY: {reason}");
                    return (refuse(kind_of(stmt), "(copy)", reason, None), Vec::new());
                }
            }
        }
        if !subs.is_empty() {
            if let Err(r) = substitute(stmt, subs) {
                return (Verdict::Refused(r), Vec::new());
            }
            rewritten = true;
        }
        rewritten |= expanded;
        match filter::apply(stmt, ctx) {
            Ok(changed) => rewritten |= changed,
            Err(r) => return (Verdict::Refused(r), Vec::new()),
        }
        created.extend(created_table(stmt));
    }
    if rewritten || copy_format.is_some() {
        let sql: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
        let sql = sql.join(";\n");
        if ctx.strings != Strings::Standard && sql.contains('\\') {
            let reason = "standard_conforming_strings may be off, and the rewritten statement holds a backslash the server could read as an escape";
            return (unanalysable(ctx, reason, analysed), Vec::new());
        }
        // A COPY masked in flight is always sent as pgveil wrote it, so that the query it
        // describes is the very one the COPY runs.
        if let Some(format) = copy_format {
            let inner = statements
                .first()
                .and_then(copy::in_flight_query)
                .map(|q| q.to_string())
                .unwrap_or_default();
            let copy = CopyOut { sql, inner, format };
            return (Verdict::CopyOut(std::sync::Arc::new(copy)), created);
        }
        return (Verdict::Rewritten(sql), created);
    }
    (verdict, created)
}

/// A statement pgveil cannot analyse (`reason`): refused, or forwarded when the DBA chose
/// `unanalysable = "allow"` (in-flight masking still applies to its result rows). A COPY's
/// rows carry no column origins to mask them by, so a text that holds a COPY (or that
/// pgveil cannot even lex) is refused whatever the setting.
fn unanalysable(ctx: &Context<'_>, reason: &str, analysed: &Analysed<'_>) -> Verdict {
    let copies = analysed
        .as_ref()
        .map_or(true, |a| a.lexed().tokens.iter().any(|t| t.is_word("copy")));
    // In-flight masking still covers what "allow" forwards; nothing would filter its rows.
    if !ctx.filters.is_empty() {
        let reason = format!("{reason}, and a row filter applies to the session");
        return Verdict::Refused(Refusal::unanalysable(reason, None));
    }
    match ctx.unanalysable {
        Unanalysable::Allow if !copies => Verdict::Masked,
        Unanalysable::Allow => {
            let reason =
                format!("{reason}, and the rows of a COPY carry no column origins to mask them by");
            Verdict::Refused(Refusal::unanalysable(reason, None))
        }
        Unanalysable::Deny => Verdict::Refused(Refusal::unanalysable(reason.into(), None)),
    }
}

pub(super) fn refuse(
    kind: &'static str,
    table: impl Into<String>,
    reason: impl Into<String>,
    rule: Option<&Origin>,
) -> Verdict {
    Verdict::Refused(Refusal {
        kind,
        table: table.into(),
        reason: reason.into(),
        rule: rule.cloned(),
    })
}

/// `alone`: the statement is the only one of its string.
fn check_statement(stmt: &Statement, ctx: &Context<'_>, alone: bool) -> (Verdict, Substitutions) {
    let mut subs = Substitutions::default();
    let verdict = judge_statement(stmt, ctx, &mut subs, alone);
    (verdict, subs)
}

fn judge_statement(
    stmt: &Statement,
    ctx: &Context<'_>,
    subs: &mut Substitutions,
    alone: bool,
) -> Verdict {
    let kind = kind_of(stmt);
    let mut facts = Facts::default();
    let _ = stmt.visit(&mut facts);
    if let Statement::Copy {
        source: sqlparser::ast::CopySource::Table { table_name, .. },
        ..
    } = stmt
    {
        facts.tables.push(TableRef {
            addr: 0,
            parts: name_parts(table_name).unwrap_or_default(),
            alias: None,
            alias_columns: false,
            function: false,
            cte: false,
        });
    }
    // The target of an INSERT: what RETURNING and ON CONFLICT DO UPDATE read of it.
    if let Statement::Insert(i) = stmt {
        if let sqlparser::ast::TableObject::TableName(name) = &i.table {
            facts.tables.push(TableRef {
                addr: 0,
                parts: name_parts(name).unwrap_or_default(),
                alias: i.table_alias.as_ref().map(|a| fold(&a.alias)),
                alias_columns: false,
                function: false,
                cte: false,
            });
        }
    }
    let reads_all = reads_every_column(stmt, &facts);
    let mut scope = match check_functions(&facts, ctx, kind)
        .and_then(|()| resolve_tables(&facts, ctx, kind, reads_all))
    {
        Ok(scope) => scope,
        Err(refused) => return refused,
    };
    // EXCLUDED is the proposed row only in an INSERT's ON CONFLICT clause; anywhere else a
    // qualifier of that name is judged like any other.
    scope.excluded &= matches!(stmt, Statement::Insert(i) if i.on.is_some());
    if scope.masked.is_empty() {
        return Verdict::Pass;
    }
    let first = scope.masked[0].0.qualified();
    match check_masked(stmt, kind, &facts, &scope, &first, subs, alone) {
        Ok(()) => Verdict::Masked,
        Err(refused) => refused,
    }
}

/// Only built-in functions that neither run SQL nor read data behind the analysis may
/// run for a masked role (a user-defined function could read any masked table).
fn check_functions(facts: &Facts, ctx: &Context<'_>, kind: &'static str) -> Result<(), Verdict> {
    // `q.f` is `f(q)` when q has no column f: a user-defined function called in attribute
    // notation is a call too.
    for (_, parts, _) in facts.idents.iter().filter(|(_, p, _)| p.len() >= 2) {
        let name = parts[parts.len() - 1].as_str();
        if !ctx.catalog.is_user_function(name) {
            continue;
        }
        let qualifier = &parts[parts.len() - 2];
        let table = facts
            .tables
            .iter()
            .find(|t| t.alias.as_ref() == Some(qualifier) || t.parts.last() == Some(qualifier))
            .and_then(|t| t.parts.last())
            .unwrap_or(qualifier);
        let column = ctx
            .catalog
            .named(table)
            .any(|r| r.columns.iter().any(|c| c.name == name));
        if !column {
            return Err(refuse(
                kind,
                format!("function {name}"),
                "a function called in attribute notation (q.f is f(q)) may not run for a masked role unless it is built in",
                None,
            ));
        }
    }
    let calls = facts.functions.iter().map(|f| (f.as_slice(), false));
    let in_from = facts
        .tables
        .iter()
        .filter(|t| t.function)
        .map(|t| (t.parts.as_slice(), true));
    for (f, from) in calls.chain(in_from) {
        let name = f.last().map(String::as_str).unwrap_or("?");
        let function = format!("function {}", f.join("."));
        if is_dangerous(name) {
            return Err(refuse(
                kind,
                function,
                "it runs SQL or reads data pgveil cannot see",
                None,
            ));
        }
        if !crate::sql::guard::is_builtin_call(f, from, ctx.catalog) {
            return Err(refuse(
                kind,
                function,
                "only built-in functions may run for masked roles",
                None,
            ));
        }
    }
    Ok(())
}

/// Resolves every table reference as the server could (see `named` below) and collects
/// the masked ones; refuses what the catalog cannot place or what exposes values.
fn resolve_tables<'a>(
    facts: &Facts,
    ctx: &Context<'a>,
    kind: &'static str,
    reads_all: bool,
) -> Result<Scope<'a>, Verdict> {
    let mut scope = Scope {
        by_alias: HashMap::new(),
        excluded: false,
        masked: Vec::new(),
        masked_refs: Vec::new(),
        catalog: ctx.catalog,
    };
    for t in facts.tables.iter().filter(|t| !t.function) {
        let rel = match t.parts.as_slice() {
            _ if t.cte => continue,
            // A relation the session created is its own, unless the name could mean a
            // masked relation: the creation may have failed, or the search path may put
            // the masked one first, so such a name is always taken as the masked one.
            [name] if ctx.temp_tables.contains(name) && !masked_name(ctx, name) => continue,
            // A bare name may mean a masked table pgveil's catalog does not have yet.
            [name] if ctx.masks.pending_table(name, ctx.catalog).is_some() => None,
            // The session may change search_path in ways the analysis cannot follow: a
            // bare name that could mean a masked relation in any schema is taken as it.
            [name] => ctx
                .catalog
                .named(name)
                .find(|r| {
                    ctx.masks.of_table(r.oid).is_some()
                        || ctx.masks.view_reads_masked(r.oid).is_some()
                })
                .or_else(|| ctx.catalog.resolve(ctx.search_path, name)),
            [schema, name] | [_, schema, name] => ctx.catalog.relation(schema, name),
            _ => None,
        };
        let Some(rel) = rel else {
            if ctx.catalog.is_system_relation(&t.parts) {
                continue;
            }
            return Err(refuse(kind, t.parts.join("."), UNKNOWN_RELATION, None));
        };
        // Masked columns the catalog does not have yet: the statement may read one under
        // its name, or in every column of the table.
        let pending = ctx.masks.pending(&rel.schema, &rel.name);
        let named = |c: &str| {
            facts
                .idents
                .iter()
                .any(|(_, p, _)| p.last().is_some_and(|l| l == c))
        };
        if let Some((column, origin)) = pending.iter().find(|(c, _)| reads_all || named(c)) {
            let reason = format!("{UNKNOWN_COLUMN} {column}, which a mask rule names");
            return Err(refuse(kind, rel.qualified(), reason, Some(origin)));
        }
        if rel.schema == "pg_catalog" && STATS_VIEWS.contains(&rel.name.as_str()) {
            let reason = "catalog statistics expose column values";
            return Err(refuse(kind, rel.qualified(), reason, None));
        }
        if let Some(table) = ctx.masks.view_reads_masked(rel.oid) {
            let table = ctx
                .catalog
                .by_oid(table)
                .map(|t| t.qualified())
                .unwrap_or_default();
            let reason = format!("the view reads masked table {table}");
            return Err(refuse(kind, rel.qualified(), reason, None));
        }
        if let Some(cols) = ctx.masks.of_table(rel.oid) {
            if t.alias_columns {
                let reason = "column aliases on a masked table are not supported";
                return Err(refuse(kind, rel.qualified(), reason, None));
            }
            scope.masked.push((rel.clone(), cols));
            scope
                .masked_refs
                .push((t.addr, rel.clone(), t.alias.clone()));
        }
        let name = t.alias.clone().unwrap_or_else(|| rel.name.clone());
        scope.by_alias.entry(name).or_default().push(rel.clone());
    }
    // (Narrowed to INSERT ... ON CONFLICT by the caller.)
    scope.excluded = !scope.by_alias.contains_key("excluded");
    Ok(scope)
}

/// Whether a relation of this name anywhere in the catalog is masked or reads a masked
/// table, or a mask rule names a table of this name the catalog does not have yet.
fn masked_name(ctx: &Context<'_>, name: &str) -> bool {
    ctx.masks.pending_table(name, ctx.catalog).is_some()
        || ctx.catalog.named(name).any(|r| {
            ctx.masks.of_table(r.oid).is_some() || ctx.masks.view_reads_masked(r.oid).is_some()
        })
}

/// Whether the statement may read every column of a table it names (`*`, `t.*`, a
/// whole-row reference, `COPY t` without a column list, `RETURNING *`).
fn reads_every_column(stmt: &Statement, facts: &Facts) -> bool {
    let whole_row = facts.idents.iter().any(|(_, parts, _)| {
        parts.len() == 1
            && facts
                .tables
                .iter()
                .any(|t| t.alias.as_ref().or(t.parts.last()) == parts.first())
    });
    whole_row
        || !facts.wildcard_selects.is_empty()
        || facts.expr_wildcard
        || !facts.row_args.is_empty()
        || facts::returning_wildcard(stmt)
        || match stmt {
            Statement::Copy {
                source: sqlparser::ast::CopySource::Table { columns, .. },
                ..
            } => columns.is_empty(),
            _ => false,
        }
}

/// The name of a table a statement creates, for name resolution later in the session.
fn created_table(stmt: &Statement) -> Option<String> {
    match stmt {
        Statement::CreateTable(ct) => name_parts(&ct.name).and_then(|p| p.last().cloned()),
        Statement::Query(q) => match q.body.as_ref() {
            SetExpr::Select(s) => s
                .into
                .as_ref()
                .and_then(|i| i.targets.first())
                .and_then(|t| match t {
                    Expr::Identifier(i) => Some(fold(i)),
                    Expr::CompoundIdentifier(p) => p.last().map(fold),
                    _ => None,
                }),
            _ => None,
        },
        _ => None,
    }
}
