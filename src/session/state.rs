//! What a session knows between startup and close: transaction status, server parameters,
//! prepared statements and portals with their row descriptions, and the queue that pairs
//! every server reply with the client request it answers, pipelined or not.
//!
//! The client side pushes a `Pending` entry for each request that gets a reply; the server
//! side pops them as replies arrive. Statements and portals are registered when the server
//! confirms them (ParseComplete, BindComplete), so a pipelined batch that fails half-way
//! leaves no phantom entries: after an ErrorResponse in extended mode the server skips to
//! Sync, and so does this queue.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use compact_str::CompactString;

use super::audit::Recorded;
use super::copy_out::{CopyError, CopyRewriter};
use super::rows::MaskPlan;
use crate::policy::masking::{CopyKind, CopyOut};
use crate::policy::session_guard::SessionGuard;
use crate::policy::session_masking::SessionPolicy;
use crate::protocol::backend::{FieldDescription, TransactionStatus};
use crate::protocol::frontend::{FormatCodes, FrontendMessage, Target};
use crate::protocol::{Frame, ProtocolError};
use crate::sql::Strings;

/// A statement or portal name: short names (the usual case) are held inline.
pub type Name = CompactString;

/// Result columns as the server described them.
pub type RowShape = Arc<Vec<FieldDescription>>;

#[derive(Clone, Debug, PartialEq)]
pub struct PreparedStatement {
    pub sql: Arc<str>,
    pub param_types: Vec<u32>,
    /// `Some(None)` when described as returning no rows.
    pub rows: Option<Option<RowShape>>,
    /// What the audit records of it.
    pub recorded: Option<Recorded>,
    /// Whether running it may change the session's settings.
    pub settings: SettingsChange,
    /// The row limit it runs under (it was sent wrapped: see `RowLimit::wrap`).
    pub limited: Option<Arc<Limited>>,
    /// A COPY whose rows are masked in flight (see [`SessionState::copy_before_execute`]).
    pub copy: Option<Arc<CopyOut>>,
}

/// What the server's error says when pgveil's pipelined schema probe found a masked name
/// the catalog does not have (see [`SessionState::pipeline_probe`]).
const PROBE_MARKER: &str = "pgveil-schema-changed";

/// A statement sent wrapped to count its rows under a `max_rows` limit, for the session
/// whose role is `role`: its replies are turned back into the statement's own.
#[derive(Debug, PartialEq)]
pub struct Limited {
    pub limit: crate::policy::guard::RowLimit,
    pub role: String,
}

/// What a server reply to a limited statement becomes (see [`SessionState::limited_reply`]).
#[derive(Debug, PartialEq)]
pub enum LimitedReply {
    /// Not a reply to a limited statement, or one that stays as it is.
    Same,
    /// The wrapper's own RowDescription or row (its count): the client's statement has none.
    Swallow,
    /// Send this frame, handled as if the server had sent it.
    Replace(Frame),
}

/// Whether a statement may change the session's settings (see `may_change_settings`),
/// worked out the first time a non-ASCII statement behind it asks, then kept: a batch of
/// such statements reads each statement in flight once, not once per statement.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettingsChange(std::cell::OnceCell<bool>);

impl SettingsChange {
    fn of(&self, sql: &str) -> bool {
        *self.0.get_or_init(|| may_change_settings(sql))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Portal {
    pub statement: Name,
    pub sql: Arc<str>,
    pub result_formats: FormatCodes,
    pub rows: Option<Option<RowShape>>,
    /// What the audit records of it (its statement's, as bound).
    pub recorded: Option<Recorded>,
    /// Its statement's.
    pub settings: SettingsChange,
    /// Its statement's.
    pub limited: Option<Arc<Limited>>,
    /// Its statement's.
    pub copy: Option<Arc<CopyOut>>,
}

impl Portal {
    /// The wire format (0 text, 1 binary) of result column `i`, per Bind's rules.
    pub fn format_of(&self, i: usize) -> i16 {
        match self.result_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }
}

/// How the rows of a COPY now streaming reach a masked session.
#[derive(Debug)]
pub enum CopyStream {
    /// As they are: the COPY reads no masked column in flight.
    Plain,
    Masked(Box<CopyRewriter>),
}

/// A client request still waiting for (the end of) its reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Pending {
    Query {
        sql: Arc<str>,
        /// Tables it creates, for the masking policy once it completes without error.
        created: Vec<String>,
        settings: SettingsChange,
        /// Sent wrapped to count its rows (a query of one statement).
        limited: Option<Arc<Limited>>,
        /// A COPY whose rows are masked in flight (sent as Parse, Bind, Execute, Sync).
        copy: Option<Arc<CopyOut>>,
    },
    Parse(Name, PreparedStatement),
    Bind {
        portal: Name,
        statement: Name,
        result_formats: FormatCodes,
        /// The statement's audit record as it stood when the Bind was sent.
        recorded: Option<Recorded>,
        /// The COPY the statement was when the Bind was sent (see `copy_before_execute`).
        copy: Option<Arc<CopyOut>>,
    },
    Describe {
        target: Target,
        name: Name,
        /// pgveil's own Describe (see `describe_before_execute`): the reply is not the
        /// client's.
        hidden: bool,
    },
    Execute {
        portal: Name,
    },
    Close {
        target: Target,
        name: Name,
    },
    Sync,
    FunctionCall,
    /// One of the messages of pgveil's schema probe at the head of an extended-protocol
    /// batch (see [`SessionState::pipeline_probe`]): its reply is not the client's, and
    /// its error means nothing of the batch ran.
    Probe,
    /// pgveil's own reading of the catalog (a simple query): no reply is the client's.
    Catalog,
    /// pgveil's Parse, Describe or Close of a COPY's inner query, sent ahead of the COPY
    /// (see [`SessionState::copy_before_execute`]): the description is how its rows are
    /// masked; no reply but an error is the client's.
    /// (The Describe's entry holds the COPY described, to be matched with the one whose
    /// rows come.)
    CopyDescribe(Option<Arc<CopyOut>>),
    /// The client's CopyDone or CopyFail, sent before the server's CopyInResponse
    /// arrived: the end of the Syncs the server will ignore (see `on_copy_in`).
    CopyEnd,
    /// A Parse or Bind pgveil sent for the client (a simple-query COPY sent as extended
    /// messages): the server's statement or portal is registered as the request says,
    /// and its reply is not the client's.
    Hidden(Box<Pending>),
}

impl Pending {
    fn is_extended(&self) -> bool {
        !matches!(
            self,
            Pending::Query { .. }
                | Pending::Sync
                | Pending::FunctionCall
                | Pending::CopyEnd
                | Pending::Catalog
        )
    }
}

/// After a refused Parse: client messages are dropped until Sync, and the refusal is
/// raised by the server once, at the first Flush or Sync.
#[derive(Debug)]
pub struct Discarding {
    unraised: Option<String>,
}

impl Discarding {
    pub fn new(message: String) -> Discarding {
        Discarding {
            unraised: Some(message),
        }
    }

    /// The refusal, the first time it is asked for.
    pub fn take_unraised(&mut self) -> Option<String> {
        self.unraised.take()
    }
}

/// Why rows cannot be forwarded to a masked session.
#[derive(Debug, PartialEq, Eq)]
pub enum UnknownRows {
    /// No RowDescription is known for them.
    Undescribed,
    /// A column comes from a relation (or a column of one) pgveil's catalog does not
    /// have: it may be masked under a name the catalog does not know yet.
    UnknownOrigin,
}

/// pgveil's own catalog query in flight, then its result.
#[derive(Default)]
pub enum CatalogRead {
    #[default]
    Idle,
    Reading(crate::catalog::CatalogRows, bool),
    /// The catalog read, or `None` when the server refused the query.
    Done(Option<crate::catalog::Catalog>),
    /// pgveil's probe for what pending masks name (see `PolicyRefresh::pending_probe`):
    /// whether a row (or an error) came back.
    Probing(bool),
    /// Whether something the pending masks name exists now (or the probe failed).
    Probed(bool),
}

impl std::fmt::Debug for CatalogRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CatalogRead::Idle => "Idle",
            CatalogRead::Reading(..) => "Reading",
            CatalogRead::Done(_) => "Done",
            CatalogRead::Probing(_) => "Probing",
            CatalogRead::Probed(_) => "Probed",
        })
    }
}

