//! Authentication is relayed, never terminated: the StartupMessage goes to the server and
//! each authentication request and answer passes between the two, so pgveil stores no
//! password and the server's verdict stands. Then the session's identity is read and the
//! client gets the server's ReadyForQuery.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::error::{already_reported, SessionError};
use super::Legs;
use crate::catalog::{Catalog, CatalogRows, CATALOG_QUERY};
use crate::config::rules::Rules;
use crate::identity::{IdentityRows, SessionIdentity, IDENTITY_QUERY};
use crate::policy::guard::GuardPolicy;
use crate::policy::session_guard::SessionGuard;
use crate::policy::session_masking::SessionPolicy;
use crate::policy::session_rules::{recycle_bin_ready, SessionRuleSet};
use crate::protocol::backend::{self, auth};
use crate::protocol::frontend::{sasl_initial_response, ChannelBindingFlag};
use crate::protocol::startup::StartupMessage;
use crate::protocol::write;
use crate::protocol::{Frame, SqlState};
use crate::proxy::{CachedCatalog, CancelRegistration, CatalogVersion, Proxy};

/// What a completed startup hands to the relay.
pub struct Established {
    pub identity: SessionIdentity,
    pub server_params: HashMap<String, String>,
    /// The client's cancel key, mapped to the upstream backend's while the session lives.
    pub cancel: Option<CancelRegistration>,
    /// Masking for this session, if any mask applies to it.
    pub policy: Option<SessionPolicy>,
    /// The statement guard, if anything can be refused to this session.
    pub guard: Option<SessionGuard>,
    /// The schema version the session's catalog was read at.
    pub catalog_version: Option<CatalogVersion>,
    /// The database's catalog, when anything needs it (masks, guard, audit, alerts).
    pub catalog: Option<Arc<Catalog>>,
}

/// Context of the startup the relay needs.
pub struct Startup<'a> {
    pub message: &'a StartupMessage,
    pub session_id: u64,
    pub client_addr: std::net::SocketAddr,
    /// Both legs are encrypted: SCRAM without channel binding cannot pass.
    pub tls_both_legs: bool,
    pub proxy: &'a Arc<Proxy>,
}

pub async fn relay(legs: &mut Legs, startup: Startup<'_>) -> Result<Established, SessionError> {
    send_upstream(&mut legs.upstream_w, startup.message.raw()).await?;
    authenticate(legs, &startup).await?;
    let mut params = HashMap::new();
    let mut cancel = None;
    let mut out = BytesMut::new();
    loop {
        let frame = legs
            .upstream_r
            .next()
            .await
            .map_err(SessionError::upstream)?;
        match frame.tag() {
            b'S' => {
                let (k, v) = backend::parameter_status(&frame).map_err(SessionError::upstream)?;
                params.insert(k.to_string(), v.to_string());
                out.extend_from_slice(frame.raw());
            }
            b'K' => {
                let server_key =
                    backend::backend_key_data(&frame).map_err(SessionError::upstream)?;
                let registration = startup.proxy.register_cancel_key(server_key);
                out.extend_from_slice(write::backend_key_data(registration.client_key).raw());
                cancel = Some(registration);
            }
            b'N' => out.extend_from_slice(frame.raw()),
            b'E' => {
                out.extend_from_slice(frame.raw());
                send(&mut legs.client_w, &out).await?;
                return Err(SessionError::Reported(already_reported()));
            }
            b'Z' => {
                let identity = read_identity(legs, &startup).await?;
                let (policy, guard, catalog_version, catalog) =
                    session_policy(legs, &startup, &identity).await?;
                out.extend_from_slice(frame.raw());
                send(&mut legs.client_w, &out).await?;
                return Ok(Established {
                    identity,
                    server_params: params,
                    cancel,
                    policy,
                    guard,
                    catalog_version,
                    catalog,
                });
            }
            tag => {
                return Err(SessionError::Upstream(format!(
                    "unexpected message {:?} after authentication",
                    tag as char
                )))
            }
        }
    }
}

