//! One client connection, as an explicit sequence of phases:
//! Startup (SSL/GSS negotiation, `startup.rs`) → Connect (upstream link, `upstream.rs`) →
//! Auth (relayed, then identity, `auth.rs`) → Ready (the relay, `relay.rs`, client messages
//! screened in `screen.rs`, over the state in `state.rs`, recorded by `audit`) → Closed.
//! A CancelRequest takes a short path to the upstream.

pub mod audit;
pub mod auth;
pub mod copy_out;
pub mod encoding;
pub mod error;
pub mod relay;
pub mod reload;
pub mod rows;
pub mod screen;
pub mod startup;
pub mod state;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::protocol::backend::TransactionStatus;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{FrameReader, SqlState};
use crate::proxy::Proxy;
use crate::tls::Stream;
use error::{report, SessionError};
use startup::Opening;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The server never sends a message over 1 GiB (`MaxAllocSize`) plus its framing; this
/// bound keeps a broken upstream from making us allocate without limit.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + (1 << 20);

/// Both legs of a session, split into framed readers and raw writers.
pub struct Legs {
    pub client_r: FrameReader<BoxRead>,
    pub client_w: BoxWrite,
    pub upstream_r: FrameReader<BoxRead>,
    pub upstream_w: BoxWrite,
}

fn split(stream: Stream, max_len: usize) -> (FrameReader<BoxRead>, BoxWrite) {
    let (r, w): (BoxRead, BoxWrite) = match stream {
        Stream::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        Stream::Local(local) => {
            let (r, w) = local.into_split();
            (Box::new(r), Box::new(w))
        }
        tls => {
            let (r, w) = tokio::io::split(tls);
            (Box::new(r), Box::new(w))
        }
    };
    (FrameReader::new(r, max_len), w)
}

/// Serves one accepted connection to its end. `permit` is `None` past the connection cap.
pub async fn serve(
    conn: Stream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let id = proxy.next_session_id();
    let span = tracing::info_span!("session", id, %peer);
    async move {
        if let Stream::Plain(tcp) = &conn {
            tcp.set_nodelay(true).ok();
        }
        let limits = &proxy.config.limits;
        let opened =
            tokio::time::timeout(limits.handshake_timeout, startup::negotiate(conn, &proxy)).await;
        let (stream, opening) = match opened {
            Ok(r) => r,
            Err(_) => return tracing::info!("client startup timed out"),
        };
        let Some(mut stream) = stream else { return };
        let message = match opening {
            Ok(Opening::Cancel(key)) => return forward_cancel(&proxy, key).await,
            Ok(Opening::Startup(m)) => m,
            Err(e) => {
                report(&mut stream, &e).await;
                return;
            }
        };
        if let Err(e) = admit(&proxy, &message, &stream, permit.is_some()) {
            report(&mut stream, &e).await;
            return;
        }
        // Socket clients share one recorded address: the failed-login limit is per TCP
        // address only.
        let banned = match peer == crate::tls::LOCAL_PEER {
            true => None,
            false => proxy.auth_throttle.banned(peer.ip()),
        };
        if let Some(left) = banned {
            proxy.metrics.connection_refused("failed_logins");
            let who = audit::Who::before_auth(id, &message, peer);
            let note = format!(
                "turned away: too many failed logins from {}; {}s left",
                peer.ip(),
                left.as_secs()
            );
            proxy
                .audit_event(who.event(crate::audit::Event::ConnectionRefused, Some(&note), None))
                .await;
            let e = SessionError::Refused {
                code: SqlState::INVALID_AUTHORIZATION,
                message:
                    "pgveil: too many failed login attempts from this address; try again later"
                        .into(),
            };
            report(&mut stream, &e).await;
            return;
        }
        let _permit = permit;
        proxy.metrics_session_started();
        let result = run_session(stream, message, id, peer, &proxy).await;
        proxy.metrics_session_ended();
        if let Err(e) = result {
            tracing::debug!("session ended: {e}");
        }
    }
    .instrument(span)
    .await
}

/// Checks made after StartupMessage and before any upstream work.
fn admit(
    proxy: &Proxy,
    msg: &StartupMessage,
    stream: &Stream,
    has_permit: bool,
) -> Result<(), SessionError> {
    if !has_permit {
        proxy.metrics.connection_refused("max_connections");
        return Err(SessionError::Refused {
            code: SqlState::TOO_MANY_CONNECTIONS,
            message: "pgveil: sorry, too many clients already".into(),
        });
    }
    if msg.is_replication() {
        proxy.metrics.connection_refused("replication");
        return Err(SessionError::Refused {
            code: SqlState::FEATURE_NOT_SUPPORTED,
            message:
                "pgveil: replication connections are not supported; connect to the server directly"
                    .into(),
        });
    }
    // A Unix-domain socket never leaves the host (PostgreSQL offers no TLS there either).
    if proxy.config.require_tls && !stream.is_tls() && !matches!(stream, Stream::Local(_)) {
        proxy.metrics.connection_refused("tls_required");
        return Err(SessionError::Refused {
            code: SqlState::INVALID_AUTHORIZATION,
            message: "pgveil: this proxy accepts only TLS connections (sslmode=require)".into(),
        });
    }
    Ok(())
}