/// What the server side learned from one reply, for the relay to act on.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Rows follow with this shape (from RowDescription, or the portal being executed).
    Rows(Option<RowShape>),
    /// A reply to a message pgveil injected: not forwarded.
    Swallow,
    /// Anything else.
    Other,
}

#[derive(Debug, Default)]
pub struct SessionState {
    pub transaction: Option<TransactionStatus>,
    pub server_params: HashMap<String, String>,
    statements: HashMap<Name, PreparedStatement>,
    portals: HashMap<Name, Portal>,
    pending: VecDeque<Pending>,
    /// Shape of the rows currently streaming, if any.
    current_rows: Option<RowShape>,
    /// Replies that matched no request: a bug or an unexpected server; logged, not fatal.
    pub unmatched: u64,
    /// Masking for this session; `None` when no mask applies to it.
    pub policy: Option<SessionPolicy>,
    /// The statement guard; `None` when nothing can be refused to this session.
    pub guard: Option<SessionGuard>,
    /// The in-flight mask plan of the rows now streaming: `None` until computed.
    plan: Option<Option<Arc<MaskPlan>>>,
    /// A refused extended-protocol message: client messages are dropped until Sync.
    pub discarding: Option<Discarding>,
    /// The schema version the session's catalog was read at.
    pub catalog_version: Option<crate::proxy::CatalogVersion>,
    /// A statement in the transaction now open may have changed the schema: the change
    /// is seen again when the transaction ends.
    pub schema_changed: bool,
    /// The facts of the statements this session sent, by shape: the one analysis the
    /// guard, masking, alerts and the audit read.
    pub facts: crate::sql::analysis::FactsCache,
    /// pgveil's own reading of the catalog on this session's connection.
    pub catalog_read: CatalogRead,
    /// The client's next batch waits for the requests in flight to complete, so that the
    /// schema can be checked before it is screened (see `relay::client_to_server`).
    pub awaiting_idle: bool,
    /// The rows of the result now arriving could not be forwarded: the client got an
    /// error instead, and every reply until ReadyForQuery is withheld.
    pub withholding: bool,
    /// Whether a statement was sent wrapped to count its rows (see [`Limited`]): only
    /// then are server replies looked at for it.
    pub limits_in_use: bool,
    /// The count of rows the wrapper of the limited statement now answering returned.
    limit_count: Option<u64>,
    /// pgveil's pipelined schema probe as prepared on the server: its query, and the
    /// name of the statement (see [`Self::pipeline_probe`]).
    probe_statement: Option<(Arc<str>, String)>,
    /// The server is in copy-in mode: it ignores Sync and Flush until CopyDone/CopyFail.
    copy_in: bool,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    request_failed: bool,
    /// pgveil's description of the inner query of the COPY about to run (see
    /// [`Self::copy_before_execute`]): `Some(None)` when it described no rows.
    copy_described: Option<(Arc<CopyOut>, Option<RowShape>)>,
    /// The COPY whose rows are streaming to a masked session.
    copy_out: Option<CopyStream>,
    /// The name of pgveil's statement for describing COPY queries.
    copy_statement: Option<String>,
    /// A statement completed since the last ReadyForQuery: it may have changed settings
    /// (client_encoding among them), which the server reports only with that
    /// ReadyForQuery, so until then `server_params` may be out of date.
    ran_in_batch: bool,
    /// Audit records and alert accounting; `None` when neither is on.
    pub audit: Option<super::audit::SessionAudit>,
    /// The session as operators see it (admin console): activity and counters.
    pub live: Option<Arc<crate::sessions::LiveSession>>,
}

impl SessionState {
    pub fn new(server_params: HashMap<String, String>) -> Self {
        SessionState {
            transaction: Some(TransactionStatus::Idle),
            server_params,
            ..Default::default()
        }
    }

    /// No request is waiting for the server.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the end (ReadyForQuery) of the batch now answering will come without the
    /// client sending anything more: a simple Query is answering, or a Sync is sent.
    pub fn batch_end_sent(&self) -> bool {
        self.pending.iter().any(|p| {
            matches!(
                p,
                Pending::Query { .. } | Pending::Sync | Pending::FunctionCall
            )
        })
    }

    /// Puts pgveil's probe for masks the catalog does not have yet (`probe`, a query that
    /// returns a row when one of them exists) at the head of an extended-protocol batch,
    /// in the same implicit transaction, instead of a round trip of its own: a named
    /// statement (prepared once per session and probe) that raises when the probe finds
    /// something, so that the server runs nothing of the batch, bound, executed and its
    /// portal closed. Its replies are swallowed; its error is turned into the client's
    /// (see [`Self::probe_failed`]).
    pub fn pipeline_probe(&mut self, probe: &Arc<str>, out: &mut bytes::BytesMut) {
        use crate::protocol::write;
        let name = match &self.probe_statement {
            Some((text, name)) if Arc::ptr_eq(text, probe) => name.clone(),
            stale => {
                // One name per session, unlikely to be a client's; closing a statement
                // that does not exist is no error, so a dropped one is prepared again.
                let name = stale.as_ref().map_or_else(
                    || format!("pgveil_probe_{:016x}", rand::random::<u64>()),
                    |(_, n)| n.clone(),
                );
                let sql = format!(
                    "SELECT 1 WHERE CASE WHEN EXISTS ({probe}) THEN \
                     (pg_catalog.current_database() OPERATOR(pg_catalog.||) ' {PROBE_MARKER}')::pg_catalog.int4 \
                     OPERATOR(pg_catalog.=) 0 ELSE false END"
                );
                out.extend_from_slice(write::close(b'S', &name).raw());
                out.extend_from_slice(write::parse(&name, &sql).raw());
                self.pending.push_back(Pending::Probe);
                self.pending.push_back(Pending::Probe);
                self.probe_statement = Some((probe.clone(), name.clone()));
                name
            }
        };
        out.extend_from_slice(write::bind(&name, &name).raw());
        out.extend_from_slice(write::execute(&name).raw());
        out.extend_from_slice(write::close(b'P', &name).raw());
        for _ in 0..3 {
            self.pending.push_back(Pending::Probe);
        }
    }

    /// Whether the reply now arriving answers pgveil's pipelined probe.
    pub fn answering_probe(&self) -> bool {
        self.pending.front() == Some(&Pending::Probe)
    }

    /// A reply of pgveil's pipelined probe other than an error: not the client's.
    pub fn probe_replied(&mut self) {
        self.pending.pop_front();
    }

    /// The pipelined probe's error (the server skips the rest of the batch): what the
    /// client gets instead. The catalog is read again before the next batch.
    pub fn probe_failed(&mut self, f: &Frame) -> Frame {
        let server = crate::protocol::backend::error_message(f).unwrap_or_default();
        let message = if server.contains(PROBE_MARKER) {
            "pgveil: a relation or column now has a name a mask rule names (it changed behind pgveil); nothing of this batch ran: run it again".to_string()
        } else {
            // Say, without the server's words: they may name what the probe looked for.
            if let Some((text, _)) = self.probe_statement.as_mut() {
                *text = Arc::from("");
            }
            "pgveil: pgveil's check of the schema failed; nothing of this batch ran: run it again"
                .to_string()
        };
        if let Some(p) = self.policy.as_mut() {
            p.catalog_wanted = true;
        }
        crate::protocol::write::error_response(
            crate::protocol::write::Severity::Error,
            crate::protocol::sqlstate::SqlState::SERIALIZATION_FAILURE,
            &message,
        )
    }