/// Relays the authentication exchange until AuthenticationOk.
async fn authenticate(legs: &mut Legs, startup: &Startup<'_>) -> Result<(), SessionError> {
    // Over a Unix socket, `peer` (or `trust`) in pg_hba.conf lets in whoever pgveil's own
    // operating-system user may be: a client must not inherit that.
    let local = startup.proxy.config.upstream_socket.is_some();
    let mut asked_password = false;
    loop {
        let frame = legs
            .upstream_r
            .next()
            .await
            .map_err(SessionError::upstream)?;
        match frame.tag() {
            b'R' => {
                let code = backend::authentication_code(&frame).map_err(SessionError::upstream)?;
                match code {
                    auth::OK if local && !asked_password => {
                        auth_failed(startup, "28000").await;
                        return Err(SessionError::Refused {
                            code: crate::protocol::sqlstate::SqlState::INVALID_AUTHORIZATION,
                            message: "pgveil: the server let this client in over its Unix socket without a password (peer or trust in pg_hba.conf), which would lend it pgveil's own identity; give pgveil's local connections a password method".into(),
                        });
                    }
                    auth::OK => {
                        send(&mut legs.client_w, frame.raw()).await?;
                        return Ok(());
                    }
                    auth::SASL => {
                        asked_password = true;
                        let offered = strip_channel_binding(&frame)?;
                        send(&mut legs.client_w, offered.raw()).await?;
                        let answer = client_auth_response(legs).await?;
                        check_scram_relayable(&answer, startup.tls_both_legs)?;
                        send_upstream(&mut legs.upstream_w, answer.raw()).await?;
                    }
                    auth::SASL_FINAL => send(&mut legs.client_w, frame.raw()).await?,
                    _ => {
                        asked_password = true;
                        send(&mut legs.client_w, frame.raw()).await?;
                        let answer = client_auth_response(legs).await?;
                        send_upstream(&mut legs.upstream_w, answer.raw()).await?;
                    }
                }
            }
            // NegotiateProtocolVersion: the server speaks an older minor version.
            b'v' => send(&mut legs.client_w, frame.raw()).await?,
            b'E' => {
                // The server's verdict (28P01, 3D000, ...) reaches the client unchanged.
                send(&mut legs.client_w, frame.raw()).await?;
                let (code, _) = backend::error_code_and_severity(&frame);
                auth_failed(startup, &code).await;
                return Err(SessionError::Reported(already_reported()));
            }
            tag => {
                return Err(SessionError::Upstream(format!(
                    "unexpected message {:?} during authentication",
                    tag as char
                )))
            }
        }
    }
}

/// A refused login: counted against the client's address (the brute-force guard) when
/// the server rejected the credentials, and audited either way.
async fn auth_failed(startup: &Startup<'_>, sqlstate: &str) {
    let proxy = startup.proxy;
    let ip = startup.client_addr.ip();
    // 28P01 invalid_password, 28000 invalid_authorization_specification (no pg_hba entry,
    // unknown role under some methods).
    let credentials = sqlstate.starts_with("28") && startup.client_addr != crate::tls::LOCAL_PEER;
    let banned = credentials && proxy.auth_throttle.failed(ip);
    proxy.metrics.auth_failure();
    let message = if banned {
        format!("authentication failed ({sqlstate}); {ip} reached the failed-login limit and is turned away for a while")
    } else {
        format!("authentication failed ({sqlstate})")
    };
    if banned {
        tracing::warn!(client = %ip, "too many failed logins; turning the address away");
    }
    let who =
        super::audit::Who::before_auth(startup.session_id, startup.message, startup.client_addr);
    proxy
        .audit_event(who.event(crate::audit::Event::AuthFailed, Some(&message), None))
        .await;
}

async fn client_auth_response(legs: &mut Legs) -> Result<Frame, SessionError> {
    let frame = legs
        .client_r
        .next()
        .await
        .map_err(SessionError::from_client)?;
    if frame.tag() != b'p' {
        return Err(SessionError::Client(
            crate::protocol::ProtocolError::Unexpected {
                tag: frame.tag() as char,
                during: "during authentication",
            },
        ));
    }
    Ok(frame)
}

