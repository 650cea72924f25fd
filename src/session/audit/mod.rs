//! The audit side of a session: every statement the client sends becomes an in-flight
//! entry, paired with the server's replies in order (CommandComplete, EmptyQuery,
//! PortalSuspended, FunctionCallResponse, ErrorResponse, ReadyForQuery), and ends as one
//! record. Completed records are handed to the writer before the relay releases the
//! reply that completed them (see `relay::server_to_client`), so no client sees a result
//! whose record could still be lost. Rows of masked tables also feed `[[alert]]` windows.

mod facts;
mod who;

pub use facts::Sensitive;
pub use who::Who;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;

use super::encoding::Converted;
use crate::audit::record::timestamp;
use crate::audit::{AuditLog, Decision, Event, Record};
use crate::catalog::Catalog;
use crate::config::rules::AlertAction;
use crate::metrics::Metrics;
use crate::policy::Denied;
use crate::protocol::frontend::FrontendMessage;
use crate::sessions::LiveSession;
use crate::sql::analysis::{Analysed, FactsCache};
use crate::watch::{AlertWatch, Fired};
use facts::{Facts, Resolutions};

/// A statement waiting for its outcome.
#[derive(Debug)]
struct InFlight {
    text: Arc<str>,
    facts: Arc<Facts>,
    /// The client_encoding the text was converted from (see `Recorded::converted`).
    converted: Option<Arc<str>>,
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

/// What the audit records of a prepared statement or portal: its text and facts. The
/// session state keeps it with the statement or portal, registered when the server
/// confirms it (ParseComplete, BindComplete), so a Parse the server refused (a duplicate
/// name) never replaces what an existing name runs.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub text: Arc<str>,
    pub facts: Arc<Facts>,
    /// The client_encoding the text was converted from to be recorded as UTF-8, with a
    /// word when some bytes could not be converted.
    pub converted: Option<Arc<str>>,
}

impl PartialEq for Recorded {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.text, &other.text) && Arc::ptr_eq(&self.facts, &other.facts)
    }
}

pub struct SessionAudit {
    log: Option<Arc<AuditLog>>,
    metrics: Arc<Metrics>,
    pub who: Who,
    facts: Resolutions,
    alerts: Option<AlertWatch>,
    /// The session's line in the admin console, counted per statement.
    live: Option<Arc<LiveSession>>,
    slots: VecDeque<Slot>,
    /// The refused Parse or Execute whose refusal the server has yet to raise.
    refused_parse: Option<InFlight>,
    completed: Vec<Vec<u8>>,
    record_always: bool,
    /// Statements done whose records wait for the end of their batch (its
    /// ReadyForQuery, already on its way), in order: in an implicit transaction a later
    /// error undoes them, and their records say so.
    held: Vec<Settled>,
    /// The batch now answering began outside a transaction block: it is one implicit
    /// transaction, unless a statement in it controls transactions.
    batch_implicit: bool,
    /// A statement of the batch controls transactions (BEGIN, COMMIT, SAVEPOINT, ...).
    batch_controls: bool,
    /// The SQLSTATE of the batch's first error.
    batch_failed: Option<String>,
}

/// A statement's outcome, as [`SessionAudit::finish`] takes it.
#[derive(Debug)]
struct Settled {
    f: InFlight,
    rows: Option<u64>,
    sqlstate: Option<String>,
    note: Option<&'static str>,
    /// A change that completed without error (a later error of its implicit transaction
    /// undoes it).
    done: bool,
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
    pub counters: Option<Arc<LiveSession>>,
}

impl SessionAudit {
    pub fn new(who: Who, setup: AuditSetup) -> SessionAudit {
        SessionAudit {
            log: setup.log,
            metrics: setup.metrics,
            who,
            facts: Resolutions::new(
                setup.redact,
                setup.catalog,
                setup.search_path,
                setup.sensitive,
            ),
            alerts: setup.alerts,
            live: setup.counters,
            slots: VecDeque::new(),
            refused_parse: None,
            completed: Vec::new(),
            record_always: false,
            held: Vec::new(),
            batch_implicit: true,
            batch_controls: false,
            batch_failed: None,
        }
    }

    /// Builds records even without a log to hand them to (benchmarks measure their cost).
    pub fn recording(mut self) -> SessionAudit {
        self.record_always = true;
        self
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.facts.catalog()
    }

    /// The session is ending: statements still waiting for the server did not finish.
    pub fn abandon(&mut self) {
        self.release_held();
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
        self.facts.replace_sensitive(sensitive);
        self.alerts = alerts;
    }

    /// After pgveil read the catalog again: names and sensitive columns as it has them.
    pub fn replace_catalog(&mut self, catalog: Arc<Catalog>, sensitive: Sensitive) {
        self.facts.replace_catalog(catalog, sensitive);
    }

    /// Whether an alert rule may refuse this session's statements.
    pub fn may_block(&self) -> bool {
        self.alerts.is_some()
    }