    /// A client statement may have dropped pgveil's prepared probe (DISCARD ALL,
    /// DEALLOCATE): it is prepared again before its next use.
    fn note_forgetting(&mut self, sql: &str) {
        let Some((text, _)) = self.probe_statement.as_mut() else {
            return;
        };
        let mentions = |word: &[u8]| {
            sql.as_bytes()
                .windows(word.len())
                .any(|w| w.eq_ignore_ascii_case(word))
        };
        if mentions(b"discard") || mentions(b"deallocate") {
            *text = Arc::from("");
        }
    }

    /// How the server reads `'...'` literals: standard_conforming_strings as it last
    /// reported it (ParameterStatus), or unknown while a request it has not answered yet
    /// may change it (a `SET` pipelined before the statement being screened).
    pub fn lexing(&self) -> Strings {
        if !self.pending.is_empty() {
            return Strings::Unknown;
        }
        match self.server_params.get("standard_conforming_strings") {
            Some(v) if v != "on" => Strings::Escaped,
            _ => Strings::Standard,
        }
    }

    /// The client_encoding the server last reported, when it is not UTF8: text in it is
    /// converted to be read (see `encoding::transcode`).
    pub fn client_encoding(&self) -> Option<&str> {
        self.server_params
            .get("client_encoding")
            .map(String::as_str)
            .filter(|e| !e.eq_ignore_ascii_case("UTF8") && !e.eq_ignore_ascii_case("UNICODE"))
    }

    /// The client_encoding under which the server reads the text of a statement sent now,
    /// when pgveil's reading of non-ASCII text (UTF-8) could differ from the server's:
    /// any encoding but UTF8 and SQL_ASCII (the server converts the text first, and in
    /// SJIS, BIG5, GBK, UHC, JOHAB or GB18030 a byte after a non-ASCII one can be part of
    /// its character, a quote or backslash included), or a request still in flight that
    /// may change it. `None` when the server reads the text as pgveil does.
    pub fn foreign_encoding(&self) -> Option<String> {
        let reported = self
            .server_params
            .get("client_encoding")
            .map(|e| e.to_ascii_uppercase());
        match reported.as_deref() {
            Some("UTF8" | "UNICODE" | "SQL_ASCII") => {}
            Some(other) => return Some(other.to_string()),
            None => return Some("unknown".into()),
        }
        self.pending
            .iter()
            .any(|p| match p {
                Pending::Query { sql, settings, .. } => settings.of(sql),
                Pending::Parse(_, s) => s.settings.of(&s.sql),
                Pending::Execute { portal } => self
                    .portals
                    .get(portal)
                    .is_none_or(|p| p.settings.of(&p.sql)),
                Pending::FunctionCall => true,
                _ => false,
            })
            .then(|| "possibly changing".to_string())
    }

    /// The SQL of every statement prepared through the extended protocol.
    pub fn prepared_sql(&self) -> Vec<Arc<str>> {
        self.statements.values().map(|s| s.sql.clone()).collect()
    }

    pub fn statement(&self, name: &str) -> Option<&PreparedStatement> {
        self.statements.get(name)
    }

