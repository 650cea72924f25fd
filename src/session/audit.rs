//! The audit side of a session: every statement the client sends becomes an in-flight
//! entry, paired with the server's replies in order (CommandComplete, EmptyQuery,
//! PortalSuspended, FunctionCallResponse, ErrorResponse, ReadyForQuery), and ends as one
//! record. Completed records are handed to the writer before the relay releases the
//! reply that completed them (see `relay::server_to_client`), so no client sees a result
//! whose record could still be lost. Rows of masked tables also feed `[[alert]]` windows.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;

use super::identity::SessionIdentity;
use super::state::Name;
use crate::audit::record::timestamp;
use crate::audit::{AuditLog, Decision, Event, Record};
use crate::catalog::Catalog;
use crate::config::rules::{AlertAction, Rules};
use crate::metrics::Metrics;
use crate::policy::Denied;
use crate::protocol::frontend::{FrontendMessage, Target};
use crate::sql::audit::{analyse, redact, split, PartFacts};
use crate::sql::shape::shape;
use crate::watch::{AlertWatch, Fired};

/// Facts kept per session; past this the cache starts over.
const CACHE: usize = 1024;

/// Who the records are about (fixed for the session).
#[derive(Debug, Clone)]
pub struct Who {
    pub session: u64,
    pub user: String,
    pub database: String,
    pub client_addr: String,
    pub application_name: String,
}

impl Who {
    pub fn of(identity: &SessionIdentity) -> Who {
        Who {
            session: identity.session_id,
            user: identity.user.clone(),
            database: identity.database.clone(),
            client_addr: identity.client_addr.to_string(),
            application_name: identity.application_name.clone(),
        }
    }

    /// Before authentication: what the StartupMessage claims.
    pub fn before_auth(
        session: u64,
        message: &crate::protocol::startup::StartupMessage,
        client_addr: std::net::SocketAddr,
    ) -> Who {
        let param = |k: &str| message.param(k).unwrap_or_default().to_string();
        let user = param("user");
        let database = match message.param("database") {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => user.clone(),
        };
        Who {
            session,
            user,
            database,
            client_addr: client_addr.to_string(),
            application_name: param("application_name"),
        }
    }

    /// A session event record (connect, disconnect, auth failure, alert ...).
    pub fn event(&self, event: Event, message: Option<&str>, rule: Option<&str>) -> Vec<u8> {
        Record {
            application_name: &self.application_name,
            client_addr: &self.client_addr,
            database: &self.database,
            event: Some(event),
            message,
            rule,
            session: self.session,
            ts: timestamp(OffsetDateTime::now_utc()),
            user: &self.user,
            ..Default::default()
        }
        .canonical()
    }
}

/// Sensitive columns (those any mask rule names), by `schema.table`, with whether this
/// session reads each in clear.
#[derive(Debug, Default)]
pub struct Sensitive {
    by_table: HashMap<String, Vec<(String, String, bool)>>,
    /// Views, by `schema.table`, and the tables they read.
    views: HashMap<String, Vec<String>>,
}

impl Sensitive {
    pub fn build(
        rules: &Rules,
        identity: &SessionIdentity,
        catalog: Option<&Catalog>,
    ) -> Sensitive {
        let mut s = Sensitive::default();
        for rule in &rules.masks {
            let c = &rule.column;
            let table = format!("{}.{}", c.schema, c.table);
            let clear = !crate::policy::masks::applies(rule, identity);
            let cols = s.by_table.entry(table.clone()).or_default();
            match cols.iter_mut().find(|(name, _, _)| *name == c.column) {
                // Masked if any rule masks it for this session.
                Some(existing) => existing.2 &= clear,
                None => cols.push((c.column.clone(), format!("{table}.{}", c.column), clear)),
            }
        }
        if let Some(catalog) = catalog {
            for rel in catalog.relations().filter(|r| !r.reads.is_empty()) {
                let reads: Vec<String> = rel
                    .reads
                    .iter()
                    .filter_map(|oid| catalog.by_oid(*oid))
                    .map(|r| r.qualified())
                    .filter(|q| s.by_table.contains_key(q))
                    .collect();
                if !reads.is_empty() {
                    s.views.insert(rel.qualified(), reads);
                }
            }
        }
        s
    }

    fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }
}

