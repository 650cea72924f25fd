//! The Ready phase: two pumps in one task, client → server and server → client, sharing
//! the session state. Frames are read in batches and written with one write per batch;
//! each frame is forwarded as the bytes it arrived in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::proxy::{shutdown_level, ShutdownWatch};
use crate::sessions::Activity;
use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::encoding::transcode;
use super::error::{already_reported, SessionError};
use super::reload::PolicyRefresh;
use super::rows::MaskPlan;
use super::screen::{forward, screen, Screened};
use super::state::{CatalogRead, LimitedReply, Reply, SessionState, UnknownRows};
use super::{BoxRead, Legs};
use crate::protocol::backend::{self, TransactionStatus};
use crate::protocol::frontend::FrontendMessage;
use crate::protocol::{write, Frame, FrameReader, SqlState};
use std::sync::Arc;

/// How the relay ended without an error to report.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated,
    /// The server ended the session with a FATAL error the client has received.
    ServerClosed,
}

/// Relays until one side ends or the proxy stops.
pub async fn run(
    legs: &mut Legs,
    state: &Mutex<SessionState>,
    refresh: PolicyRefresh,
    idle_timeout: Option<Duration>,
    shutdown: &ShutdownWatch<'_>,
) -> Result<RelayEnd, SessionError> {
    // Set while a pump is part-way through writing to the client, so that no error frame
    // is written into the middle of another message afterwards.
    let client_dirty = AtomicBool::new(false);
    // Set once shutdown begins; each pump then ends the session when nothing is running.
    let draining = AtomicBool::new(false);
    let client_partial = AtomicBool::new(false);
    // Wakes the client side when pgveil's own catalog query has its answer.
    let catalog_ready = Notify::new();
    let c2s = client_to_server(
        &mut legs.client_r,
        &mut legs.upstream_w,
        state,
        refresh,
        idle_timeout,
        &draining,
        &client_partial,
        &catalog_ready,
    );
    let s2c = server_to_client(
        &mut legs.upstream_r,
        &mut legs.client_w,
        state,
        &client_dirty,
        &draining,
        &catalog_ready,
    );
    tokio::pin!(c2s, s2c);
    let mut level = shutdown_level::RUNNING;
    let result = loop {
        tokio::select! {
            // Fixed order: no per-wake random number, and replies first.
            biased;
            r = &mut s2c => break r,
            r = &mut c2s => break r,
            seen = shutdown.above(level) => {
                level = seen;
                if level == shutdown_level::KILLED {
                    break Err(SessionError::Killed);
                }
                if level >= shutdown_level::STOP {
                    break Err(SessionError::Shutdown);
                }
                draining.store(true, Ordering::Relaxed);
                let idle = lock(state).is_idle();
                if idle && !client_partial.load(Ordering::Relaxed) {
                    break Err(SessionError::Shutdown);
                }
            }
        }
    };
    if client_dirty.load(Ordering::Acquire) && result.is_err() {
        return Err(SessionError::Reported(already_reported()));
    }
    result
}

