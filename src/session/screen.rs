//! The client side of the relay, message by message: each one is forwarded as it arrived,
//! or, for sessions with a policy (masks, guard, `block` alerts), decided first by
//! `policy::authorize` on the statement as the server reads it: a permitted statement is
//! forwarded (or its rewrite is), a refused one is replaced by one that makes the server
//! raise the refusal itself, so that transaction state stays in step. The audit hears of
//! every message the server will act on.

use bytes::BytesMut;

use super::audit::Recorded;
use super::encoding::Converted;
use super::state::{Discarding, Limited, Pending, SessionState};
use crate::policy::authorize::{Permit, SessionRules};
use crate::policy::Denied;
use crate::protocol::frontend::FrontendMessage;
use crate::protocol::{write, Frame};
use crate::sql::analysis::{Analysed, Analysis};
use crate::sql::lex::lex;
use crate::sql::Strings;

/// What became of a screened message.
#[derive(Debug, PartialEq, Eq)]
pub enum Screened {
    /// Forwarded, rewritten or refused.
    Done,
    /// Refused for naming a relation or masked column pgveil's catalog does not have,
    /// while the session could read the catalog again at once: nothing was sent or
    /// recorded, so that the relay reads the catalog and screens the message again.
    CatalogWanted,
}

/// For a masked session: forwards a client message, or replaces a refused one by a
/// statement that makes the server raise the refusal (see `write::refusal_sql`).
/// `may_retry`: whether a refusal for want of the catalog may be retried (once).
pub fn screen(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    raw: &Frame,
    out: &mut BytesMut,
    may_retry: bool,
    converted: Option<&Converted>,
) -> Screened {
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
                forward(st, msg, raw.raw(), out, None);
            }
            _ => {}
        }
        return Screened::Done;
    }
    // The statement as the server reads it, when its client_encoding is not UTF-8, lexed
    // once for every decision and the audit.
    let reading = server_reading(st, msg, converted);
    let read = msg;
    // (Only a Query or Parse has text to read, and asks how literals read.)
    let strings = st.lexing();
    let lexed = sql_of(read)
        .filter(|_| !matches!(reading, Reading::Unknown(_)))
        .map(|sql| lex(sql, strings));
    let analysed = lexed.as_ref().map(Analysis::of);
    let decision = decide(st, read, &reading, analysed.as_ref(), strings);
    if may_retry
        && matches!(decision, Decision::Refused(_))
        && st.policy.as_ref().is_some_and(|p| p.catalog_wanted)
        && st.can_read_catalog()
    {
        return Screened::CatalogWanted;
    }
    let refusal = match &decision {
        Decision::Refused(denied) => Some(denied),
        _ => None,
    };
    let recorded = record(st, read, refusal, analysed.as_ref(), converted);
    let msg = read;
    match (decision, msg) {
        (
            Decision::Refused(denied),
            FrontendMessage::Parse { .. } | FrontendMessage::Execute { .. },
        ) => st.discarding = Some(Discarding::new(denied.message)),
        (Decision::Refused(denied), _) => {
            let sql = write::refusal_sql(&denied.message);
            st.on_client(&FrontendMessage::Query { sql: &sql });
            out.extend_from_slice(write::query(&sql).raw());
        }
        (Decision::Statement(permit), msg) => {
            let (rewrite, limit, copy) = permit.into_parts();
            // Under a row limit the statement (or masking's rewrite of it) is sent made to
            // count its rows.
            let (sent, limited) = match limit {
                Some(limit) => {
                    let text = statement_text(msg, rewrite.as_deref(), analysed.as_ref());
                    let role = st.guard.as_ref().map(|g| g.role().to_string());
                    let limited = Limited {
                        role: role.unwrap_or_default(),
                        limit,
                    };
                    (Some(limited.limit.wrap(text)), Some(limited))
                }
                None => (rewrite, None),
            };
            match (sent, msg) {
                (
                    Some(sql),
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
                // A COPY masked in flight goes as Parse, Bind, Execute and Sync, behind
                // pgveil's description of its query, in one transaction with it; the
                // client sees the replies of a simple query.
                (Some(sql), FrontendMessage::Query { .. }) if copy.is_some() => {
                    if let Some(c) = copy.as_ref() {
                        for f in st.describe_copy(c) {
                            out.extend_from_slice(f.raw());
                        }
                    }
                    // The unnamed statement and portal are the COPY's now, on the server
                    // and in pgveil's books: a Bind of them later is masked as this is.
                    st.hidden_unnamed(&sql, recorded, copy.clone());
                    out.extend_from_slice(write::parse("", &sql).raw());
                    out.extend_from_slice(write::bind("", "").raw());
                    out.extend_from_slice(write::execute("").raw());
                    out.extend_from_slice(write::sync().raw());
                    st.on_client(&FrontendMessage::Query { sql: &sql });
                }
                (Some(sql), _) => {
                    st.on_client(&FrontendMessage::Query { sql: &sql });
                    out.extend_from_slice(write::query(&sql).raw());
                }
                (None, _) => {
                    st.on_client_recorded(msg, recorded);
                    out.extend_from_slice(raw.raw());
                }
            }
            if let Some(limited) = limited {
                st.limit_sent(limited);
            }
            if let Some(copy) = copy {
                st.copy_sent(copy);
            }
        }
        (Decision::Other, _) => {
            // Rows a masked session cannot place are never forwarded: where the client
            // described neither the portal nor its statement, pgveil does, unseen.
            if let FrontendMessage::Execute { portal, .. } = msg {
                if let Some(describe) = st.describe_before_execute(portal) {
                    out.extend_from_slice(describe.raw());
                }
                // A COPY masked in flight: its query described just before it runs.
                for f in st.copy_before_execute(portal).into_iter().flatten() {
                    out.extend_from_slice(f.raw());
                }
            }
            st.on_client_recorded(msg, recorded);
            match msg {
                // A statement counting its rows has one result column (the count), where
                // the client's DELETE has none: one format code for it, not the client's
                // several (the server would refuse those).
                FrontendMessage::Bind {
                    statement,
                    result_formats,
                    ..
                } if result_formats.len() > 1 && st.counting_statement(statement) => {
                    let body = raw.body();
                    let keep = body.len() - 2 - 2 * result_formats.len();
                    out.extend_from_slice(
                        write::frame(b'B', |b| {
                            b.extend_from_slice(&body[..keep]);
                            b.extend_from_slice(&1i16.to_be_bytes());
                            b.extend_from_slice(&result_formats[0].to_be_bytes());
                        })
                        .raw(),
                    );
                }
                _ => out.extend_from_slice(raw.raw()),
            }
        }
    }
    Screened::Done
}