/// A statement's facts as this session's records state them.
#[derive(Debug, Default)]
struct Facts {
    kind: &'static str,
    tables: Vec<String>,
    masked: Vec<String>,
    clear: Vec<String>,
    /// Reads a table with sensitive columns (counts toward alerts).
    sensitive_table: bool,
    unanalysed: bool,
    defines: Option<String>,
    uses: Option<String>,
}

/// A statement waiting for its outcome.
#[derive(Debug)]
struct InFlight {
    text: Arc<str>,
    facts: Arc<Facts>,
    protocol: &'static str,
    ts: OffsetDateTime,
    started: Instant,
    blocked: Option<Denied>,
    rows: u64,
}

#[derive(Debug)]
enum Slot {
    Statement(InFlight),
    /// The ReadyForQuery of a Query, Sync or FunctionCall.
    End,
}

#[derive(Debug, Clone)]
struct Prepared {
    text: Arc<str>,
    facts: Arc<Facts>,
}

pub struct SessionAudit {
    log: Option<Arc<AuditLog>>,
    metrics: Arc<Metrics>,
    pub who: Who,
    redact: bool,
    catalog: Option<Arc<Catalog>>,
    search_path: Vec<String>,
    sensitive: Sensitive,
    alerts: Option<AlertWatch>,
    cache: HashMap<Box<str>, Arc<Facts>>,
    scratch: String,
    /// Cursors and SQL prepared statements, by name.
    named: HashMap<String, Arc<Facts>>,
    statements: HashMap<Name, Prepared>,
    portals: HashMap<Name, Prepared>,
    slots: VecDeque<Slot>,
    /// The refused Parse or Execute whose refusal the server has yet to raise.
    refused_parse: Option<InFlight>,
    completed: Vec<Vec<u8>>,
}

/// How a session's audit is set up.
pub struct AuditSetup {
    pub log: Option<Arc<AuditLog>>,
    pub metrics: Arc<Metrics>,
    pub redact: bool,
    pub catalog: Option<Arc<Catalog>>,
    pub search_path: Vec<String>,
    pub sensitive: Sensitive,
    pub alerts: Option<AlertWatch>,
}

impl SessionAudit {
    pub fn new(who: Who, setup: AuditSetup) -> SessionAudit {
        SessionAudit {
            log: setup.log,
            metrics: setup.metrics,
            who,
            redact: setup.redact,
            catalog: setup.catalog,
            search_path: setup.search_path,
            sensitive: setup.sensitive,
            alerts: setup.alerts,
            cache: HashMap::new(),
            scratch: String::new(),
            named: HashMap::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            slots: VecDeque::new(),
            refused_parse: None,
            completed: Vec::new(),
        }
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_deref()
    }

    /// The session is ending: statements still waiting for the server did not finish.
    pub fn abandon(&mut self) {
        while let Some(slot) = self.slots.pop_front() {
            if let Slot::Statement(f) = slot {
                self.finish(
                    f,
                    None,
                    None,
                    Some("the session ended before the statement completed"),
                );
            }
        }
    }

    pub fn log(&self) -> Option<&Arc<AuditLog>> {
        self.log.as_ref()
    }

    /// After a rules reload: new sensitive columns and alert rules.
    pub fn replace_rules(&mut self, sensitive: Sensitive, alerts: Option<AlertWatch>) {
        self.sensitive = sensitive;
        self.alerts = alerts;
        self.cache.clear();
    }

    /// Whether an alert rule may refuse this session's statements.
    pub fn may_block(&self) -> bool {
        self.alerts.is_some()
    }