async fn run_session(
    mut client: Stream,
    message: StartupMessage,
    id: u64,
    peer: SocketAddr,
    proxy: &Arc<Proxy>,
) -> Result<(), SessionError> {
    let limits = &proxy.config.limits;
    let upstream = match upstream::connect(proxy).await {
        Ok(s) => s,
        Err(e) => {
            report(&mut client, &e).await;
            return Err(e);
        }
    };
    let client_tls = client.is_tls();
    let tls_both_legs = client_tls && upstream.is_tls();
    let generation = proxy.rules_generation();
    let (client_r, client_w) = split(client, limits.max_message_bytes);
    let (upstream_r, upstream_w) = split(upstream, MAX_SERVER_MESSAGE);
    let mut legs = Legs {
        client_r,
        client_w,
        upstream_r,
        upstream_w,
    };
    let established = tokio::time::timeout(
        limits.handshake_timeout,
        auth::relay(
            &mut legs,
            auth::Startup {
                message: &message,
                session_id: id,
                client_addr: peer,
                tls_both_legs,
                proxy,
            },
        ),
    )
    .await
    .unwrap_or(Err(SessionError::HandshakeTimeout));
    let established = match established {
        Ok(e) => e,
        Err(e) => {
            report(&mut legs.client_w, &e).await;
            return Err(e);
        }
    };
    let identity = &established.identity;
    tracing::info!(
        user = %identity.user,
        database = %identity.database,
        roles = ?identity.roles,
        "session established"
    );
    let server_key = established
        .cancel
        .as_ref()
        .and_then(|c| proxy.cancel_keys.get(&c.client_key).map(|k| *k));
    let live = Arc::new(crate::sessions::LiveSession::new(
        established.identity.clone(),
        client_tls,
        established.policy.is_some(),
        established.guard.is_some(),
        server_key,
    ));
    // Watched before it is listed, so that a KILL of a listed session always reaches it.
    let shutdown = proxy.shutdown.watch(id);
    proxy.sessions.open(live.clone());
    let session_audit = session_audit(proxy, &established, &live);
    let mut session_state = state::SessionState::new(established.server_params);
    session_state.audit = session_audit;
    session_state.policy = established.policy;
    session_state.guard = established.guard;
    session_state.catalog_version = established.catalog_version;
    session_state.live = Some(live);
    let refresh =
        reload::PolicyRefresh::new(proxy.clone(), established.identity.clone(), generation);
    if let Some(a) = &session_state.audit {
        proxy
            .audit_event(a.who.event(crate::audit::Event::Connect, None, None))
            .await;
    }
    let state = Mutex::new(session_state);
    let result = relay::run(
        &mut legs,
        &state,
        refresh,
        limits.client_idle_timeout,
        &shutdown,
    )
    .await;
    drop(shutdown);
    if matches!(result, Err(SessionError::ClientGone)) {
        relay::drain(&mut legs.upstream_r, &state, relay::DRAIN_LIMIT).await;
    }
    let mut state = state.into_inner().unwrap_or_else(|p| p.into_inner());
    // A transaction block left open ends with the connection: the server rolls it back.
    let left_open = matches!(
        state.transaction,
        Some(TransactionStatus::InBlock | TransactionStatus::Failed)
    )
    .then_some("the server rolled back the transaction block the session left open");
    if let Some(mut a) = state.audit.take() {
        a.abandon();
        let mut records = a.take_completed();
        records.push(
            a.who
                .event(crate::audit::Event::Disconnect, left_open, None),
        );
        if let Some(log) = a.log() {
            proxy.metrics.audit_records(1);
            if let Err(e) = log.write(records).await {
                tracing::error!("audit records of a closing session not written: {e}");
            }
        }
    }
    proxy.sessions.close(id);
    drop(established.cancel);
    if !matches!(result, Ok(relay::RelayEnd::Terminated)) {
        // Tell the server we are done, whatever happened on the client side.
        let terminate = crate::protocol::write::terminate();
        let _ = legs.upstream_w.write_all(terminate.raw()).await;
    }
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            report(&mut legs.client_w, &e).await;
            Err(e)
        }
    }
}

/// The session's audit, alert and statement-metrics accounting, unless none is on.
fn session_audit(
    proxy: &Arc<Proxy>,
    established: &auth::Established,
    live: &Arc<crate::sessions::LiveSession>,
) -> Option<audit::SessionAudit> {
    let rules = proxy.rules.load_full();
    let identity = &established.identity;
    let alerts = crate::watch::AlertWatch::for_session(&proxy.alerts, &rules.alerts, identity);
    // Statement metrics are counted where records are made: with --no-audit they still
    // need the session's audit side when --metrics or the admin console is on.
    if proxy.audit.is_none()
        && alerts.is_none()
        && proxy.config.metrics.is_none()
        && proxy.config.admin.is_none()
    {
        return None;
    }
    let catalog = established.catalog.clone();
    let setup = audit::AuditSetup {
        log: proxy.audit.clone(),
        metrics: proxy.metrics.clone(),
        redact: proxy.config.audit.as_ref().is_some_and(|a| a.redact),
        sensitive: audit::Sensitive::build(&rules, identity, catalog.as_deref()),
        catalog,
        search_path: crate::catalog::search_path_schemas(&identity.search_path, &identity.user),
        alerts,
        counters: Some(live.clone()),
    };
    Some(audit::SessionAudit::new(audit::Who::of(identity), setup))
}

async fn forward_cancel(proxy: &Proxy, key: crate::protocol::startup::CancelKey) {
    let Some(server_key) = proxy.cancel_keys.get(&key).map(|k| *k) else {
        return tracing::info!("cancel request with an unknown key ignored");
    };
    if let Err(e) = upstream::cancel(proxy, server_key).await {
        tracing::warn!("forwarding a cancel request failed: {e}");
    }
}