/// AuthenticationSASL without SCRAM-SHA-256-PLUS: channel binding ties the exchange to one
/// TLS connection, and a relay has two.
fn strip_channel_binding(frame: &Frame) -> Result<Frame, SessionError> {
    let mechanisms = backend::sasl_mechanisms(frame).map_err(SessionError::upstream)?;
    let kept: Vec<&str> = mechanisms
        .into_iter()
        .filter(|m| *m != backend::SCRAM_PLUS)
        .collect();
    if kept.is_empty() {
        return Err(SessionError::Refused {
            code: SqlState::FEATURE_NOT_SUPPORTED,
            message: "pgveil: the server offers only SCRAM with channel binding, which a proxy cannot relay".into(),
        });
    }
    Ok(write::authentication_sasl(&kept))
}

/// With TLS on both legs, a client that supports channel binding sends the GS2 flag `y`
/// ("I could bind but the server did not offer it"); the server, which does offer it on
/// its own TLS leg, would reject the exchange as a downgrade. Say so plainly.
fn check_scram_relayable(answer: &Frame, tls_both_legs: bool) -> Result<(), SessionError> {
    let (_, flag) = sasl_initial_response(answer).map_err(SessionError::Client)?;
    let refuse = match flag {
        ChannelBindingFlag::Used => true,
        ChannelBindingFlag::ClientOnly => tls_both_legs,
        ChannelBindingFlag::NotSupported => false,
    };
    if refuse {
        return Err(SessionError::Refused {
            code: SqlState::INVALID_AUTHORIZATION,
            message: "pgveil: SCRAM channel binding cannot pass through a proxy with TLS on both legs; \
                      connect with channel_binding=disable, or run pgveil with --upstream-tls disable"
                .into(),
        });
    }
    Ok(())
}

/// Runs `sql` on the session's upstream connection before the client is ready, handing
/// each row to `on_row`; none of the reply reaches the client. `what` names the query in
/// errors: without its answer the session cannot be policed, so it does not start.
async fn internal_query(
    legs: &mut Legs,
    sql: &str,
    what: &str,
    mut on_row: impl FnMut(&[Option<&[u8]>]),
) -> Result<(), SessionError> {
    send_upstream(&mut legs.upstream_w, write::query(sql).raw()).await?;
    let mut failed = None;
    loop {
        let frame = legs
            .upstream_r
            .next()
            .await
            .map_err(SessionError::upstream)?;
        match frame.tag() {
            b'D' => on_row(&backend::data_row(&frame).map_err(SessionError::upstream)?),
            b'E' => failed = Some(backend::error_code_and_severity(&frame).0),
            b'Z' => break,
            _ => {}
        }
    }
    match failed {
        Some(code) => Err(SessionError::Upstream(format!(
            "{what} failed with SQLSTATE {code}"
        ))),
        None => Ok(()),
    }
}

/// Reads the session's identity with [`IDENTITY_QUERY`].
async fn read_identity(
    legs: &mut Legs,
    startup: &Startup<'_>,
) -> Result<SessionIdentity, SessionError> {
    let mut rows = IdentityRows::default();
    internal_query(
        legs,
        IDENTITY_QUERY,
        "reading the session's roles",
        |cols| {
            if let [Some(kind), Some(value)] = cols {
                rows.push(kind, value);
            }
        },
    )
    .await?;
    let app = super::encoding::startup_param(startup.message, "application_name");
    rows.finish(startup.session_id, startup.client_addr, app)
        .ok_or_else(|| SessionError::Upstream("the server did not report the session user".into()))
}

/// The session's masking policy (the masks of rules that apply to its roles, resolved
/// against the database's catalog) and its statement guard. The catalog is read on the
/// session's own connection when no fresh copy is cached for the database.
async fn session_policy(
    legs: &mut Legs,
    startup: &Startup<'_>,
    identity: &SessionIdentity,
) -> Result<
    (
        Option<SessionPolicy>,
        Option<SessionGuard>,
        Option<CatalogVersion>,
        Option<Arc<Catalog>>,
    ),
    SessionError,