    /// Records the client's message; `refusal` when pgveil refused it.
    pub fn on_client(&mut self, msg: &FrontendMessage<'_>, refusal: Option<&Denied>) {
        match msg {
            FrontendMessage::Query { sql } => {
                for (text, facts) in self.parts(sql) {
                    let f = self.in_flight(text, facts, "simple", refusal.cloned());
                    self.slots.push_back(Slot::Statement(f));
                }
                self.slots.push_back(Slot::End);
            }
            FrontendMessage::Parse { statement, sql, .. } => {
                let (text, facts) = self.whole(sql);
                if refusal.is_some() {
                    self.refused_parse =
                        Some(self.in_flight(text, facts, "extended", refusal.cloned()));
                } else {
                    self.statements
                        .insert(Name::new(statement), Prepared { text, facts });
                }
            }
            FrontendMessage::Bind {
                portal, statement, ..
            } => {
                if let Some(p) = self.statements.get(*statement).cloned() {
                    self.portals.insert(Name::new(portal), p);
                }
            }
            FrontendMessage::Execute { portal, .. } => {
                let p = self
                    .portals
                    .get(*portal)
                    .cloned()
                    .unwrap_or_else(|| Prepared {
                        text: Arc::from(""),
                        facts: Arc::new(Facts {
                            kind: "other",
                            unanalysed: true,
                            ..Default::default()
                        }),
                    });
                let f = self.in_flight(p.text, p.facts, "extended", refusal.cloned());
                if refusal.is_some() {
                    self.refused_parse = Some(f);
                } else {
                    self.slots.push_back(Slot::Statement(f));
                }
            }
            FrontendMessage::Close { target, name } => {
                match target {
                    Target::Statement => self.statements.remove(*name),
                    Target::Portal => self.portals.remove(*name),
                };
            }
            FrontendMessage::Sync => self.slots.push_back(Slot::End),
            FrontendMessage::FunctionCall => {
                let facts = Arc::new(Facts {
                    kind: "function_call",
                    unanalysed: true,
                    ..Default::default()
                });
                let f = self.in_flight(Arc::from(""), facts, "fast_path", refusal.cloned());
                self.slots.push_back(Slot::Statement(f));
                self.slots.push_back(Slot::End);
            }
            _ => {}
        }
    }

    /// CopyInResponse: the server ignores the `ignored` Syncs sent after the COPY (see
    /// `SessionState::on_copy_in`), so their ends go.
    pub fn on_copy_in(&mut self, ignored: usize) {
        for _ in 0..ignored {
            let Some(i) = self
                .slots
                .iter()
                .skip(1)
                .position(|s| matches!(s, Slot::End))
            else {
                break;
            };
            self.slots.remove(i + 1);
        }
    }

    /// pgveil is having the server raise the refusal of the Parse refused last.
    pub fn on_refusal_raised(&mut self) {
        if let Some(f) = self.refused_parse.take() {
            self.slots.push_back(Slot::Statement(f));
        }
    }

    /// For `block` alerts: the refusal of a statement that reads a masked table while the
    /// user's window is over its limit.
    pub fn alert_block(&mut self, sql: &str) -> Option<Denied> {
        self.alerts.as_ref()?;
        let parts = self.parts(sql);
        let (_, facts) = parts.iter().find(|(_, f)| f.sensitive_table)?;
        self.alert_refusal(facts)
    }

    /// [`Self::alert_block`] for the Execute of a portal.
    pub fn alert_block_portal(&mut self, portal: &str) -> Option<Denied> {
        self.alerts.as_ref()?;
        let facts = self.portals.get(portal)?.facts.clone();
        if !facts.sensitive_table {
            return None;
        }
        self.alert_refusal(&facts)
    }

    fn alert_refusal(&self, facts: &Facts) -> Option<Denied> {
        let (rule, limit) = self.alerts.as_ref()?.blocked()?;
        let table = facts
            .tables
            .iter()
            .find(|t| {
                self.sensitive.by_table.contains_key(*t) || self.sensitive.views.contains_key(*t)
            })
            .cloned()
            .unwrap_or_default();
        Some(Denied {
            message: format!(
                "pgveil: {} on {table} is not allowed for role \"{}\": alert {rule} (more than {limit} rows of masked tables a minute) blocks reads of masked tables until the window clears",
                facts.kind.to_uppercase(),
                self.who.user
            ),
            rule: Some(rule),
        })
    }

    /// A DataRow of the statement at the front.
    pub fn on_data_row(&mut self) {
        if let Some(Slot::Statement(f)) = self.slots.front_mut() {
            f.rows += 1;
        }
    }

    /// CommandComplete (`tag`), EmptyQueryResponse, PortalSuspended or
    /// FunctionCallResponse (`None`): the statement at the front is done.
    pub fn on_complete(&mut self, tag: Option<&str>) {
        if !matches!(self.slots.front(), Some(Slot::Statement(_))) {
            return;
        }
        let Some(Slot::Statement(f)) = self.slots.pop_front() else {
            return;
        };
        let rows = tag.and_then(rows_of_tag).unwrap_or(f.rows);
        self.finish(f, Some(rows), None, None);
    }

