//! The client side of the relay, message by message: each one is forwarded as it arrived,
//! or, for sessions with a policy (masks, guard, `block` alerts), screened first: a refused
//! statement is replaced by one that makes the server raise the refusal itself, so that
//! transaction state stays in step. The audit hears of every message the server will act on.

use bytes::BytesMut;

use std::borrow::Cow;

use super::audit::Recorded;
use super::encoding::server_text;
use super::policy::Screen;
use super::state::{Discarding, Pending, SessionState};
use crate::policy::{Denied, Refusal, UNANALYSABLE_BY_DEFAULT};
use crate::protocol::frontend::FrontendMessage;
use crate::protocol::{write, Frame};
use crate::sql::lex::{lex, LexError, Lexed};

/// For a masked session: forwards a client message, or replaces a refused one by a
/// statement that makes the server raise the refusal (see `write::refusal_sql`).
pub fn screen(st: &mut SessionState, msg: &FrontendMessage<'_>, raw: &Frame, out: &mut BytesMut) {
    if st.discarding.is_some() {
        // After a refused Parse, as after a server error: skip to Sync. The server raises
        // the refusal itself (unless an earlier error already has it skipping) at the
        // first Flush or Sync, so a client that flushes and waits gets its answer.
        match msg {
            FrontendMessage::Flush | FrontendMessage::Sync => {
                if let Some(message) = st.discarding.as_mut().and_then(|d| d.take_unraised()) {
                    raise_refusal(st, &message, out);
                }
                if *msg == FrontendMessage::Sync {
                    st.discarding = None;
                }
                forward(st, msg, raw.raw(), out);
            }
            _ => {}
        }
        return;
    }
    // The statement as the server reads it, when its client_encoding is not UTF-8.
    let reading = server_reading(st, msg);
    let mut decoded = None;
    let read = reading.apply(msg, &mut decoded);
    let unknown = match &reading {
        Reading::Unknown(encoding) => Some(encoding.as_str()),
        _ => None,
    };
    // Read once, as the server reads it, for the guard and the audit alike.
    let lexed = sql_of(read)
        .filter(|_| unknown.is_none())
        .map(|sql| lex(sql, st.lexing()));
    let screened = match unknown.and_then(|e| unreadable(st, e, msg)) {
        Some(refused) => refused,
        None => match screen_message(st, read, lexed.as_ref()) {
            Screen::Rewrite(_) if matches!(reading, Reading::Decoded(_)) => {
                let encoding = st.foreign_encoding().unwrap_or_default();
                refuse_foreign(
                    st,
                    &encoding,
                    msg,
                    "a rewritten statement would have to be encoded back into it",
                )
                .unwrap_or(Screen::Forward)
            }
            other => other,
        },
    };
    let refusal = match &screened {
        Screen::Refuse(denied) => Some(denied),
        _ => None,
    };
    let recorded = record(st, read, refusal, lexed.as_ref());
    let msg = read;
    match (screened, msg) {
        (Screen::Forward, _) => {
            st.on_client_recorded(msg, recorded);
            out.extend_from_slice(raw.raw());
        }
        (
            Screen::Refuse(denied),
            FrontendMessage::Parse { .. } | FrontendMessage::Execute { .. },
        ) => st.discarding = Some(Discarding::new(denied.message)),
        (Screen::Refuse(denied), _) => {
            let sql = write::refusal_sql(&denied.message);
            st.on_client(&FrontendMessage::Query { sql: &sql });
            out.extend_from_slice(write::query(&sql).raw());
        }
        (
            Screen::Rewrite(sql),
            FrontendMessage::Parse {
                statement,
                param_types,
                ..
            },
        ) => {
            let parse = FrontendMessage::Parse {
                statement,
                sql: &sql,
                param_types: param_types.clone(),
            };
            // Recorded as the client wrote it.
            st.on_client_recorded(&parse, recorded);
            out.extend_from_slice(write::parse_typed(statement, &sql, param_types).raw());
        }
        (Screen::Rewrite(sql), _) => {
            st.on_client(&FrontendMessage::Query { sql: &sql });
            out.extend_from_slice(write::query(&sql).raw());
        }
    }
}

/// The treatment of one client message: the guard first, then masking, then `block`
/// alerts.
fn screen_message(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    lexed: Option<&Result<Lexed<'_>, LexError>>,
) -> Screen {
    let scs = st.lexing();
    match msg {
        FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => {
            let guarded = st.guard.as_mut().map(|g| match lexed {
                Some(lexed) => g.screen_lexed(sql, lexed, scs),
                None => g.screen(sql, scs),
            });
            if let Some(Err(denied)) = guarded {
                return Screen::Refuse(denied);
            }
            let masked = st
                .policy
                .as_mut()
                .map_or(Screen::Forward, |p| match lexed {
                    Some(lexed) => p.screen_lexed(sql, lexed, scs),
                    None => p.screen(sql, scs),
                });
            if matches!(masked, Screen::Refuse(_)) {
                return masked;
            }
            match st.audit.as_mut().and_then(|a| a.alert_block(sql, scs)) {
                Some(denied) => Screen::Refuse(denied),
                None => masked,
            }
        }
        // A statement prepared before the user's window filled up runs no more.
        FrontendMessage::Execute { portal, .. } => {
            let runs = st.portal_as_sent(portal).cloned();
            st.audit
                .as_mut()
                .and_then(|a| a.alert_block_portal(runs.as_ref()))
                .map_or(Screen::Forward, Screen::Refuse)
        }
        // Fast-path calls name functions by OID, beyond the analysis.
        FrontendMessage::FunctionCall => match (&st.policy, &st.guard) {
            (Some(p), _) => Screen::Refuse(Denied {
                message: format!(
                    "pgveil: FUNCTION CALL is not allowed for role \"{}\": fast-path calls cannot be analysed",
                    p.role
                ),
                rule: p
                    .masks
                    .rule_for(None)
                    .map_or_else(|| UNANALYSABLE_BY_DEFAULT.to_string(), |o| o.to_string()),
            }),
            (None, Some(g)) => g
                .screen_unanalysable("a fast-path call names its function by OID")
                .map_or_else(Screen::Refuse, |()| Screen::Forward),
            (None, None) => Screen::Forward,
        },
        _ => Screen::Forward,
    }
}