/// What happens to one client message.
enum Decision {
    /// A statement (Query, Parse, FunctionCall) that may run, as the Permit says.
    Statement(Permit),
    /// A message that carries no statement of its own.
    Other,
    Refused(Denied),
}

/// The decision on one client message: statements by `SessionRules::authorize` (the
/// guard, then masking, then `block` alerts); an Execute by `block` alerts alone.
fn decide(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    reading: &Reading,
    analysed: Option<&Analysed<'_>>,
    strings: Strings,
) -> Decision {
    let encoding = match reading {
        Reading::Same => None,
        Reading::Unknown(encoding) => Some(encoding.clone()),
        Reading::Converted => st.foreign_encoding(),
    };
    let SessionState {
        guard,
        policy,
        audit,
        facts,
        ..
    } = st;
    let mut rules = SessionRules {
        guard: guard.as_mut(),
        masking: policy.as_mut(),
        facts,
    };
    let decided = match msg {
        FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => {
            let foreign = |why: &str| {
                let encoding = encoding.clone().unwrap_or_default();
                format!("client_encoding is {encoding}, and {why}; use client_encoding UTF8")
            };
            match analysed {
                Some(analysed) => {
                    let decided = rules.authorize(sql, analysed, strings, |facts| {
                        audit
                            .as_mut()
                            .and_then(|a| a.alert_block(sql, analysed, facts))
                    });
                    match reading {
                        Reading::Converted => rules.without_rewrite(sql, decided, || {
                            foreign("a rewritten statement would have to be encoded back into it")
                        }),
                        _ => decided,
                    }
                }
                None => rules.unreadable(
                    sql,
                    foreign("pgveil cannot read a statement with non-ASCII characters as the server will"),
                ),
            }
        }
        FrontendMessage::FunctionCall => rules.function_call(),
        // A statement prepared before the user's window filled up runs no more.
        FrontendMessage::Execute { portal, .. } => {
            let runs = st.portal_as_sent(portal);
            return match st
                .audit
                .as_mut()
                .and_then(|a| a.alert_block_portal(runs.as_ref()))
            {
                Some(denied) => Decision::Refused(denied),
                None => Decision::Other,
            };
        }
        _ => return Decision::Other,
    };
    match decided {
        // A row limit is counted on a statement of its own.
        Ok(permit) => match (permit.limit(), msg, analysed) {
            (
                Some(limit),
                FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. },
                Some(Ok(a)),
            ) if a.parts().len() > 1 => {
                let role = st.guard.as_ref().map(|g| g.role()).unwrap_or_default();
                Decision::Refused(limit.not_alone().denied(role, sql))
            }
            _ => Decision::Statement(permit),
        },
        Err(denied) => Decision::Refused(denied),
    }
}

