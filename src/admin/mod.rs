//! The admin console (`--admin-listen`): the PostgreSQL protocol for operators, served
//! with the `pgwire` framework (the relay keeps its own byte-level codec; here pgveil is
//! the server, which is what that framework is for). `psql -h HOST -p PORT -U ROLE pgveil`
//! asks for the role's password, pgveil checks it by logging in to the real server as that
//! role (over the same TLS settings as sessions), and lets in members of
//! `[settings] admin_roles` only. Commands are in `commands.rs`; every command and every
//! refused login is an audit record.

pub mod commands;
mod wire;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{stream, Sink};
use pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::query::SimpleQueryHandler;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use time::OffsetDateTime;
use tokio::net::TcpListener;

use crate::audit::record::timestamp;
use crate::audit::{Decision, Event, Record};
use crate::identity::{IdentityRows, IDENTITY_QUERY};
use crate::proxy::Proxy;
use commands::{ColumnType, Command, Reply, Table, Value};

/// Console connections at once; more are closed at once (operators need a handful, and
/// each login attempt costs a connection to the server).
const MAX_CONNECTIONS: usize = 64;

/// Accepts operators on `listener` for as long as the task runs.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let admins = Arc::new(Admins::default());
    let handlers = Arc::new(Handlers {
        startup: Arc::new(Startup {
            inner: CleartextPasswordAuthStartupHandler::new(
                ServerLogin {
                    proxy: proxy.clone(),
                    admins: admins.clone(),
                    one_at_a_time: tokio::sync::Mutex::new(()),
                },
                parameters(),
            ),
            require_tls: proxy.config.require_tls,
        }),
        queries: Arc::new(Queries {
            proxy: proxy.clone(),
            admins,
        }),
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("admin console: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(left) = proxy.auth_throttle.banned(peer.ip()) {
            tracing::info!(client = %peer, ?left, "admin console: address turned away");
            proxy.metrics.connection_refused("failed_logins");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "admin console: too many connections; closing");
            proxy.metrics.connection_refused("max_connections");
            continue;
        };
        let tls = proxy.client_tls();
        let handlers = handlers.clone();
        let timeout = proxy.config.limits.handshake_timeout;
        tokio::spawn(async move {
            if let Err(e) = wire::serve(tcp, peer, tls, &*handlers, timeout).await {
                tracing::debug!(client = %peer, "admin console connection ended: {e}");
            }
            drop(slot);
        });
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = format!("15.0 (pgveil {} admin console)", env!("CARGO_PKG_VERSION"));
    p
}

struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<Queries>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

/// Cleartext password authentication (the password is what pgveil hands the server), with
/// `--require-tls` honoured as for sessions.
struct Startup {
    inner: CleartextPasswordAuthStartupHandler<ServerLogin, DefaultServerParameterProvider>,
    require_tls: bool,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if matches!(message, PgWireFrontendMessage::Startup(_))
            && self.require_tls
            && !client.is_secure()
        {
            return Err(fatal(
                "28000",
                "pgveil: this proxy accepts only TLS connections (sslmode=require)",
            ));
        }
        self.inner.on_startup(client, message).await
    }
}

/// The roles of each user who logged in to the console, as of their latest login: each
/// command is checked against them and the `admin_roles` in force, so that a rules reload
/// that drops a role ends its rights at the next command.
#[derive(Default)]
struct Admins {
    roles: dashmap::DashMap<String, Vec<String>>,
}

impl Admins {
    fn may(&self, user: &str, admin_roles: &[String]) -> bool {
        self.roles.get(user).is_some_and(|roles| {
            let identity = crate::identity::SessionIdentity {
                roles: roles.clone(),
                ..crate::identity::SessionIdentity::offline(user, &[], "")
            };
            identity.has_any_role(admin_roles)
        })
    }
}