    /// ErrorResponse: the statement at the front failed, and the server skips the rest
    /// of the query string or batch.
    pub fn on_error(&mut self, sqlstate: &str) {
        let mut first = true;
        while let Some(Slot::Statement(_)) = self.slots.front() {
            let Some(Slot::Statement(f)) = self.slots.pop_front() else {
                break;
            };
            let note = (!first).then_some("not run: an earlier statement of the same batch failed");
            self.finish(f, None, Some(sqlstate), note);
            first = false;
        }
    }

    /// ReadyForQuery: whatever is still open in this query or batch did not run.
    pub fn on_ready(&mut self) {
        while let Some(slot) = self.slots.pop_front() {
            match slot {
                Slot::End => break,
                Slot::Statement(f) => self.finish(f, None, None, Some("not run")),
            }
        }
    }

    /// Records completed since the last call, to be written before the reply that
    /// completed them reaches the client.
    pub fn take_completed(&mut self) -> Vec<Vec<u8>> {
        self.metrics.audit_records(self.completed.len() as u64);
        std::mem::take(&mut self.completed)
    }

    pub fn has_completed(&self) -> bool {
        !self.completed.is_empty()
    }

    fn finish(
        &mut self,
        f: InFlight,
        rows: Option<u64>,
        sqlstate: Option<&str>,
        note: Option<&str>,
    ) {
        let decision = if f.blocked.is_some() {
            Decision::Blocked
        } else if sqlstate.is_some() || note.is_some() {
            Decision::Error
        } else if !f.facts.masked.is_empty() {
            Decision::Masked
        } else {
            Decision::Allowed
        };
        let elapsed = f.started.elapsed();
        let rows = rows.filter(|_| decision != Decision::Blocked);
        self.metrics
            .statement(f.facts.kind, decision.as_str(), elapsed);
        if let Some(b) = &f.blocked {
            self.metrics
                .refusal(b.rule.as_deref().unwrap_or("settings"));
        }
        if decision == Decision::Masked {
            self.metrics.rows_masked(rows.unwrap_or(0));
        }
        let message = match (&f.blocked, note) {
            (Some(b), _) => Some(b.message.as_str()),
            (None, n) => n,
        };
        if self.log.is_some() {
            let record = Record {
                application_name: &self.who.application_name,
                client_addr: &self.who.client_addr,
                database: &self.who.database,
                decision: Some(decision),
                duration_us: Some(elapsed.as_micros() as u64),
                event: Some(Event::Statement),
                kind: Some(f.facts.kind),
                masked_columns: Some(&f.facts.masked),
                message,
                protocol: Some(f.protocol),
                rows,
                rule: f.blocked.as_ref().and_then(|b| b.rule.as_deref()),
                session: self.who.session,
                sqlstate: if f.blocked.is_some() {
                    Some("42501")
                } else {
                    sqlstate
                },
                statement: Some(&f.text),
                tables: Some(&f.facts.tables),
                ts: timestamp(f.ts),
                unanalysed: f.facts.unanalysed,
                unmasked_columns: Some(&f.facts.clear),
                user: &self.who.user,
            };
            self.completed.push(record.canonical());
        }
        if f.facts.sensitive_table && decision != Decision::Blocked {
            if let Some(rows) = rows.filter(|n| *n > 0) {
                self.count_alert_rows(rows);
            }
        }
    }

    fn count_alert_rows(&mut self, rows: u64) {
        let Some(watch) = &self.alerts else { return };
        for Fired {
            rule,
            limit,
            rows: total,
            action,
        } in watch.read_rows(rows)
        {
            let action = match action {
                AlertAction::Block => "block",
                AlertAction::Log => "log",
            };
            let message = format!(
                "user \"{}\" read {total} rows of masked tables in the last minute (limit {limit}); action {action}",
                self.who.user
            );
            tracing::warn!(rule = %rule, "alert: {message}");
            self.metrics.alert(&rule, action);
            if self.log.is_some() {
                let record = self.who.event(Event::Alert, Some(&message), Some(&rule));
                self.completed.push(record);
            }
        }
    }

    fn in_flight(
        &self,
        text: Arc<str>,
        facts: Arc<Facts>,
        protocol: &'static str,
        blocked: Option<Denied>,
    ) -> InFlight {
        InFlight {
            text,
            facts,
            protocol,
            ts: OffsetDateTime::now_utc(),
            started: Instant::now(),
            blocked,
            rows: 0,
        }
    }

    /// A Parse's statement text and facts (the whole string: the server refuses a
    /// prepared statement with more than one command).
    fn whole(&mut self, sql: &str) -> (Arc<str>, Arc<Facts>) {
        let facts = self.facts_of(sql.trim());
        (self.text_of(sql.trim()), facts)
    }

