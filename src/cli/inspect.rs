//! The review commands of spec section 1 that read rules and, optionally, a database:
//! `check` (rules against the live schema), `explain` (a dry run of one statement for a
//! role) and `token decode`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::catalog::{Catalog, CatalogRows, CATALOG_QUERY};
use crate::config::rules::{MaskFunction, Rules, Unanalysable};
use crate::identity::SessionIdentity;
use crate::policy::guard::GuardPolicy;
use crate::policy::mask::{self, decode_token};
use crate::policy::masking::Verdict;
use crate::policy::pgtypes::TypeClass;
use crate::policy::session_guard::SessionGuard;
use crate::policy::session_rules::SessionRuleSet;

pub use super::pgconn::connect;

async fn load_catalog(client: &tokio_postgres::Client) -> Result<Catalog, String> {
    let mut rows = CatalogRows::default();
    for msg in client
        .simple_query(CATALOG_QUERY)
        .await
        .map_err(|e| e.to_string())?
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
            let cols: Vec<Option<&[u8]>> =
                (0..r.len()).map(|i| r.get(i).map(str::as_bytes)).collect();
            rows.push(&cols);
        }
    }
    Ok(rows.finish())
}

/// A `[[filter]]` against the live schema: its table and columns exist, and the server
/// itself accepts its condition on that table (types and operators resolve).
async fn check_filter(
    client: &tokio_postgres::Client,
    catalog: &Catalog,
    f: &crate::config::rules::FilterRule,
) -> Vec<String> {
    let Some(rel) = catalog.relation(&f.schema, &f.table) else {
        return vec![format!(
            "{}: warning: table {} does not exist (yet): until it does, statements of filtered roles that name it are refused",
            f.origin,
            f.qualified()
        )];
    };
    let missing: Vec<&str> = f
        .predicate
        .columns()
        .into_iter()
        .filter(|c| rel.column(c).is_none())
        .collect();
    if !missing.is_empty() {
        return vec![format!(
            "{}: filter on {}: no column {} (statements of filtered roles on it are refused)",
            f.origin,
            f.qualified(),
            missing.join(", ")
        )];
    }
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let probe = format!(
        "EXPLAIN SELECT 1 FROM {}.{} AS \"pgveil_row_filter\" WHERE {}",
        quote(&rel.schema),
        quote(&rel.name),
        f.predicate.sql("pgveil_row_filter")
    );
    match client.simple_query(&probe).await {
        Ok(_) => Vec::new(),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            vec![format!(
                "{}: warning: filter on {}: the server could not be asked to plan its condition ({}): run check as a role that may read the table",
                f.origin,
                f.qualified(),
                e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
            )]
        }
        Err(e) => vec![format!(
            "{}: filter on {}: the server refuses {:?}: {}",
            f.origin,
            f.qualified(),
            f.condition,
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string())
        )],
    }
}