    pub fn portal(&self, name: &str) -> Option<&Portal> {
        self.portals.get(name)
    }

    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.pending.iter()
    }

    /// The requests in flight, newest first, pgveil's hidden Parse and Bind as what they
    /// register: what statement and portal names mean once they are answered.
    fn sent_newest_first(&self) -> impl Iterator<Item = &Pending> {
        self.pending.iter().rev().map(|p| match p {
            Pending::Hidden(inner) => inner.as_ref(),
            other => other,
        })
    }

    /// Whether the server will ignore this client message: a Sync during copy-in
    /// ("for the convenience of client libraries", PostgreSQL's CopyGetData).
    pub fn ignored_by_server(&self, msg: &FrontendMessage<'_>) -> bool {
        self.copy_in && *msg == FrontendMessage::Sync
    }

    /// During copy-in the server reads only the copy stream (plus Flush and Sync, which it
    /// ignores); any other request would be swallowed by its protocol error and never
    /// answered, leaving every later reply paired with the wrong request, and a masked
    /// Execute's rows with another portal's plan. Such a client is ended instead.
    pub fn check_copy_stream(&self, msg: &FrontendMessage<'_>) -> Result<(), ProtocolError> {
        let copy_stream = matches!(
            msg,
            FrontendMessage::CopyData
                | FrontendMessage::CopyDone
                | FrontendMessage::CopyFail
                | FrontendMessage::Flush
                | FrontendMessage::Sync
                | FrontendMessage::Terminate
        );
        if self.copy_in && !copy_stream {
            return Err(ProtocolError::IntoCopy);
        }
        Ok(())
    }

    /// Records a client request that the server will answer.
    pub fn on_client(&mut self, msg: &FrontendMessage<'_>) {
        self.on_client_recorded(msg, None)
    }

    /// What statement `name` holds once the server has handled every request sent so far,
    /// if all succeed: the latest Parse or Close of that name still waiting, or else what
    /// the server confirmed.
    fn statement_as_sent(&self, name: &str) -> Option<&Recorded> {
        self.prepared_as_sent(name)?.recorded.as_ref()
    }

    /// Statement `name` once the server has handled every request sent so far, if all
    /// succeed.
    fn prepared_as_sent(&self, name: &str) -> Option<&PreparedStatement> {
        for p in self.sent_newest_first() {
            match p {
                Pending::Parse(n, s) if n == name => return Some(s),
                Pending::Close {
                    target: Target::Statement,
                    name: n,
                } if n == name => return None,
                _ => {}
            }
        }
        self.statements.get(name)
    }

    /// Whether statement `name`, as sent, was wrapped to count its rows with no RETURNING
    /// of its own (its one result column is pgveil's count).
    pub fn counting_statement(&self, name: &str) -> bool {
        self.prepared_as_sent(name)
            .and_then(|s| s.limited.as_ref())
            .is_some_and(|l| !l.limit.returning)
    }

    /// What portal `name` runs once the server has handled every request sent so far, if
    /// all succeed: for the audit record of an Execute sent now.
    pub fn portal_as_sent(&self, name: &str) -> Option<Recorded> {
        for p in self.sent_newest_first() {
            match p {
                Pending::Bind {
                    portal, recorded, ..
                } if portal == name => return recorded.clone(),
                Pending::Close {
                    target: Target::Portal,
                    name: n,
                } if n == name => return None,
                _ => {}
            }
        }
        match self.portals.get(name) {
            Some(p) => p.recorded.clone(),
            // No Bind made it: an SQL cursor (DECLARE), run by its name.
            None => self.audit.as_ref()?.cursor(name),
        }
    }

    /// [`Self::on_client`], with what the audit records of a Parse.
    pub fn on_client_recorded(&mut self, msg: &FrontendMessage<'_>, recorded: Option<Recorded>) {
        if let FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } = msg {
            self.note_forgetting(sql);
        }
        let pending = match msg {
            FrontendMessage::CopyDone | FrontendMessage::CopyFail => {
                if self.copy_in {
                    self.copy_in = false;
                    return;
                }
                Pending::CopyEnd
            }
            FrontendMessage::Sync if self.copy_in => return,
            FrontendMessage::Query { sql } => Pending::Query {
                sql: Arc::from(*sql),
                created: self
                    .policy
                    .as_mut()
                    .map(SessionPolicy::take_staged)
                    .unwrap_or_default(),
                settings: SettingsChange::default(),
                limited: None,
                copy: None,
            },
            FrontendMessage::Parse {
                statement,
                sql,
                param_types,
            } => {
                // Tables a prepared statement creates are never taken as the session's
                // own: reads of them are refused as unknown until the catalog knows them.
                if let Some(p) = self.policy.as_mut() {
                    p.take_staged();
                }
                Pending::Parse(
                    Name::new(statement),
                    PreparedStatement {
                        sql: Arc::from(*sql),
                        param_types: param_types.clone(),
                        rows: None,
                        recorded,
                        settings: SettingsChange::default(),
                        limited: None,
                        copy: None,
                    },
                )
            }
            FrontendMessage::Bind {
                portal,
                statement,
                result_formats,
            } => Pending::Bind {
                portal: Name::new(portal),
                statement: Name::new(statement),
                result_formats: result_formats.clone(),
                recorded: self.statement_as_sent(statement).cloned(),
                copy: self
                    .prepared_as_sent(statement)
                    .and_then(|s| s.copy.clone()),
            },
            FrontendMessage::Describe { target, name } => Pending::Describe {
                hidden: false,
                target: *target,
                name: Name::new(name),
            },
            FrontendMessage::Execute { portal, .. } => Pending::Execute {
                portal: Name::new(portal),
            },
            FrontendMessage::Close { target, name } => Pending::Close {
                target: *target,
                name: Name::new(name),
            },
            FrontendMessage::Sync => Pending::Sync,
            FrontendMessage::FunctionCall => Pending::FunctionCall,
            _ => return,
        };
        self.pending.push_back(pending);
    }

    /// CopyInResponse: the server now ignores Syncs until the client's CopyDone or
    /// CopyFail. Syncs the client already sent after the COPY are dropped from the queue
    /// (up to a CopyEnd, if the copy's end was sent too); returns how many. A request the
    /// client pipelined behind the COPY is an error (see `check_copy_stream`).
    pub fn on_copy_in(&mut self) -> Result<usize, ProtocolError> {
        let end = self
            .pending
            .iter()
            .skip(1)
            .position(|p| *p == Pending::CopyEnd)
            .map(|i| i + 1);
        let limit = end.unwrap_or(self.pending.len());
        if self
            .pending
            .range(1..limit)
            .any(|p| !matches!(p, Pending::Sync))
        {
            return Err(ProtocolError::IntoCopy);
        }
        let mut removed = 0;
        let mut i = 1;
        let mut stop = limit;
        while i < stop {
            if self.pending[i] == Pending::Sync {
                self.pending.remove(i);
                removed += 1;
                stop -= 1;
            } else {
                i += 1;
            }
        }
        match end {
            Some(_) => {
                self.pending.remove(stop);
            }
            None => self.copy_in = true,
        }
        Ok(removed)
    }

    /// Applies one server reply (by tag; `rows` is the decoded RowDescription for `T`).
    pub fn on_server(&mut self, tag: u8, rows: Option<Vec<FieldDescription>>) -> Reply {
        // A CopyEnd left over from a copy the server ended with an error answers nothing.
        while self.pending.front() == Some(&Pending::CopyEnd) {
            self.pending.pop_front();
        }
        if matches!(self.pending.front(), Some(Pending::CopyDescribe(_))) {
            match tag {
                b'1' | b'3' => {
                    self.pending.pop_front();
                    return Reply::Swallow;
                }
                b't' => return Reply::Swallow,
                b'T' | b'n' => {
                    if let Some(Pending::CopyDescribe(Some(copy))) = self.pending.pop_front() {
                        let shape = rows.filter(|_| tag == b'T').map(Arc::new);
                        self.copy_described = Some((copy, shape));
                    }
                    return Reply::Swallow;
                }
                _ => {}
            }
        }
        if matches!(self.pending.front(), Some(Pending::Hidden(_))) && matches!(tag, b'1' | b'2') {
            if let Some(Pending::Hidden(inner)) = self.pending.pop_front() {
                self.pending.push_front(*inner);
            }
            match tag {
                b'1' => self.complete_parse(),
                _ => self.complete_bind(),
            }
            return Reply::Swallow;
        }
        match tag {
            b'1' => self.complete_parse(),
            b'2' => self.complete_bind(),
            b'3' => self.complete_close(),
            b't' => {} // ParameterDescription: the Describe continues with T or n.
            b'T' | b'n' if self.answering_hidden_describe() => {
                let shape = rows.map(Arc::new).filter(|_| tag == b'T');
                self.complete_describe(Some(shape.clone()));
                // The rows of the Execute that follows: of a portal no Bind made (an SQL
                // cursor run by name) too, which the portal table does not hold.
                self.current_rows = shape;
                self.plan = None;
                return Reply::Swallow;
            }
            b'T' => {
                let shape = rows.map(Arc::new);
                let for_statement = matches!(
                    self.pending.front(),
                    Some(Pending::Describe {
                        target: Target::Statement,
                        ..
                    })
                );
                self.complete_describe(Some(shape.clone()));
                // A statement's description carries no result formats and no rows follow
                // it; rows of a later Execute take their formats from Bind.
                self.current_rows = if for_statement { None } else { shape.clone() };
                // RowDescription formats are the real ones, except for Describe Statement
                // (no rows follow that one).
                self.plan = None;
                return Reply::Rows(shape);
            }
            b'n' => self.complete_describe(None),
            b'D' => {
                if self.current_rows.is_none() {
                    self.current_rows = self.executing_shape();
                }
                return Reply::Rows(self.current_rows.clone());
            }
            b'C' | b'I' | b's' => {
                self.current_rows = None;
                self.plan = None;
                self.copy_out = None;
                // Any statement may change settings (EXECUTE of a prepared set_config, a
                // function, a trigger): one ran in this batch.
                if self.policy.is_some()
                    && matches!(self.pending.front(), Some(Pending::Execute { .. }))
                {
                    self.ran_in_batch = true;
                }
                if matches!(self.pending.front(), Some(Pending::Execute { .. })) {
                    self.pending.pop_front();
                }
            }
            b'E' => {
                self.copy_in = false;
                self.on_error()
            }
            b'Z' => {
                self.current_rows = None;
                self.plan = None;
                self.copy_out = None;
                self.copy_described = None;
                self.ran_in_batch = false;
                let failed = std::mem::take(&mut self.request_failed);
                match self.pending.pop_front() {
                    Some(Pending::Query { created, .. }) => {
                        // Tables a failed query string meant to create do not exist.
                        if let Some(p) = self.policy.as_mut().filter(|_| !failed) {
                            p.confirm_created(created);
                        }
                    }
                    Some(Pending::Sync | Pending::FunctionCall) => {}
                    _ => self.unmatched += 1,
                }
            }
            _ => {}
        }
        Reply::Other
    }

    /// The Query or Parse just sent (see [`Self::on_client`]) was the wrapper of a
    /// statement under a row limit.
    pub fn limit_sent(&mut self, limited: Limited) {
        let limited = Some(Arc::new(limited));
        match self.pending.back_mut() {
            Some(Pending::Query { limited: l, .. }) => *l = limited,
            Some(Pending::Parse(_, statement)) => statement.limited = limited,
            _ => return,
        }
        self.limits_in_use = true;
    }

    /// The limited statement the server's reply `tag` answers, and whether its portal
    /// returns binary results.
    fn limited_answering(&self, tag: u8) -> Option<(Arc<Limited>, bool)> {
        match (self.pending.front()?, tag) {
            (Pending::Query { limited, .. }, _) => Some((limited.clone()?, false)),
            (Pending::Execute { portal }, _) => {
                let p = self.portals.get(portal)?;
                Some((p.limited.clone()?, p.format_of(0) == 1))
            }
            (
                Pending::Describe {
                    target: Target::Statement,
                    name,
                    hidden: false,
                },
                b'T',
            ) => Some((self.statements.get(name)?.limited.clone()?, false)),
            (
                Pending::Describe {
                    target: Target::Portal,
                    name,
                    hidden: false,
                },
                b'T',
            ) => Some((self.portals.get(name)?.limited.clone()?, false)),
            _ => None,
        }
    }

    /// What a server reply becomes when it answers a statement sent wrapped under a row
    /// limit: the wrapper's count row and its description go (a description answers
    /// NoData), its command tag is the statement's own with the count, and its error
    /// for too many rows is pgveil's refusal naming the rule.
    pub fn limited_reply(&mut self, f: &Frame) -> Result<LimitedReply, ProtocolError> {
        let Some((limited, binary)) = self.limited_answering(f.tag()) else {
            return Ok(LimitedReply::Same);
        };
        let limit = &limited.limit;
        let counting = !limit.returning;
        Ok(match f.tag() {
            b'T' if counting => match self.pending.front() {
                Some(Pending::Describe { .. }) => {
                    LimitedReply::Replace(crate::protocol::write::frame(b'n', |_| {}))
                }
                _ => LimitedReply::Swallow,
            },
            b'D' if counting => {
                let row = crate::protocol::backend::data_row(f)?;
                self.limit_count = match row.first().copied().flatten() {
                    Some(v) if binary => v.try_into().ok().map(u64::from_be_bytes),
                    Some(v) => std::str::from_utf8(v).ok().and_then(|t| t.parse().ok()),
                    None => None,
                };
                LimitedReply::Swallow
            }
            // The count row fills an Execute's row limit of 1: the statement is done all
            // the same (a data-modifying WITH runs to its end at the first fetch).
            b's' if counting => {
                let rows = self.limit_count.take().unwrap_or(0);
                LimitedReply::Replace(crate::protocol::write::command_complete(&limit.tag(rows)))
            }
            b'C' => {
                let tag = crate::protocol::backend::command_tag(f)?;
                let rows = match self.limit_count.take() {
                    Some(n) if counting => n,
                    _ => tag
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                };
                LimitedReply::Replace(crate::protocol::write::command_complete(&limit.tag(rows)))
            }
            b'E' => {
                self.limit_count = None;
                let message = crate::protocol::backend::error_message(f);
                match message
                    .as_deref()
                    .and_then(crate::policy::guard::RowLimit::counted)
                {
                    Some(rows) => {
                        let denied = limit.exceeded(rows).denied(&limited.role, "");
                        if let Some(a) = self.audit.as_mut() {
                            a.on_refused(denied.clone());
                        }
                        LimitedReply::Replace(crate::protocol::write::error_response(
                            crate::protocol::write::Severity::Error,
                            crate::protocol::sqlstate::SqlState::INSUFFICIENT_PRIVILEGE,
                            &denied.message,
                        ))
                    }
                    None => LimitedReply::Same,
                }
            }
            _ => LimitedReply::Same,
        })
    }

    /// The Query or Parse just sent (see [`Self::on_client`]) was a COPY whose rows are
    /// masked in flight.
    pub fn copy_sent(&mut self, copy: Arc<CopyOut>) {
        match self.pending.back_mut() {
            Some(Pending::Query { copy: c, .. }) => *c = Some(copy),
            Some(Pending::Parse(_, statement)) => statement.copy = Some(copy),
            _ => {}
        }
    }

    /// Before an Execute of `portal` is forwarded: when it runs a COPY whose rows are
    /// masked in flight, the Parse, Describe and Close of its inner query that pgveil sends
    /// first, in the same transaction (the locks the Parse takes keep the schema it
    /// describes until the COPY has run). Their replies are not the client's.
    pub fn copy_before_execute(&mut self, portal: &str) -> Option<[Frame; 3]> {
        let copy = self.portal_copy_as_sent(portal)?;
        Some(self.describe_copy(&copy))
    }

    /// pgveil's Parse, Describe and Close of the inner query of `copy`.
    pub fn describe_copy(&mut self, copy: &Arc<CopyOut>) -> [Frame; 3] {
        let name = self
            .copy_statement
            .get_or_insert_with(|| format!("pgveil_copy_{:016x}", rand::random::<u64>()))
            .clone();
        self.pending.push_back(Pending::CopyDescribe(None));
        self.pending
            .push_back(Pending::CopyDescribe(Some(copy.clone())));
        self.pending.push_back(Pending::CopyDescribe(None));
        use crate::protocol::write;
        [
            write::parse(&name, &copy.inner),
            write::describe(b'S', &name),
            write::close(b'S', &name),
        ]
    }

    /// The COPY portal `name` runs once the server has handled every request sent so far.
    fn portal_copy_as_sent(&self, name: &str) -> Option<Arc<CopyOut>> {
        for p in self.sent_newest_first() {
            match p {
                // The statement as it was when the Bind ran, not as a later Parse of
                // its name makes it.
                Pending::Bind { portal, copy, .. } if portal == name => return copy.clone(),
                Pending::Close {
                    target: Target::Portal,
                    name: n,
                } if n == name => return None,
                _ => {}
            }
        }
        self.portals.get(name)?.copy.clone()
    }

    /// CopyOutResponse (`columns` columns, binary or text) in a masked session: how its
    /// rows are masked, from pgveil's description of the COPY's query; `Err` (why) when
    /// they cannot be, and must not be forwarded.
    pub fn on_copy_out(&mut self, columns: usize, binary: bool) -> Result<(), String> {
        let copy = match self.pending.front() {
            Some(Pending::Query { copy, .. }) => copy.clone(),
            Some(Pending::Execute { portal }) => {
                self.portals.get(portal).and_then(|p| p.copy.clone())
            }
            _ => None,
        };
        let described = self.copy_described.take();
        let Some(copy) = copy else {
            // A COPY that reads no masked column (or computes them masked in SQL).
            self.copy_out = Some(CopyStream::Plain);
            return Ok(());
        };
        // The description must be this very COPY's (sent just before its Execute).
        let shape = match described {
            Some((of, Some(shape))) if Arc::ptr_eq(&of, &copy) => shape,
            _ => return Err("pgveil has no description of the COPY's columns".into()),
        };
        let format = &copy.format;
        if shape.len() != columns || binary != (format.kind == CopyKind::Binary) {
            return Err("the COPY's columns are not those pgveil described".into());
        }
        if format.kind != CopyKind::Binary && format.encoding.is_none() && self.ran_in_batch {
            return Err("a statement earlier in this batch may have changed client_encoding, which the server reports only at the batch's end, so pgveil cannot read the COPY's rows; end the batch (Sync) before the COPY, name its ENCODING, or use the binary format".into());
        }
        if format.kind != CopyKind::Binary {
            let encoding = match &format.encoding {
                Some(e) => e.clone(),
                None => self
                    .server_params
                    .get("client_encoding")
                    .cloned()
                    .unwrap_or_default(),
            };
            if !crate::policy::masking::ascii_safe_encoding(&encoding) {
                return Err(format!(
                    "COPY rows in {encoding} cannot be read to mask them; use client_encoding UTF8 or the binary format"
                ));
            }
        }
        let policy = self.policy.as_ref().ok_or("no masking policy")?;
        let unknown = unknown_origins(&shape, &policy.catalog, &policy.own_relations)
            .map_err(|_| "the COPY reads a relation pgveil's catalog does not have".to_string())?;
        if !unknown.is_empty() {
            if let Some(p) = self.policy.as_mut() {
                p.catalog_wanted = true;
            }
            return Err(
                "the COPY reads a relation that changed since pgveil read the catalog; pgveil reads the catalog again: run the COPY again"
                    .into(),
            );
        }
        let policy = self.policy.as_ref().ok_or("no masking policy")?;
        let plan: Vec<_> = shape
            .iter()
            .map(|f| policy.masks.of_attr(f.table_oid, f.column).cloned())
            .collect();
        if plan.iter().all(Option::is_none) {
            // No masked column comes back (none at all, or all computed masked in SQL).
            self.copy_out = Some(CopyStream::Plain);
            return Ok(());
        }
        let names: Vec<&str> = shape.iter().map(|f| f.name.as_str()).collect();
        let rewriter = CopyRewriter::new(plan, &names, format.clone());
        self.copy_out = Some(CopyStream::Masked(Box::new(rewriter)));
        Ok(())
    }

    /// One CopyData (`f`) of a masked session's COPY, appended to `out` with its rows
    /// masked.
    pub fn copy_data(&mut self, f: &Frame, out: &mut bytes::BytesMut) -> Result<(), CopyError> {
        match &mut self.copy_out {
            Some(CopyStream::Plain) => {
                out.extend_from_slice(f.raw());
                Ok(())
            }
            Some(CopyStream::Masked(r)) => r.rewrite(f.body(), out),
            None => Err(CopyError::unexpected()),
        }
    }

    /// CopyDone: the rows of a masked COPY came whole.
    pub fn copy_done(&mut self) -> Result<(), CopyError> {
        match &self.copy_out {
            Some(CopyStream::Masked(r)) => r.finish(),
            _ => Ok(()),
        }
    }

    /// pgveil's own Parse and Bind of the unnamed statement and portal as `sql` (a refusal
    /// raised by the server, a simple-query COPY sent as extended messages): registered
    /// as the server will hold them, so a later Bind of either is judged for what it
    /// really runs; their replies are not the client's.
    pub fn hidden_unnamed(
        &mut self,
        sql: &str,
        recorded: Option<Recorded>,
        copy: Option<Arc<CopyOut>>,
    ) {
        let statement = PreparedStatement {
            sql: Arc::from(sql),
            param_types: Vec::new(),
            rows: None,
            recorded: recorded.clone(),
            settings: SettingsChange::default(),
            limited: None,
            copy: copy.clone(),
        };
        self.pending
            .push_back(Pending::Hidden(Box::new(Pending::Parse(
                "".into(),
                statement,
            ))));
        self.pending
            .push_back(Pending::Hidden(Box::new(Pending::Bind {
                portal: "".into(),
                statement: "".into(),
                result_formats: FormatCodes::default(),
                recorded,
                copy,
            })));
    }

    /// Records messages pgveil injects ahead of a client's Sync.
    pub fn push_internal(&mut self, pending: Pending) {
        self.pending.push_back(pending);
    }

    /// The mask plan for the DataRow now arriving: from the last RowDescription, or for
    /// an Execute from its portal's description and Bind's formats. `Err` when the
    /// session is masked and the rows' origin is unknown.
    pub fn row_plan(&mut self) -> Result<Option<Arc<MaskPlan>>, UnknownRows> {
        if let Some(plan) = &self.plan {
            return Ok(plan.clone());
        }
        let Some(policy) = &self.policy else {
            return Ok(None);
        };
        let (shape, portal) = match &self.current_rows {
            Some(shape) => (shape.clone(), None),
            None => {
                let portal = match self.pending.front() {
                    Some(Pending::Execute { portal }) => self.portals.get(portal),
                    _ => None,
                };
                // A portal bound before its statement was described takes the
                // statement's description.
                let rows = |p: &Portal| {
                    p.rows
                        .clone()
                        .or_else(|| self.statements.get(&p.statement)?.rows.clone())
                        .flatten()
                };
                let Some((portal, Some(shape))) = portal.map(|p| (p, rows(p))) else {
                    return Err(UnknownRows::Undescribed);
                };
                (shape, Some(portal))
            }
        };
        let unknown = unknown_origins(&shape, &policy.catalog, &policy.own_relations)?;
        if !unknown.is_empty() {
            // Unknown relations are harmless when the statement reads no relation that
            // is or may be masked: they can only be the session's own, or unmasked ones.
            if !self.reads_no_masked_relation() {
                return Err(UnknownRows::UnknownOrigin);
            }
            if let Some(p) = self.policy.as_mut() {
                p.own_relations.extend(unknown);
            }
        }
        let masks = &self.policy.as_ref().expect("masked").masks;
        let plan = match portal {
            Some(portal) => MaskPlan::build(&shape, masks, |i| portal.format_of(i)),
            None => MaskPlan::build(&shape, masks, |i| shape[i].format),
        };
        self.plan = Some(plan.clone());
        Ok(plan)
    }

    /// Whether no relation the statement now answering names is, or may be, masked (by
    /// name, in any schema, or once a pending mask's table exists). A statement pgveil
    /// cannot read counts as reading masked relations.
    fn reads_no_masked_relation(&self) -> bool {
        let (Some(policy), Some(sql)) = (&self.policy, self.answering_sql()) else {
            return false;
        };
        let Ok(lexed) = crate::sql::lex::lex(&sql, self.lexing()) else {
            return false;
        };
        let analysis = crate::sql::analysis::Analysis::new(&lexed);
        let mut cache = crate::sql::analysis::FactsCache::default();
        analysis.facts(&mut cache).iter().all(|f| {
            !f.audit.unanalysed
                && f.audit
                    .relations
                    .iter()
                    .all(|parts| !policy.may_be_masked(parts))
        })
    }

    /// The SQL of the request whose reply is arriving: a Query's string, or the statement
    /// of the portal an Execute runs.
    fn answering_sql(&self) -> Option<Arc<str>> {
        match self.pending.front()? {
            Pending::Query { sql, .. } => Some(sql.clone()),
            Pending::Execute { portal } => self.portals.get(portal).map(|p| p.sql.clone()),
            _ => None,
        }
    }

    fn answering_hidden_describe(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Describe { hidden: true, .. })
        )
    }

    /// For a masked session, before an Execute of `portal` is forwarded: when pgveil will
    /// not know the shape of its rows (the client described neither the portal nor its
    /// statement, as drivers do that cache descriptions), pgveil's own Describe of the
    /// portal, whose reply the client never sees. `None` when the shape will be known.
    pub fn describe_before_execute(&mut self, portal: &str) -> Option<Frame> {
        if self.policy.is_none() || self.shape_will_be_known(portal) {
            return None;
        }
        self.pending.push_back(Pending::Describe {
            target: Target::Portal,
            name: Name::new(portal),
            hidden: true,
        });
        Some(crate::protocol::write::describe(b'P', portal))
    }

    /// Whether the rows of `portal`, run after every request sent so far, will have a
    /// known shape: described as a portal, or its statement described, before then.
    fn shape_will_be_known(&self, portal: &str) -> bool {
        let mut statement = None;
        for p in self.sent_newest_first() {
            match p {
                Pending::Describe {
                    target: Target::Portal,
                    name,
                    ..
                } if name == portal && statement.is_none() => return true,
                Pending::Bind {
                    portal: bound,
                    statement: s,
                    ..
                } if bound == portal && statement.is_none() => statement = Some(s.clone()),
                Pending::Describe {
                    target: Target::Statement,
                    name,
                    ..
                } if statement.as_ref() == Some(name) => return true,
                Pending::Parse(name, _) if statement.as_ref() == Some(name) => return false,
                _ => {}
            }
        }
        let statement = match statement {
            Some(s) => s,
            None => match self.portals.get(portal) {
                Some(p) if p.rows.is_some() => return true,
                Some(p) => p.statement.clone(),
                None => return false,
            },
        };
        self.statements
            .get(&statement)
            .is_some_and(|s| s.rows.is_some())
    }

    /// Whether pgveil may send its own catalog query now: nothing in flight, and the
    /// session idle or in a transaction block that has not failed (inside a block the
    /// query runs in a savepoint it rolls back: see [`Self::in_block`]).
    pub fn can_read_catalog(&self) -> bool {
        self.pending.is_empty()
            && matches!(
                self.transaction,
                Some(TransactionStatus::Idle | TransactionStatus::InBlock)
            )
    }

    /// Whether requests are in flight that end where the server answers without more from
    /// the client (a simple query, a Sync; not a COPY waiting for the client's data):
    /// waiting for them to complete cannot wait forever.
    pub fn in_flight_settles(&self) -> bool {
        !self.copy_in
            && self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Query { .. } | Pending::Sync | Pending::Catalog))
    }

    /// Whether nothing is in flight.
    pub fn settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the session is inside a transaction block that has not failed.
    pub fn in_block(&self) -> bool {
        self.transaction == Some(TransactionStatus::InBlock)
    }

    /// Starts pgveil's own reading of the catalog: the caller sends
    /// [`crate::catalog::CATALOG_QUERY`] after every request in flight.
    pub fn start_catalog_read(&mut self) {
        self.pending.push_back(Pending::Catalog);
        self.catalog_read = CatalogRead::Reading(Default::default(), false);
    }

    /// Starts pgveil's probe for what pending masks name: the caller sends the probe.
    pub fn start_pending_probe(&mut self) {
        self.pending.push_back(Pending::Catalog);
        self.catalog_read = CatalogRead::Probing(false);
    }

    /// Whether the server's replies now arriving answer pgveil's catalog query.
    pub fn reading_catalog(&self) -> bool {
        self.pending.front() == Some(&Pending::Catalog)
    }

    /// One reply to pgveil's catalog query (see [`Self::reading_catalog`]); at its
    /// ReadyForQuery the catalog is read.
    pub fn on_catalog_reply(&mut self, tag: u8, row: Option<&[Option<&[u8]>]>) {
        if let CatalogRead::Probing(found) = &mut self.catalog_read {
            match tag {
                b'D' | b'E' => *found = true,
                b'Z' => {
                    self.pending.pop_front();
                    self.catalog_read = CatalogRead::Probed(*found);
                }
                _ => {}
            }
            return;
        }
        let CatalogRead::Reading(rows, failed) = &mut self.catalog_read else {
            return;
        };
        match (tag, row) {
            (b'D', Some(cols)) => rows.push(cols),
            (b'E', _) => *failed = true,
            (b'Z', _) => {
                self.pending.pop_front();
                let CatalogRead::Reading(rows, failed) = std::mem::take(&mut self.catalog_read)
                else {
                    return;
                };
                self.catalog_read = CatalogRead::Done((!failed).then(|| rows.finish()));
            }
            _ => {}
        }
    }

    /// Sets the transaction status from ReadyForQuery; portals end with the transaction.
    pub fn on_ready(&mut self, status: TransactionStatus) {
        if status == TransactionStatus::Idle {
            self.portals.clear();
        }
        self.transaction = Some(status);
    }

    fn executing_shape(&self) -> Option<RowShape> {
        match self.pending.front() {
            Some(Pending::Execute { portal }) => self
                .portals
                .get(portal)
                .and_then(|p| p.rows.clone())
                .flatten(),
            _ => None,
        }
    }

    fn complete_parse(&mut self) {
        match self.pending.pop_front() {
            Some(Pending::Parse(name, stmt)) => {
                self.statements.insert(name, stmt);
            }
            _ => self.unmatched += 1,
        }
    }

    fn complete_bind(&mut self) {
        match self.pending.pop_front() {
            Some(Pending::Bind {
                portal,
                statement,
                result_formats,
                recorded,
                copy,
            }) => {
                let (sql, rows, settings, limited) = match self.statements.get(&statement) {
                    Some(s) => (
                        s.sql.clone(),
                        s.rows.clone(),
                        s.settings.clone(),
                        s.limited.clone(),
                    ),
                    None => (Arc::from(""), None, SettingsChange::default(), None),
                };
                self.portals.insert(
                    portal,
                    Portal {
                        statement,
                        sql,
                        result_formats,
                        rows,
                        recorded,
                        settings,
                        limited,
                        copy,
                    },
                );
            }
            _ => self.unmatched += 1,
        }
    }

    fn complete_close(&mut self) {
        match self.pending.pop_front() {
            Some(Pending::Close { target, name }) => match target {
                Target::Statement => {
                    self.statements.remove(&name);
                }
                Target::Portal => {
                    self.portals.remove(&name);
                }
            },
            _ => self.unmatched += 1,
        }
    }

    fn complete_describe(&mut self, shape: Option<Option<RowShape>>) {
        let described = shape.unwrap_or(None);
        // A RowDescription inside a simple Query or an Execute is not a Describe reply.
        let Some(Pending::Describe { target, name, .. }) = self.pending.front() else {
            return;
        };
        match target {
            Target::Statement => {
                if let Some(s) = self.statements.get_mut(name) {
                    s.rows = Some(described);
                }
            }
            // A portal's description is its statement's (the formats aside, which every
            // later portal takes from its own Bind): a driver that described the first
            // portal need not describe the statement's later ones.
            Target::Portal => {
                if let Some(p) = self.portals.get_mut(name) {
                    p.rows = Some(described.clone());
                    if let Some(s) = self.statements.get_mut(&p.statement) {
                        s.rows.get_or_insert(described);
                    }
                }
            }
        }
        self.pending.pop_front();
    }

    /// After an error in extended mode the server discards messages until Sync.
    fn on_error(&mut self) {
        self.current_rows = None;
        self.plan = None;
        self.copy_out = None;
        self.request_failed = true;
        if self.pending.front().is_some_and(Pending::is_extended) {
            while self.pending.front().is_some_and(Pending::is_extended) {
                self.pending.pop_front();
            }
        }
    }
}