    /// The statements of a query string, each with its text and facts.
    fn parts(&mut self, sql: &str) -> Vec<(Arc<str>, Arc<Facts>)> {
        split(sql)
            .into_iter()
            .map(|part| {
                let facts = self.facts_of(part);
                (self.text_of(part), facts)
            })
            .collect()
    }

    fn text_of(&self, sql: &str) -> Arc<str> {
        if self.redact {
            Arc::from(redact(sql))
        } else {
            Arc::from(sql)
        }
    }

    fn facts_of(&mut self, part: &str) -> Arc<Facts> {
        let shaped = shape(part, &mut self.scratch);
        let facts = match self.cache.get(self.scratch.as_str()).filter(|_| shaped) {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(self.resolve(analyse(part)));
                if shaped {
                    if self.cache.len() >= CACHE {
                        self.cache.clear();
                    }
                    self.cache
                        .insert(Box::from(self.scratch.as_str()), f.clone());
                }
                f
            }
        };
        // Cursors and SQL prepared statements carry their query's facts to FETCH/EXECUTE.
        if let Some(name) = &facts.defines {
            self.named.insert(name.clone(), facts.clone());
        }
        if let Some(used) = facts.uses.as_ref().and_then(|n| self.named.get(n)) {
            let mut inherited = Facts {
                kind: facts.kind,
                tables: used.tables.clone(),
                masked: used.masked.clone(),
                clear: used.clear.clone(),
                sensitive_table: used.sensitive_table,
                unanalysed: used.unanalysed,
                defines: None,
                uses: None,
            };
            inherited.unanalysed |= facts.unanalysed;
            return Arc::new(inherited);
        }
        facts
    }

    /// Names resolved to `schema.table`, and the sensitive columns the statement reads.
    fn resolve(&self, part: PartFacts) -> Facts {
        let tables: BTreeSet<String> = part
            .relations
            .iter()
            .map(|parts| self.qualify(parts))
            .collect();
        let mut masked = BTreeSet::new();
        let mut clear = BTreeSet::new();
        let mut sensitive_table = false;
        if !self.sensitive.is_empty() {
            let mut read: Vec<&String> = tables.iter().collect();
            for t in &tables {
                if let Some(bases) = self.sensitive.views.get(t) {
                    read.extend(bases);
                }
            }
            for t in read {
                let Some(cols) = self.sensitive.by_table.get(t) else {
                    continue;
                };
                sensitive_table = true;
                for (name, qualified, is_clear) in cols {
                    if part.all_columns || part.columns.contains(name) {
                        if *is_clear {
                            clear.insert(qualified.clone());
                        } else {
                            masked.insert(qualified.clone());
                        }
                    }
                }
            }
        }
        Facts {
            kind: part.kind,
            tables: tables.into_iter().collect(),
            masked: masked.into_iter().collect(),
            clear: clear.into_iter().collect(),
            sensitive_table,
            unanalysed: part.unanalysed,
            defines: part.defines,
            uses: part.uses,
        }
    }

    fn qualify(&self, parts: &[String]) -> String {
        match parts {
            [name] => self
                .catalog
                .as_ref()
                .and_then(|c| c.resolve(&self.search_path, name))
                .map(|r| r.qualified())
                .unwrap_or_else(|| name.clone()),
            [.., schema, name] => format!("{schema}.{name}"),
            [] => String::new(),
        }
    }
}

impl std::fmt::Debug for SessionAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SessionAudit(session {}, {} in flight)",
            self.who.session,
            self.slots.len()
        )
    }
}

/// The row count at the end of a command tag (`SELECT 5`, `INSERT 0 5`, `COPY 5`).
fn rows_of_tag(tag: &str) -> Option<u64> {
    let mut words = tag.split(' ');
    let verb = words.next()?;
    let last = tag.rsplit(' ').next()?;
    matches!(
        verb,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE"
    )
    .then(|| last.parse().ok())
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_give_row_counts() {
        assert_eq!(rows_of_tag("SELECT 5"), Some(5));
        assert_eq!(rows_of_tag("INSERT 0 7"), Some(7));
        assert_eq!(rows_of_tag("COPY 3"), Some(3));
        assert_eq!(rows_of_tag("CREATE TABLE"), None);
        assert_eq!(rows_of_tag("BEGIN"), None);
    }
}