async fn role_names(client: &tokio_postgres::Client) -> Result<Vec<String>, String> {
    let rows = client
        .query("SELECT rolname::text FROM pg_catalog.pg_roles", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `pgveil check --upstream-url`: every problem on its own line with file:line.
pub async fn check_against_database(rules: &Rules, url: &str) -> Result<Vec<String>, String> {
    let client = connect(url).await?;
    let catalog = load_catalog(&client).await?;
    let roles = role_names(&client).await?;
    let mut out = Vec::new();
    let known_role = |r: &String| r == "*" || roles.contains(r);
    for m in &rules.masks {
        let c = &m.column;
        // A migration may create it later: the mask takes effect when it does.
        let later = "the mask takes effect once it does; until then, statements of masked roles that could read it are refused";
        let Some(rel) = catalog.relation(&c.schema, &c.table) else {
            out.push(format!(
                "{}: warning: table {}.{} does not exist (yet): {later}",
                m.origin, c.schema, c.table
            ));
            continue;
        };
        let Some(col) = rel.column(&c.column) else {
            out.push(format!(
                "{}: warning: column {} does not exist (yet): {later}",
                m.origin, c
            ));
            continue;
        };
        let class = TypeClass::of(col.type_oid, &col.type_name);
        if let Err(e) = mask::fits(&m.function, class, &col.type_name) {
            out.push(format!("{}: {c}: {e}", m.origin));
        }
        if let MaskFunction::Hash { key_env } | MaskFunction::Tokenize { key_env } = &m.function {
            if let Err(e) = mask::key_from_env(key_env) {
                out.push(format!("{}: {c}: {e}", m.origin));
            }
        }
        for r in m.unmasked_for.iter().filter(|r| !known_role(r)) {
            out.push(format!(
                "{}: role {r:?} in unmasked_for does not exist",
                m.origin
            ));
        }
        if m.searchable {
            out.push(format!(
                "{}: warning: {c} is searchable: predicates compare clear values, which lets a user infer them",
                m.origin
            ));
        }
    }
    for f in &rules.filters {
        out.extend(check_filter(&client, &catalog, f).await);
        if f.predicate.reads_setting() {
            out.push(format!(
                "{}: warning: filter on {} reads a pgveil.* setting, which the client sets (SET, startup options): it separates the rows of an application that sets it, never those of a user who sends their own SQL",
                f.origin,
                f.qualified()
            ));
        }
        for r in f
            .roles
            .iter()
            .chain(&f.unfiltered_for)
            .filter(|r| !known_role(r))
        {
            out.push(format!("{}: role {r:?} does not exist", f.origin));
        }
    }
    if let Some(origin) = &rules.settings.origin {
        for r in rules.settings.admin_roles.iter().filter(|r| !known_role(r)) {
            out.push(format!("{origin}: admin role {r:?} does not exist"));
        }
    }
    for a in &rules.allows {
        for r in a.roles.iter().filter(|r| !known_role(r)) {
            out.push(format!("{}: role {r:?} does not exist", a.origin));
        }
        for t in &a.tables {
            let matched = catalog
                .relations()
                .any(|rel| crate::policy::guard::glob_matches(t, &rel.qualified()));
            if !matched {
                out.push(format!(
                    "{}: warning: tables pattern {t:?} matches no table or view",
                    a.origin
                ));
            }
        }
    }
    if let Some(first) = rules.recycles.first() {
        let origin = &first.origin;
        let current = crate::trash::SCHEMA_VERSION;
        match crate::trash::installed_version(&client).await {
            Ok(Some(v)) if v < current => out.push(format!(
                "{origin}: warning: the recycle bin's schema is version {v}; run `pgveil trash init` to upgrade it to {current}"
            )),
            Ok(Some(v)) if v > current => out.push(format!(
                "{origin}: warning: the recycle bin was set up by a newer pgveil (schema version {v}; this one knows up to {current})"
            )),
            Ok(_) => {}
            Err(e) => out.push(format!(
                "{origin}: warning: the recycle bin's schema version cannot be read: {e}"
            )),
        }
    }
    for r in &rules.recycles {
        if catalog.relation(&r.schema, &r.table).is_none() {
            out.push(format!(
                "{}: table {}.{} does not exist",
                r.origin, r.schema, r.table
            ));
        } else if let Some(problem) = catalog.recycle_bin_problem(&r.schema, &r.table) {
            out.push(format!(
                "{}: warning: the recycle bin is not set up for {}.{} ({problem}): run `pgveil trash init`; until then pgveil refuses DELETE and TRUNCATE on it",
                r.origin, r.schema, r.table
            ));
        }
    }
    Ok(out)
}

/// `pgveil explain`: how `sql` would be treated for `role`.
pub async fn explain(
    rules: &Rules,
    role: &str,
    url: Option<&str>,
    sql: &str,
) -> Result<String, String> {
    let mut out = String::new();
    match crate::sql::parse(sql) {
        Ok(stmts) => {
            for s in &stmts {
                out.push_str(&format!("statement: {}\n", crate::sql::kind_of(s)));
            }
        }
        Err(e) => out.push_str(&format!("statement: cannot be parsed ({e})\n")),
    }
    let Some(url) = url else {
        out.push_str("masks: connect with --upstream-url to resolve tables, roles and masks\n");
        return Ok(out);
    };
    let client = connect(url).await?;
    let catalog = Arc::new(load_catalog(&client).await?);
    let rows = client
        .query(
            "WITH RECURSIVE m(oid) AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1 \
             UNION SELECT a.roleid FROM pg_catalog.pg_auth_members a JOIN m ON a.member = m.oid) \
             SELECT r.rolname::text FROM pg_catalog.pg_roles r JOIN m ON r.oid = m.oid",
            &[&role],
        )
        .await
        .map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Err(format!("role {role:?} does not exist"));
    }
    let mut roles: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    roles.sort();
    let role_refs: Vec<&str> = roles.iter().map(String::as_str).collect();
    let identity = SessionIdentity::offline(role, &role_refs, "pgveil explain");
    out.push_str(&format!("roles: {}\n", roles.join(", ")));
    let built = SessionRuleSet::build(rules, &identity, &catalog);
    for f in rules
        .filters
        .iter()
        .filter(|f| crate::policy::filters::applies(f, &identity))
    {
        out.push_str(&format!(
            "row filter: {} where {} ({})\n",
            f.qualified(),
            f.condition,
            f.origin
        ));
    }
    explain_guard(rules, &identity, built.guard, sql, &mut out);
    if out.contains("\ndecision: refused") {
        return Ok(out);
    }
    let verdict = match &built.masking {
        Some(policy) => policy.verdict(sql),
        None => Verdict::Pass,
    };
    match &verdict {
        Verdict::Refused(r) => {
            out.push_str(&format!(
                "decision: refused\nerror: 42501 {}\n",
                r.denied(role, sql).message
            ));
            return Ok(out);
        }
        Verdict::Pass => out.push_str("decision: forwarded (reads no masked column)\n"),
        Verdict::Masked => out.push_str("decision: forwarded, result columns masked in flight\n"),
        Verdict::Rewritten(ref sql) => {
            out.push_str("decision: rewritten, masked columns computed masked by the server and row filters applied\n");
            out.push_str(&format!("rewritten: {sql}\n"));
        }
        Verdict::CopyOut(ref copy) => {
            out.push_str("decision: forwarded, COPY rows masked in flight\n");
            out.push_str(&format!("rewritten: {}\n", copy.sql));
        }
    }
    let masks = built.masking.as_ref().map(|p| &p.masks);
    if masks.is_none() {
        out.push_str("masks: none apply to this role\n");
    }
    // Describe (no execution) tells where each result column comes from.
    let described = match &verdict {
        Verdict::Rewritten(s) => s.as_str(),
        // A COPY's rows are described by its inner query.
        Verdict::CopyOut(copy) => copy.inner.as_str(),
        _ => sql,
    };
    if let Ok(stmt) = client.prepare(described).await {
        for (i, c) in stmt.columns().iter().enumerate() {
            let mask = c
                .table_oid()
                .zip(c.column_id())
                .and_then(|(t, a)| masks?.of_attr(t, a));
            match mask {
                Some(m) => out.push_str(&format!(
                    "column {} {}: {} (rule {}, on {})\n",
                    i + 1,
                    c.name(),
                    m.function,
                    m.origin,
                    m.column
                )),
                None => out.push_str(&format!("column {} {}: none\n", i + 1, c.name())),
            }
        }
    }
    if rules.settings.unanalysable == Unanalysable::Allow {
        out.push_str(
            "note: unanalysable = \"allow\": statements pgveil cannot parse are forwarded\n",
        );
    }
    Ok(out)
}

/// The guard's part of `explain`: what the statement touches, and the guard's decision.
fn explain_guard(
    rules: &Rules,
    identity: &SessionIdentity,
    guard: Option<SessionGuard>,
    sql: &str,
    out: &mut String,
) {
    let mut facts = crate::sql::analysis::guard_facts(sql, crate::sql::Strings::Standard);
    for a in facts
        .accesses
        .iter()
        .filter(|a| a.kind != crate::config::rules::StatementKind::Select)
    {
        out.push_str(&format!("touches: {} {}\n", a.kind.as_str(), a.target));
    }
    let Some(mut guard) = guard else {
        let why = match GuardPolicy::for_session(rules, identity) {
            None => "every protected kind is allowed on every table",
            Some(_) => {
                "every protected kind is allowed on every table, and the recycle bin is in place"
            }
        };
        out.push_str(&format!("guard: none applies ({why})\n"));
        return;
    };
    if facts.unanalysable.is_none() {
        facts.unanalysable = crate::sql::guard::opaque_call(&facts.calls, &guard.catalog);
    }
    if let Some(reason) = &facts.unanalysable {
        out.push_str(&format!("analysis: impossible ({reason})\n"));
    }
    match guard.screen(sql, crate::sql::Strings::Standard) {
        Ok(()) => out.push_str("guard: allowed\n"),
        Err(denied) => out.push_str(&format!(
            "decision: refused\nerror: 42501 {}\n",
            denied.message
        )),
    }
}

/// `pgveil token decode`: one clear value per line, in the order of the tokens.
pub fn token_decode(key_env: &str, tokens: &[String]) -> ExitCode {
    // Any secret: tokens made before keys had a minimum length decode too.
    let key = match std::env::var(key_env) {
        Ok(k) if !k.is_empty() => k.into_bytes(),
        _ => {
            let e = mask::MaskError::MissingKey(key_env.into());
            eprintln!("pgveil token decode: {e}");
            return ExitCode::from(1);
        }
    };
    let mut failed = false;
    for t in tokens {
        match decode_token(&key, t) {
            Ok(clear) => println!("{}", String::from_utf8_lossy(&clear)),
            Err(e) => {
                eprintln!("{t}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Loads rules for a subcommand, printing problems as `check` does.
pub fn load_rules(path: &Path) -> Result<Rules, ExitCode> {
    Rules::load(path).map_err(|e| {
        for p in &e.problems {
            println!("{p}");
        }
        ExitCode::from(1)
    })
}