> {
    let rules = startup.proxy.rules.load_full();
    let guarded = GuardPolicy::for_session(&rules, identity).is_some();
    let audited = startup.proxy.audit.is_some() || !rules.alerts.is_empty();
    if rules.masks.is_empty() && rules.filters.is_empty() && !guarded && !audited {
        return Ok((None, None, None, None));
    }
    let known = startup
        .proxy
        .catalogs
        .get(&identity.database)
        .map(|c| c.clone());
    let cached = known
        .clone()
        .filter(|c| c.version.is_current())
        // Until `pgveil trash init` has run, look again at every connection.
        .filter(|c| recycle_bin_ready(&rules, &c.catalog));
    let cached = match cached {
        Some(c) => c,
        None => {
            let version = known.map_or_else(CatalogVersion::first, |c| c.version.now());
            let catalog = Arc::new(read_catalog(legs).await?);
            let entry = CachedCatalog { catalog, version };
            startup
                .proxy
                .catalogs
                .insert(identity.database.clone(), entry.clone());
            entry
        }
    };
    purge_trash_if_due(legs, startup, identity, &rules, &cached.catalog).await?;
    let built = SessionRuleSet::build(&rules, identity, &cached.catalog);
    Ok((
        built.masking,
        built.guard,
        Some(cached.version),
        Some(cached.catalog.clone()),
    ))
}

/// How often `serve` purges each database's recycle bin.
const TRASH_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Purges the database's recycle bin of rows past their retention, at most once a day,
/// on the connection of the first session that arrives when it is due: pgveil holds no
/// credentials of its own, and `pgveil_trash.purge()` may be called by any role because
/// it removes nothing else. A failure is logged; the session goes on.
async fn purge_trash_if_due(
    legs: &mut Legs,
    startup: &Startup<'_>,
    identity: &SessionIdentity,
    rules: &Rules,
    catalog: &Catalog,
) -> Result<(), SessionError> {
    if rules.recycles.is_empty() || !catalog.is_user_function("pgveil_trash.purge") {
        return Ok(());
    }
    let now = std::time::Instant::now();
    let due = match startup.proxy.trash_purged.entry(identity.database.clone()) {
        dashmap::mapref::entry::Entry::Occupied(mut e) => {
            if now.duration_since(*e.get()) < TRASH_PURGE_EVERY {
                false
            } else {
                e.insert(now);
                true
            }
        }
        dashmap::mapref::entry::Entry::Vacant(e) => {
            e.insert(now);
            true
        }
    };
    if !due {
        return Ok(());
    }
    let mut purged = String::new();
    let result = internal_query(
        legs,
        crate::trash::PURGE_SQL,
        "purging the recycle bin",
        |cols| {
            if let Some(Some(n)) = cols.first() {
                purged = String::from_utf8_lossy(n).into_owned();
            }
        },
    )
    .await;
    match result {
        Ok(()) => {
            tracing::info!(database = %identity.database, rows = %purged, "recycle bin purged")
        }
        Err(SessionError::Upstream(e)) => {
            tracing::warn!(database = %identity.database, "purging the recycle bin: {e}")
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Reads the database's catalog with [`CATALOG_QUERY`].
async fn read_catalog(legs: &mut Legs) -> Result<Catalog, SessionError> {
    let mut rows = CatalogRows::default();
    internal_query(legs, CATALOG_QUERY, "reading the catalog", |cols| {
        rows.push(cols)
    })
    .await?;
    Ok(rows.finish())
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), SessionError> {
    w.write_all(bytes)
        .await
        .map_err(|e| SessionError::from_client(e.into()))?;
    w.flush()
        .await
        .map_err(|e| SessionError::from_client(e.into()))
}

async fn send_upstream<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), SessionError> {
    w.write_all(bytes).await.map_err(SessionError::upstream)?;
    w.flush().await.map_err(SessionError::upstream)
}