/// Checks a password by logging in to the server as the role, then its membership in
/// `admin_roles`. One check at a time, the failed-login ban consulted inside: parallel
/// attempts from one address get no more tries than sequential ones.
struct ServerLogin {
    proxy: Arc<Proxy>,
    admins: Arc<Admins>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Debug for ServerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLogin").finish_non_exhaustive()
    }
}

#[async_trait]
impl AuthSource for ServerLogin {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Only reached by mechanisms that need the stored password; pgveil stores none.
        Err(PgWireError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn verify_password(
        &self,
        login: &LoginInfo,
        password: &[u8],
    ) -> PgWireResult<Option<()>> {
        let user = login.user().unwrap_or_default();
        let database = match login.database() {
            Some(d) if !d.is_empty() && d != "pgveil" => d,
            _ => "postgres",
        };
        let ip = login.host().parse::<std::net::IpAddr>().ok();
        let _turn = self.one_at_a_time.lock().await;
        let reason = match ip.and_then(|ip| self.proxy.auth_throttle.banned(ip)) {
            Some(_) => "the address is turned away for too many failed logins".to_string(),
            None => match self.login(user, database, password).await {
                Ok(roles) => {
                    let admin_roles = &self.proxy.rules.load().settings.admin_roles;
                    self.admins.roles.insert(user.to_string(), roles);
                    if self.admins.may(user, admin_roles) {
                        return Ok(None);
                    }
                    format!("role {user:?} is not a member of [settings] admin_roles")
                }
                Err(reason) => reason,
            },
        };
        self.proxy.metrics.auth_failure();
        let banned = ip.is_some_and(|ip| self.proxy.auth_throttle.failed(ip));
        let limit = match banned {
            true => "; the address reached the failed-login limit",
            false => "",
        };
        let note = format!("admin console login refused: {reason}{limit}");
        tracing::info!(user = ?user, client = login.host(), "{note}");
        let who = crate::session::audit::Who {
            session: 0,
            user: user.to_string(),
            database: "pgveil".into(),
            client_addr: login.host().to_string(),
            application_name: String::new(),
        };
        self.proxy
            .audit_event(who.event(Event::AuthFailed, Some(&note), None))
            .await;
        // As the server does: the reason is in the log, never in the client's message,
        // and every refusal reads the same (a right password of a role that is not an
        // admin must not tell itself apart).
        Err(fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\" (pgveil admin console)"),
        ))
    }
}

impl ServerLogin {
    /// Logs in to the server as `user` and reads the roles it belongs to.
    async fn login(
        &self,
        user: &str,
        database: &str,
        password: &[u8],
    ) -> Result<Vec<String>, String> {
        let limits = &self.proxy.config.limits;
        let stream = crate::session::upstream::connect(&self.proxy)
            .await
            .map_err(|e| e.to_string())?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .password(password)
            .dbname(database)
            .application_name("pgveil admin console login")
            .connect_timeout(limits.connect_timeout);
        let connect = config.connect_raw(stream, tokio_postgres::NoTls);
        let (client, connection) = tokio::time::timeout(limits.handshake_timeout, connect)
            .await
            .map_err(|_| "the server did not answer in time".to_string())?
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => e.to_string(),
            })?;
        let conn = tokio::spawn(connection);
        let mut rows = IdentityRows::default();
        let read = client.simple_query(IDENTITY_QUERY).await;
        drop(client);
        let _ = conn.await;
        for msg in read.map_err(|e| e.to_string())? {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                let (Some(kind), Some(value)) = (r.get(0), r.get(1)) else {
                    continue;
                };
                rows.push(kind.as_bytes(), value.as_bytes());
            }
        }
        let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
        rows.finish(0, any, String::new())
            .map(|id| id.roles)
            .ok_or_else(|| "the server did not say who the role is".into())
    }
}

/// Runs commands; each one is an audit record.
struct Queries {
    proxy: Arc<Proxy>,
    admins: Arc<Admins>,
}