/// How the server reads the text of a Query or Parse (see `SessionState::foreign_encoding`).
enum Reading {
    /// As pgveil does: UTF-8 text under UTF8 (or SQL_ASCII).
    Same,
    /// Converted from the client's encoding as the server converts it (the message's text
    /// is the converted one; a rewrite could not be encoded back).
    Converted,
    /// pgveil cannot tell: the encoding (so named) may be changing, or the bytes cannot
    /// be converted.
    Unknown(String),
}

/// How the server reads `msg`, whose text the relay converted (`converted`) from the
/// client_encoding the server reported, if it had to.
fn server_reading(
    st: &SessionState,
    msg: &FrontendMessage<'_>,
    converted: Option<&Converted>,
) -> Reading {
    let (FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. }) = msg else {
        return Reading::Same;
    };
    if sql.is_ascii() && converted.is_none() {
        return Reading::Same;
    }
    match (st.foreign_encoding(), converted) {
        (None, None) => Reading::Same,
        (None, Some(c)) if c.lossless => Reading::Converted,
        (None, Some(c)) => Reading::Unknown(c.from.clone()),
        // Converted under the encoding the server reads it in now.
        (Some(encoding), Some(c)) if c.lossless && c.from.eq_ignore_ascii_case(&encoding) => {
            Reading::Converted
        }
        (Some(encoding), _) => Reading::Unknown(encoding),
    }
}

/// Forwards a client message unchanged; `converted`: how its text was converted to be
/// read (see `encoding::transcode`).
pub fn forward(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    raw: &[u8],
    out: &mut BytesMut,
    converted: Option<&Converted>,
) {
    let reading = server_reading(st, msg, converted);
    let read = msg;
    let readable = !matches!(reading, Reading::Unknown(_));
    let lexed = sql_of(read)
        .filter(|_| readable && st.audit.is_some())
        .map(|sql| lex(sql, st.lexing()));
    let analysed = lexed.as_ref().map(Analysis::of);
    let recorded = record(st, read, None, analysed.as_ref(), converted);
    st.on_client_recorded(read, recorded);
    out.extend_from_slice(raw);
}

/// Tells the audit of a client message the server will act on (`refusal` when pgveil
/// refused it); returns what the session state keeps with a Parse.
fn record(
    st: &mut SessionState,
    msg: &FrontendMessage<'_>,
    refusal: Option<&Denied>,
    analysed: Option<&Analysed<'_>>,
    converted: Option<&Converted>,
) -> Option<Recorded> {
    if st.audit.is_none() || st.ignored_by_server(msg) {
        return None;
    }
    let portal = match msg {
        FrontendMessage::Execute { portal, .. } => st.portal_as_sent(portal),
        _ => None,
    };
    st.audit.as_mut()?.on_client(
        msg,
        analysed,
        &mut st.facts,
        refusal,
        portal.as_ref(),
        converted,
    )
}

/// The one statement of a Query or Parse as the server reads it (its own text, without a
/// trailing semicolon or comment), or masking's `rewrite` of it.
fn statement_text<'a>(
    msg: &FrontendMessage<'a>,
    rewrite: Option<&'a str>,
    analysed: Option<&Analysed<'_>>,
) -> &'a str {
    let sql = sql_of(msg).unwrap_or_default();
    match (rewrite, analysed) {
        (Some(rewrite), _) => rewrite,
        (None, Some(Ok(a))) => a.parts().first().map_or("", |r| &sql[r.clone()]),
        (None, _) => sql,
    }
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
/// pgveil's and are swallowed (the unnamed statement and portal are the refusal's now, in
/// pgveil's books as on the server); its error is the client's.
fn raise_refusal(st: &mut SessionState, message: &str, out: &mut BytesMut) {
    if let Some(a) = st.audit.as_mut() {
        a.on_refusal_raised();
    }
    let sql = write::refusal_sql(message);
    out.extend_from_slice(write::parse("", &sql).raw());
    out.extend_from_slice(write::bind("", "").raw());
    out.extend_from_slice(write::execute("").raw());
    st.hidden_unnamed(&sql, None, None);
    st.push_internal(Pending::Execute { portal: "".into() });
}