/// How the server reads the text of a Query or Parse (see `SessionState::foreign_encoding`).
enum Reading {
    /// As pgveil does.
    Same,
    /// Decoded from the client's encoding as the server decodes it.
    Decoded(String),
    /// pgveil cannot tell: the encoding (so named) may be changing, or cannot be decoded.
    Unknown(String),
}

impl Reading {
    /// `msg` as the server reads it: with the decoded text (kept in `slot`) where there
    /// is one, else as it came.
    fn apply<'a>(
        &'a self,
        msg: &'a FrontendMessage<'a>,
        slot: &'a mut Option<FrontendMessage<'a>>,
    ) -> &'a FrontendMessage<'a> {
        match self {
            Reading::Decoded(text) => slot.insert(with_sql(msg, text)),
            _ => msg,
        }
    }
}

fn server_reading(st: &SessionState, msg: &FrontendMessage<'_>) -> Reading {
    let (FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. }) = msg else {
        return Reading::Same;
    };
    if sql.is_ascii() {
        return Reading::Same;
    }
    let Some(encoding) = st.foreign_encoding() else {
        return Reading::Same;
    };
    match server_text(sql, &encoding) {
        Some(Cow::Borrowed(_)) => Reading::Same,
        Some(Cow::Owned(text)) => Reading::Decoded(text),
        None => Reading::Unknown(encoding),
    }
}

/// `msg` with its SQL text replaced by `sql`.
fn with_sql<'a>(msg: &FrontendMessage<'a>, sql: &'a str) -> FrontendMessage<'a> {
    match msg {
        FrontendMessage::Parse {
            statement,
            param_types,
            ..
        } => FrontendMessage::Parse {
            statement,
            sql,
            param_types: param_types.clone(),
        },
        _ => FrontendMessage::Query { sql },
    }
}

/// The refusal of a statement whose text pgveil cannot read as the server will, for a
/// guarded or masked session; others forward it (and the audit records it unanalysed).
fn unreadable(st: &SessionState, encoding: &str, msg: &FrontendMessage<'_>) -> Option<Screen> {
    refuse_foreign(
        st,
        encoding,
        msg,
        "pgveil cannot read a statement with non-ASCII characters as the server will",
    )
}

fn refuse_foreign(
    st: &SessionState,
    encoding: &str,
    msg: &FrontendMessage<'_>,
    why: &str,
) -> Option<Screen> {
    let role = match (&st.policy, &st.guard) {
        (Some(p), _) => p.role.as_str(),
        (None, Some(g)) => g.role(),
        (None, None) => return None,
    };
    let sql = match msg {
        FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => sql,
        _ => "",
    };
    let reason = format!("client_encoding is {encoding}, and {why}; use client_encoding UTF8");
    Some(Screen::Refuse(
        Refusal::unanalysable(reason, None).denied(role, sql),
    ))
}

/// Forwards a client message unchanged.
pub fn forward(st: &mut SessionState, msg: &FrontendMessage<'_>, raw: &[u8], out: &mut BytesMut) {
    let reading = server_reading(st, msg);
    let mut decoded = None;
    let read = reading.apply(msg, &mut decoded);
    let readable = !matches!(reading, Reading::Unknown(_));
    let lexed = sql_of(read)
        .filter(|_| readable && st.audit.is_some())
        .map(|sql| lex(sql, st.lexing()));
    let recorded = record(st, read, None, lexed.as_ref());
    st.on_client_recorded(read, recorded);
    out.extend_from_slice(raw);
}

/// Tells the audit of a client message the server will act on (`refusal` when pgveil
/// refused it); returns what the session state keeps with a Parse.
fn record(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    refusal: Option<&Denied>,
    lexed: Option<&Result<Lexed<'_>, LexError>>,
) -> Option<Recorded> {
    if st.audit.is_none() || st.ignored_by_server(msg) {
        return None;
    }
    let portal = match msg {
        FrontendMessage::Execute { portal, .. } => st.portal_as_sent(portal).cloned(),
        _ => None,
    };
    st.audit
        .as_mut()?
        .on_client(msg, lexed, refusal, portal.as_ref())
}

/// The SQL text of a Query or Parse.
fn sql_of<'a>(msg: &FrontendMessage<'a>) -> Option<&'a str> {
    match msg {
        FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => Some(sql),
        _ => None,
    }
}

/// Has the server raise `message` within an extended-protocol batch: an unnamed
/// statement that raises it, bound and executed. Its ParseComplete and BindComplete are
/// pgveil's and are swallowed; its error is the client's.
fn raise_refusal(st: &mut SessionState, message: &str, out: &mut BytesMut) {
    if let Some(a) = st.audit.as_mut() {
        a.on_refusal_raised();
    }
    out.extend_from_slice(write::parse("", &write::refusal_sql(message)).raw());
    out.extend_from_slice(write::bind("", "").raw());
    out.extend_from_slice(write::execute("").raw());
    st.push_internal(Pending::Internal);
    st.push_internal(Pending::Internal);
    st.push_internal(Pending::Execute { portal: "".into() });
}