    /// Records the client's message, its SQL as the server reads it in `analysed` (`None`
    /// when pgveil cannot tell: recorded unanalysed; statement facts from the session's
    /// `cache`); `refusal` when pgveil refused it. For an Execute, `portal` is what the
    /// portal runs as the session state
    /// knows it (see `SessionState::portal_as_sent`). For a Parse that goes to the server,
    /// returns what the state is to keep with the statement.
    pub fn on_client(
        &mut self,
        msg: &FrontendMessage<'_>,
        analysed: Option<&Analysed<'_>>,
        cache: &mut FactsCache,
        refusal: Option<&Denied>,
        portal: Option<&Recorded>,
        converted: Option<&Converted>,
    ) -> Option<Recorded> {
        let converted: Option<Arc<str>> = converted.map(|c| {
            if c.lossless {
                Arc::from(c.from.as_str())
            } else {
                Arc::from(format!(
                    "{} (bytes not valid in it stand as U+FFFD)",
                    c.from
                ))
            }
        });
        match msg {
            FrontendMessage::Query { sql } => {
                for (text, facts) in self.facts.parts(sql, analysed, cache) {
                    let mut f = self.in_flight(text, facts, "simple", refusal.cloned());
                    f.converted.clone_from(&converted);
                    self.slots.push_back(Slot::Statement(f));
                }
                self.slots.push_back(Slot::End);
            }
            FrontendMessage::Parse { sql, .. } => {
                let (text, facts) = self.facts.whole(sql, analysed, cache);
                if refusal.is_some() {
                    let mut f = self.in_flight(text, facts, "extended", refusal.cloned());
                    f.converted = converted;
                    self.refused_parse = Some(f);
                } else {
                    return Some(Recorded {
                        text,
                        facts,
                        converted,
                    });
                }
            }
            FrontendMessage::Execute { .. } => {
                let p = portal.cloned().unwrap_or_else(|| Recorded {
                    text: Arc::from(""),
                    facts: Arc::new(Facts::opaque("other")),
                    converted: None,
                });
                let mut f = self.in_flight(p.text, p.facts, "extended", refusal.cloned());
                f.converted = p.converted;
                if refusal.is_some() {
                    self.refused_parse = Some(f);
                } else {
                    self.slots.push_back(Slot::Statement(f));
                }
            }
            FrontendMessage::Sync => self.slots.push_back(Slot::End),
            FrontendMessage::FunctionCall => {
                let facts = Arc::new(Facts::opaque("function_call"));
                let f = self.in_flight(Arc::from(""), facts, "fast_path", refusal.cloned());
                self.slots.push_back(Slot::Statement(f));
                self.slots.push_back(Slot::End);
            }
            _ => {}
        }
        None
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
    /// The statement is analysed only while the user is blocked.
    pub fn alert_block(
        &mut self,
        sql: &str,
        analysed: &Analysed<'_>,
        cache: &mut FactsCache,
    ) -> Option<Denied> {
        let blocked = self.alerts.as_ref()?.blocked()?;
        let parts = self.facts.parts(sql, Some(analysed), cache);
        let (_, facts) = parts.iter().find(|(_, f)| f.may_read_sensitive())?;
        Some(self.alert_refusal(facts, blocked))
    }

    /// What a protocol Execute of `portal` runs when no Bind made it: the SQL cursor of
    /// that name, if the session declared one.
    pub fn cursor(&self, portal: &str) -> Option<Recorded> {
        let (text, facts) = self.facts.cursor(portal)?;
        Some(Recorded {
            text,
            facts,
            converted: None,
        })
    }

    /// [`Self::alert_block`] for the Execute of a portal.
    pub fn alert_block_portal(&mut self, portal: Option<&Recorded>) -> Option<Denied> {
        let blocked = self.alerts.as_ref()?.blocked()?;
        let facts = &portal?.facts;
        facts
            .may_read_sensitive()
            .then(|| self.alert_refusal(facts, blocked))
    }

    fn alert_refusal(&self, facts: &Facts, (rule, limit): (String, u64)) -> Denied {
        let table = facts
            .tables
            .iter()
            .find(|t| self.facts.is_sensitive(t))
            .cloned()
            .unwrap_or_else(|| "tables pgveil cannot name".into());
        Denied {
            message: format!(
                "pgveil: {} on {table} is not allowed for role \"{}\": alert {rule} (more than {limit} rows of masked tables a minute) blocks reads of masked tables until the window clears",
                facts.kind.to_uppercase(),
                self.who.user
            ),
            rule,
        }
    }

    /// The statement at the front was refused after it ran (its effects undone): a
    /// statement over its `max_rows` limit. Its record says so, with the rule.
    pub fn on_refused(&mut self, denied: Denied) {
        if let Some(Slot::Statement(f)) = self.slots.front_mut() {
            f.blocked = Some(denied);
        }
    }

    /// A DataRow of the statement at the front.
    pub fn on_data_row(&mut self) {
        if let Some(Slot::Statement(f)) = self.slots.front_mut() {
            f.rows += 1;
        }
    }

    /// CommandComplete (`tag`), EmptyQueryResponse, PortalSuspended or
    /// FunctionCallResponse (`None`): the statement at the front is done. `batch_ends`:
    /// the end of its batch (ReadyForQuery) will come without the client sending more,
    /// so its record may wait for the batch's fate.
    pub fn on_complete(&mut self, tag: Option<&str>, batch_ends: bool) {
        if !matches!(self.slots.front(), Some(Slot::Statement(_))) {
            return;
        }
        let Some(Slot::Statement(f)) = self.slots.pop_front() else {
            return;
        };
        let rows = tag.and_then(rows_of_tag).unwrap_or(f.rows);
        self.batch_controls |= f.facts.kind == "transaction";
        // Only a change can be undone by a later error (what a read sent the client stays
        // read): reads are recorded at once, and hold nothing behind them.
        let hold = batch_ends
            && self.batch_implicit
            && f.blocked.is_none()
            && matches!(
                f.facts.kind,
                "insert" | "update" | "delete" | "merge" | "truncate" | "ddl" | "grant" | "revoke"
            );
        self.settle(Settled {
            f,
            rows: Some(rows),
            sqlstate: None,
            note: None,
            done: hold,
        });
    }

    /// ErrorResponse: the statement at the front failed, and the server skips the rest
    /// of the query string or batch.
    pub fn on_error(&mut self, sqlstate: &str) {
        self.batch_failed
            .get_or_insert_with(|| sqlstate.to_string());
        let mut first = true;
        while let Some(Slot::Statement(_)) = self.slots.front() {
            let Some(Slot::Statement(f)) = self.slots.pop_front() else {
                break;
            };
            let note = (!first).then_some("not run: an earlier statement of the same batch failed");
            self.settle(Settled {
                f,
                rows: None,
                sqlstate: Some(sqlstate.to_string()),
                note,
                done: false,
            });
            first = false;
        }
    }

    /// ReadyForQuery (`status`: the transaction status it reports): the batch is over.
    /// What is still open in it did not run; what its implicit transaction did is undone
    /// if an error ended it.
    pub fn on_ready(&mut self, status: crate::protocol::backend::TransactionStatus) {
        use crate::protocol::backend::TransactionStatus;
        let undone = self.batch_failed.take().filter(|_| {
            self.batch_implicit && !self.batch_controls && status == TransactionStatus::Idle
        });
        for mut held in std::mem::take(&mut self.held) {
            if let Some(code) = undone.as_deref().filter(|_| held.done) {
                held.rows = None;
                held.sqlstate = Some(code.to_string());
                held.note =
                    Some("rolled back: a later statement of the same implicit transaction failed");
            }
            self.finish(held.f, held.rows, held.sqlstate.as_deref(), held.note);
        }
        while let Some(slot) = self.slots.pop_front() {
            match slot {
                Slot::End => break,
                Slot::Statement(f) => self.finish(f, None, None, Some("not run")),
            }
        }
        self.batch_implicit = status == TransactionStatus::Idle;
        self.batch_controls = false;
    }

    /// Whether records wait for the end of their batch (so must the replies after them).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Records that waited for their batch's end are made as the statements stand (the
    /// replies held behind them grew too large to keep waiting).
    pub fn release_held(&mut self) {
        for held in std::mem::take(&mut self.held) {
            self.finish(held.f, held.rows, held.sqlstate.as_deref(), held.note);
        }
    }

    /// A statement's outcome: recorded now, or, while records wait for the batch's end
    /// (from the first statement whose fate that end decides), in order after them.
    fn settle(&mut self, settled: Settled) {
        if settled.done || !self.held.is_empty() {
            self.held.push(settled);
        } else {
            self.finish(
                settled.f,
                settled.rows,
                settled.sqlstate.as_deref(),
                settled.note,
            );
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
            self.metrics.refusal(&b.rule);
        }
        if decision == Decision::Masked {
            self.metrics.rows_masked(rows.unwrap_or(0));
        }
        if let Some(live) = &self.live {
            live.counters.statement(
                rows.unwrap_or(0),
                decision == Decision::Masked,
                decision == Decision::Blocked,
            );
        }
        let message = match (&f.blocked, note) {
            (Some(b), _) => Some(b.message.as_str()),
            (None, n) => n,
        };
        if self.log.is_some() || self.record_always {
            let record = Record {
                application_name: &self.who.application_name,
                client_addr: &self.who.client_addr,
                converted_from: f.converted.as_deref(),
                database: &self.who.database,
                decision: Some(decision),
                duration_us: Some(elapsed.as_micros() as u64),
                event: Some(Event::Statement),
                kind: Some(f.facts.kind),
                masked_columns: Some(&f.facts.masked),
                message,
                protocol: Some(f.protocol),
                rows,
                rule: f.blocked.as_ref().map(|b| b.rule.as_str()),
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
        if f.facts.may_read_sensitive() && decision != Decision::Blocked {
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
            converted: None,
            protocol,
            ts: OffsetDateTime::now_utc(),
            started: Instant::now(),
            blocked,
            rows: 0,
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