/// The key under which a console connection keeps its session id. pgwire copies every
/// startup parameter into the same map; a parameter's name cannot hold a NUL, so a client
/// cannot set this one.
const SESSION_KEY: &str = "pgveil\0admin_session";

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Unpin + Send + Sync,
    {
        let session = match client.metadata().get(SESSION_KEY) {
            Some(id) => id.parse().unwrap_or_default(),
            None => {
                let id = self.proxy.next_session_id();
                client
                    .metadata_mut()
                    .insert(SESSION_KEY.into(), id.to_string());
                id
            }
        };
        let meta = |k: &str| client.metadata().get(k).cloned().unwrap_or_default();
        let (user, application_name) = (meta("user"), meta("application_name"));
        let client_addr = client.socket_addr().to_string();
        // What every record of this connection says of who and where.
        let who = Record {
            application_name: &application_name,
            client_addr: &client_addr,
            database: "pgveil",
            event: Some(Event::Admin),
            kind: Some("admin"),
            session,
            user: &user,
            ..Default::default()
        };
        if !self
            .admins
            .may(&user, &self.proxy.rules.load().settings.admin_roles)
        {
            tracing::info!(user = ?user, "admin console: the role is no longer an admin; closing");
            let record = Record {
                decision: Some(Decision::Blocked),
                message: Some("the role is no longer in [settings] admin_roles"),
                sqlstate: Some("28000"),
                statement: Some(query.trim()),
                ts: timestamp(OffsetDateTime::now_utc()),
                ..who.clone()
            };
            self.proxy.audit_event(record.canonical()).await;
            return Err(fatal(
                "28000",
                "pgveil: this role is no longer in [settings] admin_roles",
            ));
        }
        let mut replies = Vec::new();
        for text in query.split(';').filter(|t| !t.trim().is_empty()) {
            let started = std::time::Instant::now();
            let ts = OffsetDateTime::now_utc();
            let outcome = match Command::parse(text) {
                Ok(cmd) => commands::run(&cmd, &self.proxy, &user).await,
                Err(e) => Err(e),
            };
            let (decision, sqlstate, message) = match &outcome {
                Ok(_) => (Decision::Allowed, None, None),
                Err(e) => (Decision::Error, Some(e.sqlstate()), Some(e.to_string())),
            };
            let rows = match &outcome {
                Ok(Reply::Table(t)) => Some(t.rows.len() as u64),
                _ => None,
            };
            let record = Record {
                decision: Some(decision),
                duration_us: Some(started.elapsed().as_micros() as u64),
                message: message.as_deref(),
                rows,
                sqlstate,
                statement: Some(text.trim()),
                ts: timestamp(ts),
                ..who.clone()
            };
            self.proxy.audit_event(record.canonical()).await;
            match outcome {
                Ok(reply) => replies.push(response(reply)?),
                Err(e) => {
                    replies.push(Response::Error(Box::new(ErrorInfo::new(
                        "ERROR".into(),
                        e.sqlstate().into(),
                        e.to_string(),
                    ))));
                    // As the server does with a multi-statement string: stop at the error.
                    break;
                }
            }
        }
        Ok(replies)
    }
}

fn response(reply: Reply) -> PgWireResult<Response> {
    let table = match reply {
        Reply::Done(tag) => return Ok(Response::Execution(Tag::new(tag))),
        Reply::Table(t) => t,
    };
    let Table { columns, rows } = table;
    let fields: Vec<FieldInfo> = columns
        .iter()
        .map(|(name, ty)| {
            let ty = match ty {
                ColumnType::Text => Type::TEXT,
                ColumnType::Int => Type::INT8,
            };
            FieldInfo::new((*name).into(), None, None, ty, FieldFormat::Text)
        })
        .collect();
    let fields = Arc::new(fields);
    let mut encoder = DataRowEncoder::new(fields.clone());
    let mut encoded = Vec::with_capacity(rows.len());
    for row in rows {
        for v in row {
            match v {
                Value::Text(t) => encoder.encode_field(&t)?,
                Value::Int(n) => encoder.encode_field(&n)?,
            }
        }
        encoded.push(Ok(encoder.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(encoded),
    )))
}