/// How long pgveil waits, after the client went away, for the server to answer what it
/// was already running.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// After the client went away with requests in flight: the server still runs them (it
/// does not look at a connection while it executes), so pgveil reads its replies,
/// forwarding nothing, until it has answered them all or `limit` passes. The records of
/// those statements then say what the server did (a DELETE that committed is recorded
/// with its rows), not that the client left.
pub async fn drain(
    upstream: &mut FrameReader<BoxRead>,
    state: &Mutex<SessionState>,
    limit: Duration,
) {
    let answered = async {
        while !lock(state).is_idle() {
            let Ok(frame) = upstream.next().await else {
                return;
            };
            let mut st = lock(state);
            if on_server_frame(&mut st, &frame).is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(limit, answered).await;
}

fn lock(state: &Mutex<SessionState>) -> std::sync::MutexGuard<'_, SessionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn client_to_server(
    client: &mut FrameReader<BoxRead>,
    upstream: &mut (impl AsyncWrite + Unpin),
    state: &Mutex<SessionState>,
    mut refresh: PolicyRefresh,
    idle_timeout: Option<Duration>,
    draining: &AtomicBool,
    client_partial: &AtomicBool,
    catalog_ready: &Notify,
) -> Result<RelayEnd, SessionError> {
    // Grows with what the session sends; kept small for the many that send little.
    let mut out = BytesMut::with_capacity(1024);
    let live = lock(state).live.clone();
    loop {
        let (idle, outside_tx) = {
            let st = lock(state);
            (
                st.is_idle() && !client.has_partial(),
                st.transaction != Some(TransactionStatus::InBlock),
            )
        };
        if idle && draining.load(Ordering::Relaxed) {
            return Err(SessionError::Shutdown);
        }
        client_partial.store(client.has_partial(), Ordering::Relaxed);
        let first = match idle_timeout.filter(|_| idle && outside_tx) {
            Some(limit) => tokio::time::timeout(limit, client.next())
                .await
                .map_err(|_| SessionError::IdleTimeout)?,
            None => client.next().await,
        }
        .map_err(SessionError::from_client)?;
        let mut terminated = false;
        // A schema check that is due cannot run while requests are in flight; screening
        // the batch without it would judge it by a schema known to be out of date (a
        // client that sends its next batch as soon as it has an error, before the
        // ReadyForQuery, would have a renamed table read in clear). When the server will
        // answer what is in flight without more from the client, wait for it.
        loop {
            let waits = {
                let mut st = lock(state);
                // (Once nothing is in flight, a failed block reads nothing until its
                // ROLLBACK: that is not waited for.)
                st.awaiting_idle = refresh.schema_check_due(&st) && st.in_flight_settles();
                st.awaiting_idle
            };
            if !waits {
                break;
            }
            catalog_ready.notified().await;
        }
        let catalog = {
            let mut st = lock(state);
            if refresh.changed() {
                refresh
                    .refresh(&mut st)
                    .map_err(|message| SessionError::Refused {
                        code: SqlState::ADMIN_SHUTDOWN,
                        message,
                    })?;
                if let Some(live) = &st.live {
                    live.set_policy(st.policy.is_some(), st.guard.is_some());
                }
            }
            match refresh.catalog_wanted(&mut st) {
                true => Some(None),
                false => refresh.pending_probe(&st).map(Some),
            }
        };
        let read = match catalog {
            Some(None) => true,
            // An extended-protocol batch carries the probe at its head, in its own
            // implicit transaction, with no round trip of its own.
            Some(Some(probe))
                if matches!(first.tag(), b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S') =>
            {
                lock(state).pipeline_probe(&probe, &mut out);
                false
            }
            Some(Some(probe)) => hidden_query(state, upstream, &probe, catalog_ready).await?,
            None => false,
        };
        if read {
            read_catalog(state, upstream, &mut refresh, catalog_ready).await?;
        }
        let mut frame = Some(first);
        // Whether the message in `frame` was screened once already, before pgveil read
        // the catalog again for it.
        let mut again = false;
        while frame.is_some() {
            let wanted = {
                let mut st = lock(state);
                let mut wanted = false;
                while let Some(f) = frame.take() {
                    // Text in a client_encoding other than UTF-8 is read converted; the
                    // client's bytes are what the server gets.
                    let mut transcoded = st.client_encoding().and_then(|e| transcode(&f, e));
                    if transcoded.is_none() && FrontendMessage::parse(&f).is_err() {
                        // Not UTF-8 under UTF8: the server refuses it; read it as far as
                        // it can be read, so that it is recorded and judged, not fatal.
                        transcoded = transcode(&f, "UTF8");
                    }
                    let read = transcoded.as_ref().map_or(&f, |t| &t.frame);
                    let converted = transcoded.as_ref().and_then(|t| t.sql.as_ref());
                    let msg = FrontendMessage::parse(read).map_err(SessionError::Client)?;
                    st.check_copy_stream(&msg).map_err(SessionError::Client)?;
                    if msg == FrontendMessage::Terminate {
                        terminated = true;
                        out.extend_from_slice(f.raw());
                        break;
                    }
                    if st.policy.is_some()
                        || st.guard.is_some()
                        || st.audit.as_ref().is_some_and(|a| a.may_block())
                    {
                        if screen(&mut st, &msg, &f, &mut out, !again, converted)
                            == Screened::CatalogWanted
                        {
                            // Refused for naming what the catalog does not have: read it
                            // again, then screen the same message once more.
                            frame = Some(f);
                            wanted = true;
                            break;
                        }
                    } else {
                        forward(&mut st, &msg, f.raw(), &mut out, converted);
                    }
                    again = false;
                    frame = client.buffered().map_err(SessionError::Client)?;
                }
                note_activity(&st);
                wanted
            };
            if wanted {
                upstream
                    .write_all(&out)
                    .await
                    .map_err(SessionError::upstream)?;
                out.clear();
                read_catalog(state, upstream, &mut refresh, catalog_ready).await?;
                again = true;
            }
        }
        client_partial.store(client.has_partial(), Ordering::Relaxed);
        if let Some(live) = &live {
            live.counters.received(out.len());
        }
        upstream
            .write_all(&out)
            .await
            .map_err(SessionError::upstream)?;
        out.clear();
        if terminated {
            return Ok(RelayEnd::Terminated);
        }
    }
}

/// Reads the catalog again on the session's connection (nothing in flight: see
/// `PolicyRefresh::catalog_wanted`), with pgveil's own query whose replies the client
/// never sees, and puts it in force for the session. Inside a transaction block the query
/// runs in a savepoint; if it fails there, the block is put back as it was.
async fn read_catalog(
    state: &Mutex<SessionState>,
    upstream: &mut (impl AsyncWrite + Unpin),
    refresh: &mut PolicyRefresh,
    catalog_ready: &Notify,
) -> Result<(), SessionError> {
    let (version, in_block) = {
        let mut st = lock(state);
        st.start_catalog_read();
        (refresh.version_now(&st), st.in_block())
    };
    let query = match in_block {
        true => std::borrow::Cow::Owned(crate::catalog::catalog_query_in_block()),
        false => std::borrow::Cow::Borrowed(crate::catalog::CATALOG_QUERY),
    };
    upstream
        .write_all(write::query(&query).raw())
        .await
        .map_err(SessionError::upstream)?;
    let read = loop {
        catalog_ready.notified().await;
        let mut st = lock(state);
        if let CatalogRead::Done(read) = std::mem::take(&mut st.catalog_read) {
            break read;
        }
    };
    if in_block && read.is_none() {
        hidden_query(
            state,
            upstream,
            crate::catalog::CATALOG_RECOVERY,
            catalog_ready,
        )
        .await?;
    }
    // What a block reads may not be committed (or may never be): for this session only.
    refresh
        .adopt_catalog(&mut lock(state), read.map(Arc::new), version, !in_block)
        .map_err(|message| SessionError::Refused {
            code: SqlState::ADMIN_SHUTDOWN,
            message,
        })
}

/// Runs a query of pgveil's own, its replies hidden from the client: whether a row (or
/// an error) came back. The probe for what pending masks name (see
/// `PolicyRefresh::pending_probe`) is one.
async fn hidden_query(
    state: &Mutex<SessionState>,
    upstream: &mut (impl AsyncWrite + Unpin),
    query: &str,
    catalog_ready: &Notify,
) -> Result<bool, SessionError> {
    lock(state).start_pending_probe();
    upstream
        .write_all(write::query(query).raw())
        .await
        .map_err(SessionError::upstream)?;
    loop {
        catalog_ready.notified().await;
        let mut st = lock(state);
        if let CatalogRead::Probed(found) = st.catalog_read {
            st.catalog_read = CatalogRead::Idle;
            return Ok(found);
        }
    }
}

/// The most reply bytes held back while statement records wait for their batch's end.
const HOLD_LIMIT: usize = 1024 * 1024;

async fn server_to_client(
    upstream: &mut FrameReader<BoxRead>,
    client: &mut (impl AsyncWrite + Unpin),
    state: &Mutex<SessionState>,
    client_dirty: &AtomicBool,
    draining: &AtomicBool,
    catalog_ready: &Notify,
) -> Result<RelayEnd, SessionError> {
    // Grows to the largest batch of replies (bounded below) and keeps that size.
    let mut out = BytesMut::with_capacity(4 * 1024);
    let mut scratch = Vec::new();
    let live = lock(state).live.clone();
    loop {
        let first = upstream.next().await.map_err(|e| {
            if e.is_disconnect() {
                SessionError::Upstream("the server closed the connection".into())
            } else {
                SessionError::upstream(e)
            }
        })?;
        let mut fatal = false;
        // Records of the statements this batch completes, written before it is released.
        let records = {
            let mut st = lock(state);
            let mut frame = Some(first);
            while let Some(f) = frame {
                match on_server_frame(&mut st, &f)? {
                    Action::Forward => out.extend_from_slice(f.raw()),
                    Action::Fatal => {
                        out.extend_from_slice(f.raw());
                        fatal = true;
                    }
                    Action::Swallow => {}
                    Action::Replace(frame) => out.extend_from_slice(frame.raw()),
                    Action::Mask(plan) => {
                        plan.rewrite(&f, &mut out, &mut scratch)
                            .map_err(SessionError::upstream)?;
                    }
                    Action::MaskCopy => {
                        st.copy_data(&f, &mut out)
                            .map_err(|e| SessionError::Refused {
                                code: SqlState::INSUFFICIENT_PRIVILEGE,
                                message: format!("pgveil: {e}"),
                            })?;
                    }
                }
                // Bound the batch so a fast server cannot grow it without limit.
                if fatal || out.len() >= 256 * 1024 {
                    break;
                }
                frame = upstream.buffered().map_err(SessionError::upstream)?;
            }
            if matches!(
                st.catalog_read,
                CatalogRead::Done(_) | CatalogRead::Probed(_)
            ) || (st.awaiting_idle && st.settled())
            {
                st.awaiting_idle = false;
                catalog_ready.notify_one();
            }
            note_activity(&st);
            // Records that wait for their batch's end keep the replies after them waiting
            // too (the end is on its way), up to a bound.
            if let Some(a) = st.audit.as_mut().filter(|a| a.holding()) {
                if !fatal && out.len() < HOLD_LIMIT {
                    continue;
                }
                a.release_held();
            }
            st.audit
                .as_mut()
                .filter(|a| a.has_completed())
                .map(|a| (a.take_completed(), a.log().cloned()))
        };
        if let Some((records, Some(log))) = records {
            // The reply that completed these statements waits until they are written.
            log.write(records)
                .await
                .map_err(|e| SessionError::Refused {
                    code: SqlState::IO_ERROR,
                    message: format!("pgveil: {e}"),
                })?;
        }
        if let Some(live) = &live {
            live.counters.sent(out.len());
        }
        client_dirty.store(true, Ordering::Release);
        client
            .write_all(&out)
            .await
            .map_err(|e| SessionError::from_client(e.into()))?;
        client_dirty.store(false, Ordering::Release);
        out.clear();
        if fatal {
            return Ok(RelayEnd::ServerClosed);
        }
        if draining.load(Ordering::Relaxed) && lock(state).is_idle() {
            return Err(SessionError::Shutdown);
        }
    }
}

/// Shows the admin console what the session is doing.
fn note_activity(st: &SessionState) {
    let Some(live) = &st.live else { return };
    live.set_activity(match st.transaction {
        _ if !st.is_idle() => Activity::Active,
        Some(TransactionStatus::InBlock) => Activity::IdleInTransaction,
        Some(TransactionStatus::Failed) => Activity::IdleInFailedTransaction,
        _ => Activity::Idle,
    });
}

/// What to do with one server frame.
enum Action {
    Forward,
    /// A FATAL error: forward it, then end the session.
    Fatal,
    /// A reply to a message pgveil injected.
    Swallow,
    /// A DataRow to rewrite with this plan.
    Mask(Arc<MaskPlan>),
    /// A CopyData of a masked session, to rewrite with its COPY's plan.
    MaskCopy,
    /// Send this frame instead.
    Replace(Frame),
}

/// Updates the state for one server frame and decides what reaches the client.
fn on_server_frame(st: &mut SessionState, f: &Frame) -> Result<Action, SessionError> {
    if st.reading_catalog() {
        // pgveil's own catalog query: nothing of it is the client's.
        let row = match f.tag() {
            b'D' => Some(backend::data_row(f).map_err(SessionError::upstream)?),
            _ => None,
        };
        st.on_catalog_reply(f.tag(), row.as_deref());
        return Ok(Action::Swallow);
    }
    let withholding = st.withholding;
    let action = server_frame_action(st, f)?;
    if !withholding || matches!(action, Action::Fatal) {
        return Ok(action);
    }
    // After rows pgveil could not forward: nothing more until ReadyForQuery.
    if f.tag() == b'Z' {
        st.withholding = false;
        return Ok(Action::Forward);
    }
    Ok(Action::Swallow)
}

fn server_frame_action(st: &mut SessionState, f: &Frame) -> Result<Action, SessionError> {
    if st.answering_probe() {
        // pgveil's schema probe at the head of the batch: its error is the batch's.
        match f.tag() {
            b'E' => {
                let frame = st.probe_failed(f);
                return Ok(match reply_action(st, &frame)? {
                    Action::Forward => Action::Replace(frame),
                    other => other,
                });
            }
            b'1' | b'2' | b'3' | b'C' => {
                st.probe_replied();
                return Ok(Action::Swallow);
            }
            _ => {}
        }
    }
    if st.limits_in_use {
        // A statement sent wrapped to count its rows: its replies become its own.
        match st.limited_reply(f).map_err(SessionError::upstream)? {
            LimitedReply::Same => {}
            LimitedReply::Swallow => return Ok(Action::Swallow),
            LimitedReply::Replace(frame) => {
                return Ok(match reply_action(st, &frame)? {
                    Action::Forward => Action::Replace(frame),
                    other => other,
                })
            }
        }
    }
    reply_action(st, f)
}

/// [`server_frame_action`] for a reply as the client is to see it.
fn reply_action(st: &mut SessionState, f: &Frame) -> Result<Action, SessionError> {
    match f.tag() {
        // DataRow: the hot path. Sessions without masks forward it untouched.
        b'D' => {
            if let Some(a) = st.audit.as_mut() {
                a.on_data_row();
            }
            if st.policy.is_none() {
                return Ok(Action::Forward);
            }
            if st.withholding {
                return Ok(Action::Swallow);
            }
            return match st.row_plan() {
                Ok(Some(plan)) => Ok(Action::Mask(plan)),
                Ok(None) => Ok(Action::Forward),
                Err(UnknownRows::UnknownOrigin) => {
                    // The relation changed since pgveil read the catalog: its rows may be
                    // masked under a name pgveil does not know yet. The client gets an
                    // error instead of them; the catalog is read before the next statement.
                    st.withholding = true;
                    if let Some(p) = st.policy.as_mut() {
                        p.catalog_wanted = true;
                    }
                    Ok(Action::Replace(write::error_response(
                        write::Severity::Error,
                        SqlState::INSUFFICIENT_PRIVILEGE,
                        "pgveil: the result comes from a relation that changed since pgveil read the catalog; its rows are withheld and pgveil reads the catalog again: run the statement again",
                    )))
                }
                Err(UnknownRows::Undescribed) => Err(SessionError::Refused {
                    code: SqlState::INSUFFICIENT_PRIVILEGE,
                    message: "pgveil: result rows arrived without a row description; a masked session cannot forward them".into(),
                }),
            };
        }
        b'T' => {
            let rows = backend::row_description(f).map_err(SessionError::upstream)?;
            if st.on_server(b'T', Some(rows)) == Reply::Swallow {
                return Ok(Action::Swallow);
            }
        }
        b'Z' => {
            let status = backend::ready_for_query(f).map_err(SessionError::upstream)?;
            if let Some(a) = st.audit.as_mut() {
                a.on_ready(status);
            }
            // A schema change others may have read around before it committed.
            if st.schema_changed && status != TransactionStatus::InBlock {
                st.schema_changed = false;
                if let Some(version) = &st.catalog_version {
                    version.changed();
                }
            }
            st.on_server(b'Z', None);
            st.on_ready(status);
        }
        b'S' => {
            let (k, v) = backend::parameter_status(f).map_err(SessionError::upstream)?;
            st.server_params.insert(k.to_string(), v.to_string());
        }
        b'E' => {
            st.on_server(b'E', None);
            let (code, severity) = backend::error_code_and_severity(f);
            if let Some(a) = st.audit.as_mut() {
                a.on_error(&code);
            }
            if severity == "FATAL" || severity == "PANIC" {
                return Ok(Action::Fatal);
            }
            if let Some(refusal) = own_refusal(&code, f) {
                return Ok(Action::Replace(refusal));
            }
            if st.policy.is_some() {
                return Ok(without_data_fields(f).map_or(Action::Forward, Action::Replace));
            }
        }
        b'N' if st.policy.is_some() => {
            return Ok(without_data_fields(f).map_or(Action::Forward, Action::Replace));
        }
        b'C' => {
            let tag = backend::command_tag(f).unwrap_or_default();
            if changes_schema(tag) {
                if let Some(version) = &st.catalog_version {
                    version.changed();
                }
                st.schema_changed = true;
            }
            let batch_ends = st.batch_end_sent();
            if let Some(a) = st.audit.as_mut() {
                a.on_complete(Some(tag), batch_ends);
            }
            st.on_server(b'C', None);
        }
        // COPY TO rows of a masked session: masked in flight, or withheld.
        b'H' if st.policy.is_some() => {
            let (columns, binary) = backend::copy_response(f).map_err(SessionError::upstream)?;
            if let Err(why) = st.on_copy_out(columns, binary) {
                st.withholding = true;
                return Ok(Action::Replace(write::error_response(
                    write::Severity::Error,
                    SqlState::INSUFFICIENT_PRIVILEGE,
                    &format!("pgveil: {why}; the COPY's rows are withheld"),
                )));
            }
        }
        b'd' if st.policy.is_some() => {
            return Ok(if st.withholding {
                Action::Swallow
            } else {
                Action::MaskCopy
            });
        }
        b'c' if st.policy.is_some() => {
            st.copy_done().map_err(|e| SessionError::Refused {
                code: SqlState::INSUFFICIENT_PRIVILEGE,
                message: format!("pgveil: {e}"),
            })?;
        }
        b'G' => {
            let ignored = st.on_copy_in().map_err(SessionError::Client)?;
            if let Some(a) = st.audit.as_mut() {
                a.on_copy_in(ignored);
                // The server now waits for the client's data: nothing may wait for it.
                a.release_held();
            }
        }
        b'I' | b's' | b'V' => {
            let batch_ends = st.batch_end_sent();
            if let Some(a) = st.audit.as_mut() {
                a.on_complete(None, batch_ends);
            }
            if st.on_server(f.tag(), None) == Reply::Swallow {
                return Ok(Action::Swallow);
            }
        }
        tag => {
            if st.on_server(tag, None) == Reply::Swallow {
                return Ok(Action::Swallow);
            }
        }
    }
    Ok(Action::Forward)
}

/// For masked sessions: an error or notice without the fields in which the server quotes
/// row data (DETAIL: "Failing row contains (...)", "Key (email)=(...)"; CONTEXT: COPY
/// lines, PL/pgSQL variables). `None` when there is nothing to remove.
fn without_data_fields(f: &Frame) -> Option<Frame> {
    let fields = backend::error_fields(f).ok()?;
    if !fields.iter().any(|(k, _)| *k == b'D' || *k == b'W') {
        return None;
    }
    Some(write::frame(f.tag(), |b| {
        for (k, v) in fields.iter().filter(|(k, _)| *k != b'D' && *k != b'W') {
            b.extend_from_slice(&[*k]);
            b.extend_from_slice(v.as_bytes());
            b.extend_from_slice(&[0]);
        }
        if f.tag() == b'E' {
            b.extend_from_slice(
                b"Hpgveil removed the error's detail, which may quote masked data\0",
            );
        }
        b.extend_from_slice(&[0]);
    }))
}

/// A refusal raised through `write::refusal_sql`, without the PL/pgSQL context and
/// source location the server attaches: the client sees what pgveil means to say.
fn own_refusal(code: &str, f: &Frame) -> Option<Frame> {
    if code != SqlState::INSUFFICIENT_PRIVILEGE.code() {
        return None;
    }
    let message = backend::error_message(f)?;
    message.starts_with("pgveil: ").then(|| {
        write::error_response(
            write::Severity::Error,
            SqlState::INSUFFICIENT_PRIVILEGE,
            &message,
        )
    })
}

/// Command tags of statements after which the cached catalog may be out of date.
fn changes_schema(tag: &str) -> bool {
    [
        "CREATE",
        "ALTER",
        "DROP",
        "GRANT",
        "REVOKE",
        "COMMENT",
        "SELECT INTO",
    ]
    .iter()
    .any(|p| tag.starts_with(p))
}