/// The relations of result columns this catalog does not have, and cannot mask: a
/// relation dropped and created again under a masked name, one the session created since
/// the catalog was read (unless among `own`), or a known relation's column added since.
/// A column added to a known relation counts as that relation, never the session's own.
fn unknown_origins(
    shape: &[FieldDescription],
    catalog: &crate::catalog::Catalog,
    own: &std::collections::HashSet<u32>,
) -> Result<Vec<u32>, UnknownRows> {
    // Relations below this OID are PostgreSQL's own.
    const FIRST_NORMAL_OID: u32 = 16384;
    let mut unknown = Vec::new();
    for f in shape {
        if f.table_oid < FIRST_NORMAL_OID || own.contains(&f.table_oid) {
            continue;
        }
        match catalog.by_oid(f.table_oid) {
            Some(r) if f.column <= 0 || r.columns.iter().any(|c| c.attnum == f.column) => {}
            // A new column of a relation the catalog has: never the session's own.
            Some(_) => return Err(UnknownRows::UnknownOrigin),
            None => unknown.push(f.table_oid),
        }
    }
    Ok(unknown)
}

/// Whether a statement could change the session's settings (client_encoding above all):
/// SET NAMES, anything naming client_encoding or set_config, and statements that reset
/// settings or end a transaction or savepoint (which undoes SET LOCAL and SET), run code
/// pgveil does not see, or cannot be read.
fn may_change_settings(sql: &str) -> bool {
    use crate::sql::lex::{lex, Kind};
    let Ok(lexed) = lex(sql, Strings::Standard) else {
        return true;
    };
    // A setting or function may be named quoted ("client_encoding", U&"set_config");
    // NAMES is a keyword, so unquoted only.
    let anywhere = lexed.tokens.iter().any(|t| match t.kind {
        Kind::Word => matches!(
            t.folded().as_ref(),
            "client_encoding" | "names" | "set_config"
        ),
        Kind::QuotedIdent => matches!(t.value.as_ref(), "client_encoding" | "set_config"),
        _ => false,
    });
    anywhere
        || lexed.statements().iter().any(|r| {
            lexed.within(r).first().is_some_and(|t| {
                t.kind == Kind::Word
                    && matches!(
                        t.folded().as_ref(),
                        "reset"
                            | "discard"
                            | "rollback"
                            | "abort"
                            | "commit"
                            | "end"
                            | "do"
                            | "call"
                    )
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_foreign_while_a_change_is_in_flight() {
        let params = |enc: &str| HashMap::from([("client_encoding".into(), enc.into())]);
        let mut s = SessionState::new(params("UTF8"));
        assert_eq!(s.foreign_encoding(), None);
        s.on_client(&FrontendMessage::Query {
            sql: "SELECT 'no change'",
        });
        assert_eq!(s.foreign_encoding(), None);
        s.on_client(&FrontendMessage::Query {
            sql: "SET client_encoding = 'SJIS'",
        });
        assert_eq!(s.foreign_encoding().as_deref(), Some("possibly changing"));
        for (tag, status) in [(b'C', None), (b'Z', Some(TransactionStatus::Idle))] {
            for _ in 0..2 {
                s.on_server(tag, None);
                if let Some(st) = status {
                    s.on_ready(st);
                }
            }
        }
        assert_eq!(s.foreign_encoding(), None);
        s.server_params = params("SJIS");
        assert_eq!(s.foreign_encoding().as_deref(), Some("SJIS"));
        for sql in [
            "ROLLBACK",
            "RESET ALL",
            "SELECT set_config('a', 'b', false)",
            "SET NAMES 'x'",
            "SET \"client_encoding\" = 'SJIS'",
            "SET SESSION U&\"client\\005fencoding\" TO 'SJIS'",
            "SELECT \"set_config\"('client_encoding', 'SJIS', false)",
        ] {
            assert!(may_change_settings(sql), "{sql}");
        }
        assert!(!may_change_settings("SELECT CASE WHEN true THEN 1 END"));
    }

    fn field(name: &str) -> FieldDescription {
        FieldDescription {
            name: name.into(),
            table_oid: 1,
            column: 1,
            type_oid: 25,
            type_len: -1,
            type_mod: -1,
            format: 0,
        }
    }

    fn parse<'a>(name: &'a str, sql: &'a str) -> FrontendMessage<'a> {
        FrontendMessage::Parse {
            statement: name,
            sql,
            param_types: vec![],
        }
    }

    fn bind<'a>(portal: &'a str, statement: &'a str, formats: Vec<i16>) -> FrontendMessage<'a> {
        FrontendMessage::Bind {
            portal,
            statement,
            result_formats: formats.into_iter().collect(),
        }
    }

    #[test]
    fn pipelined_prepare_bind_execute_knows_shape_and_formats() {
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&parse("s1", "SELECT phone FROM customers"));
        s.on_client(&FrontendMessage::Describe {
            target: Target::Statement,
            name: "s1",
        });
        s.on_client(&FrontendMessage::Sync);
        s.on_client(&bind("p1", "s1", vec![1]));
        s.on_client(&FrontendMessage::Execute {
            portal: "p1",
            max_rows: 0,
        });
        s.on_client(&FrontendMessage::Sync);
        assert!(!s.is_idle());

        assert_eq!(s.on_server(b'1', None), Reply::Other);
        s.on_server(b't', None);
        assert!(matches!(
            s.on_server(b'T', Some(vec![field("phone")])),
            Reply::Rows(Some(_))
        ));
        s.on_server(b'Z', None);
        s.on_ready(TransactionStatus::Idle);
        s.on_server(b'2', None);
        let portal = s.portal("p1").unwrap();
        assert_eq!(portal.format_of(0), 1);
        let Reply::Rows(Some(shape)) = s.on_server(b'D', None) else {
            panic!("rows of an Execute must have the statement's shape")
        };
        assert_eq!(shape[0].name, "phone");
        s.on_server(b'C', None);
        s.on_server(b'Z', None);
        s.on_ready(TransactionStatus::Idle);
        assert!(s.is_idle());
        assert_eq!(s.unmatched, 0);
        assert!(s.portal("p1").is_none(), "portals end with the transaction");
        assert!(s.statement("s1").is_some());
    }

    #[test]
    fn error_in_batch_skips_to_sync_and_registers_nothing() {
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&parse("bad", "SELEC 1"));
        s.on_client(&bind("p", "bad", vec![]));
        s.on_client(&FrontendMessage::Execute {
            portal: "p",
            max_rows: 0,
        });
        s.on_client(&FrontendMessage::Sync);
        s.on_server(b'E', None);
        s.on_server(b'Z', None);
        assert!(s.is_idle());
        assert!(s.statement("bad").is_none());
        assert_eq!(s.unmatched, 0);
    }

    #[test]
    fn simple_query_with_several_results() {
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&FrontendMessage::Query {
            sql: "SELECT 1; SELECT 2",
        });
        for _ in 0..2 {
            assert!(matches!(
                s.on_server(b'T', Some(vec![field("a")])),
                Reply::Rows(Some(_))
            ));
            assert!(matches!(s.on_server(b'D', None), Reply::Rows(Some(_))));
            s.on_server(b'C', None);
        }
        assert!(!s.is_idle());
        s.on_server(b'Z', None);
        assert!(s.is_idle());
        assert_eq!(s.unmatched, 0);
    }

    #[test]
    fn syncs_sent_into_copy_in_are_ignored_like_the_server_does() {
        // tokio-postgres: Bind, Execute, Sync; then data, CopyDone, Sync.
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&bind("", "s", vec![]));
        s.on_client(&FrontendMessage::Execute {
            portal: "",
            max_rows: 0,
        });
        s.on_client(&FrontendMessage::Sync);
        s.on_server(b'2', None);
        assert_eq!(s.on_copy_in().ok(), Some(1));
        s.on_client(&FrontendMessage::CopyData);
        s.on_client(&FrontendMessage::CopyDone);
        s.on_client(&FrontendMessage::Sync);
        s.on_server(b'C', None);
        s.on_server(b'Z', None);
        assert!(s.is_idle(), "{:?}", s.pending().collect::<Vec<_>>());
        assert_eq!(s.unmatched, 0);
        // CopyDone already sent when CopyInResponse arrives.
        s.on_client(&FrontendMessage::Query {
            sql: "COPY t FROM STDIN",
        });
        s.on_client(&FrontendMessage::CopyData);
        s.on_client(&FrontendMessage::CopyDone);
        assert_eq!(s.on_copy_in().ok(), Some(0));
        s.on_server(b'C', None);
        s.on_server(b'Z', None);
        assert!(s.is_idle(), "{:?}", s.pending().collect::<Vec<_>>());
    }

    #[test]
    fn requests_sent_into_copy_in_are_refused_not_lost() {
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&FrontendMessage::Query {
            sql: "COPY t FROM STDIN",
        });
        s.on_client(&FrontendMessage::Query { sql: "SELECT 1" });
        assert!(matches!(s.on_copy_in(), Err(ProtocolError::IntoCopy)));
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&FrontendMessage::Query {
            sql: "COPY t FROM STDIN",
        });
        assert_eq!(s.on_copy_in().ok(), Some(0));
        assert!(s.check_copy_stream(&FrontendMessage::CopyData).is_ok());
        assert!(matches!(
            s.check_copy_stream(&FrontendMessage::Query { sql: "SELECT 1" }),
            Err(ProtocolError::IntoCopy)
        ));
        s.on_client(&FrontendMessage::CopyDone);
        assert!(s
            .check_copy_stream(&FrontendMessage::Query { sql: "SELECT 1" })
            .is_ok());
    }

    #[test]
    fn close_removes_statement() {
        let mut s = SessionState::new(HashMap::new());
        s.on_client(&parse("s", "SELECT 1"));
        s.on_client(&FrontendMessage::Close {
            target: Target::Statement,
            name: "s",
        });
        s.on_client(&FrontendMessage::Sync);
        s.on_server(b'1', None);
        assert!(s.statement("s").is_some());
        s.on_server(b'3', None);
        s.on_server(b'Z', None);
        assert!(s.statement("s").is_none());
        assert_eq!(s.unmatched, 0);
    }
}
