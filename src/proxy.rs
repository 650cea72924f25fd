//! What the whole process shares, every session and the accept loop alike: the rules in
//! force, TLS configuration, the catalog cache, metrics, the audit log, the cancel-key
//! registry and the shutdown level. `server.rs` runs the accept loop over it; `session/`
//! reads it.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use arc_swap::{ArcSwap, ArcSwapOption};
use atomic_waker::AtomicWaker;
use dashmap::DashMap;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::catalog::Catalog;
use crate::config::{Config, Rules, RulesError};
use crate::metrics::Metrics;
use crate::protocol::startup::CancelKey;
use crate::sessions::Sessions;
use crate::tls::{self, TlsError, UpstreamConnector};
use crate::watch::{Alerts, AuthThrottle};

/// Keys of `hash` and `tokenize` masks must be in the environment before any session
/// starts: a missing key would otherwise mean a column nobody can read or, worse, a
/// silent fallback.
fn check_keys(rules: &Rules) -> Result<(), ServerError> {
    use crate::config::rules::MaskFunction;
    for m in &rules.masks {
        if let MaskFunction::Hash { key_env } | MaskFunction::Tokenize { key_env } = &m.function {
            crate::policy::mask::key_from_env(key_env)
                .map_err(|e| ServerError::Key(format!("{}: {e}", m.origin)))?;
        }
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("mask key: {0}")]
    Key(String),
    #[error("rules: {0}")]
    Rules(#[from] RulesError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// Everything sessions share.
pub struct Proxy {
    pub config: Arc<Config>,
    pub rules: ArcSwap<Rules>,
    /// Client TLS; replaced by a reload that reads new certificate files.
    client_tls: ArcSwapOption<TlsAcceptor>,
    upstream_tls: ArcSwap<UpstreamConnector>,
    /// Client-visible cancel key → the upstream backend's key.
    pub cancel_keys: DashMap<CancelKey, CancelKey>,
    /// The sessions past authentication, with what they have done.
    pub sessions: Sessions,
    /// How far shutdown has gone, and how to wake the sessions that must notice it.
    pub shutdown: Shutdown,
    /// Schema knowledge per database, loaded by the first session that needs it.
    pub catalogs: DashMap<String, CachedCatalog>,
    /// When the recycle bin of each database was last purged (see `session::auth`).
    pub trash_purged: DashMap<String, std::time::Instant>,
    /// The audit log writer; `None` with `--no-audit`.
    pub audit: Option<Arc<AuditLog>>,
    pub metrics: Arc<Metrics>,
    /// `[[alert]]` windows of every user.
    pub alerts: Arc<Alerts>,
    /// Failed logins per client address.
    pub auth_throttle: AuthThrottle,
    /// Incremented by every successful rules reload.
    rules_generation: AtomicU64,
    session_ids: AtomicU64,
    active_sessions: AtomicUsize,
}

impl Proxy {
    /// Loads rules and TLS material; fails on anything invalid.
    pub fn new(config: Config) -> Result<Proxy, ServerError> {
        let rules = Rules::load(&config.rules_path)?;
        check_keys(&rules)?;
        let (client_tls, upstream_tls) = tls_material(&config)?;
        let audit = match &config.audit {
            Some(a) => Some(Arc::new(AuditLog::open(a.writer.clone())?)),
            None => None,
        };
        let auth_throttle = AuthThrottle::new(config.auth_throttle);
        Ok(Proxy {
            audit,
            metrics: Arc::new(Metrics::default()),
            alerts: Arc::new(Alerts::default()),
            auth_throttle,
            config: Arc::new(config),
            rules: ArcSwap::from_pointee(rules),
            client_tls: ArcSwapOption::from(client_tls.map(Arc::new)),
            upstream_tls: ArcSwap::from_pointee(upstream_tls),
            cancel_keys: DashMap::new(),
            sessions: Sessions::default(),
            shutdown: Shutdown::default(),
            catalogs: DashMap::new(),
            trash_purged: DashMap::new(),
            rules_generation: AtomicU64::new(0),
            session_ids: AtomicU64::new(1),
            active_sessions: AtomicUsize::new(0),
        })
    }

    pub fn rules_generation(&self) -> u64 {
        self.rules_generation.load(Ordering::SeqCst)
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The acceptor for client TLS now in force; `None` without TLS.
    pub fn client_tls(&self) -> Option<Arc<TlsAcceptor>> {
        self.client_tls.load_full()
    }

    /// How to reach the server over TLS now.
    pub fn upstream_tls(&self) -> Arc<UpstreamConnector> {
        self.upstream_tls.load_full()
    }

    /// SIGHUP and the admin console's RELOAD: the rules, then the TLS files (certificate,
    /// key, upstream CA). What fails to load is logged and the old stays in force; the
    /// error names every part that failed.
    pub fn reload(&self) -> Result<(), String> {
        let rules = self.reload_rules().map_err(|e| e.to_string());
        let tls = self.reload_tls().map_err(|e| e.to_string());
        self.metrics.config_reloaded(rules.is_ok() && tls.is_ok());
        match (rules, tls) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(r), Ok(())) => Err(format!("rules: {r}")),
            (Ok(()), Err(t)) => Err(format!("TLS: {t}")),
            (Err(r), Err(t)) => Err(format!("rules: {r}\nTLS: {t}")),
        }
    }

    /// Re-reads the TLS files; new connections use them, running ones keep theirs. A file
    /// that does not load (missing, a key that does not match its certificate) is logged
    /// and the old material stays.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match tls_material(&self.config) {
            Ok((client, upstream)) => {
                let changed = self.config.client_tls.is_some() || self.config.upstream_ca.is_some();
                self.client_tls.store(client.map(Arc::new));
                self.upstream_tls.store(Arc::new(upstream));
                if changed {
                    tracing::info!("TLS certificates reloaded");
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!("new TLS files are invalid, keeping the old ones: {e}");
                Err(e)
            }
        }
    }

    /// Re-reads the rules; invalid new rules are logged and the old ones stay.
    pub fn reload_rules(&self) -> Result<(), RulesError> {
        match Rules::load(&self.config.rules_path) {
            Ok(rules) => {
                if let Err(e) = check_keys(&rules) {
                    tracing::error!("new rules are invalid, keeping the old ones: {e}");
                    self.metrics.config_reloaded(false);
                    return Err(RulesError {
                        problems: vec![e.to_string()],
                    });
                }
                self.rules.store(Arc::new(rules));
                // Running sessions notice this at their next statement.
                self.rules_generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(path = %self.config.rules_path.display(), "rules reloaded");
                self.metrics.config_reloaded(true);
                Ok(())
            }
            Err(e) => {
                tracing::error!("new rules are invalid, keeping the old ones:\n{e}");
                self.metrics.config_reloaded(false);
                Err(e)
            }
        }
    }

    /// A key for the client in place of the server's: same pid (so `pg_backend_pid()`
    /// still matches), a fresh secret, so a CancelRequest reaches only backends this
    /// proxy opened for that client. The mapping lives as long as the registration.
    pub fn register_cancel_key(self: &Arc<Self>, server: CancelKey) -> CancelRegistration {
        loop {
            let key = CancelKey {
                pid: server.pid,
                secret: rand::random(),
            };
            if let dashmap::Entry::Vacant(v) = self.cancel_keys.entry(key) {
                v.insert(server);
                return CancelRegistration {
                    proxy: self.clone(),
                    client_key: key,
                };
            }
        }
    }

    pub fn active_sessions(&self) -> usize {
        self.active_sessions.load(Ordering::Relaxed)
    }

    pub fn metrics_session_started(&self) {
        self.active_sessions.fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_opened();
    }

    /// Writes a session event record and waits for it; a log that cannot be written is
    /// logged (the event's session is ending or refused anyway).
    pub async fn audit_event(&self, record: Vec<u8>) {
        let Some(log) = &self.audit else { return };
        self.metrics.audit_records(1);
        if let Err(e) = log.write(vec![record]).await {
            tracing::error!("audit event not written: {e}");
        }
    }

    pub fn metrics_session_ended(&self) {
        self.active_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client acceptor and the upstream connector the configuration's files make.
fn tls_material(config: &Config) -> Result<(Option<TlsAcceptor>, UpstreamConnector), TlsError> {
    let client = match &config.client_tls {
        Some((cert, key)) => Some(tls::client_acceptor(cert, key)?),
        None => None,
    };
    let upstream = UpstreamConnector::new(
        config.upstream_tls,
        config.upstream_ca.as_deref(),
        &config.upstream_host,
    )?;
    Ok((client, upstream))
}

/// A database's catalog, with the version of the schema it was read at.
#[derive(Clone)]
pub struct CachedCatalog {
    pub catalog: Arc<Catalog>,
    pub version: CatalogVersion,
}

/// How far a database's schema has changed as pgveil's sessions saw it: a counter shared
/// by every session of the database, raised after each statement that may change the
/// schema (and again when its transaction ends), and the value it had when a catalog was
/// read. A catalog read at an older value may be out of date.
#[derive(Clone, Debug)]
pub struct CatalogVersion {
    changes: Arc<std::sync::atomic::AtomicU64>,
    read_at: u64,
}

impl CatalogVersion {
    /// The first version of a database's schema.
    pub fn first() -> CatalogVersion {
        CatalogVersion {
            changes: Default::default(),
            read_at: 0,
        }
    }

    /// The version now, for a catalog about to be read.
    pub fn now(&self) -> CatalogVersion {
        CatalogVersion {
            changes: self.changes.clone(),
            read_at: self.changes.load(Ordering::Acquire),
        }
    }

    /// Whether no change was seen since the catalog was read.
    pub fn is_current(&self) -> bool {
        self.changes.load(Ordering::Acquire) == self.read_at
    }

    /// A statement may have changed the schema.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

/// Shutdown as sessions see it: a level that only rises, and one waker per session in
/// the relay phase. Polling it costs two atomic operations, which matters because the
/// relay polls it on every wake-up.
#[derive(Default)]
pub struct Shutdown {
    level: AtomicU8,
    wakers: DashMap<u64, Arc<Watcher>>,
}

/// How one session is woken, and whether it alone was told to end.
#[derive(Default)]
struct Watcher {
    waker: AtomicWaker,
    killed: std::sync::atomic::AtomicBool,
}

/// The levels of [`Shutdown`].
pub mod shutdown_level {
    pub const RUNNING: u8 = 0;
    /// Stop accepting; end each session once no statement is running.
    pub const DRAIN: u8 = 1;
    /// The grace period is over: end every session now.
    pub const STOP: u8 = 2;
    /// What one session sees when an operator ended it (the admin console's KILL).
    pub const KILLED: u8 = 3;
}

impl Shutdown {
    /// Raises the level and wakes every registered session.
    pub fn raise(&self, level: u8) {
        self.level.fetch_max(level, Ordering::SeqCst);
        for w in self.wakers.iter() {
            w.waker.wake();
        }
    }

    /// Ends one session now, whatever it is doing; `false` if no such session is relaying.
    pub fn kill(&self, session: u64) -> bool {
        let Some(w) = self.wakers.get(&session).map(|w| w.clone()) else {
            return false;
        };
        w.killed.store(true, Ordering::SeqCst);
        w.waker.wake();
        true
    }

    /// Registers a session to be woken; dropping the guard unregisters it.
    pub fn watch(&self, session: u64) -> ShutdownWatch<'_> {
        let watcher = Arc::new(Watcher::default());
        self.wakers.insert(session, watcher.clone());
        ShutdownWatch {
            shutdown: self,
            session,
            watcher,
        }
    }
}

/// One session's view of [`Shutdown`].
pub struct ShutdownWatch<'a> {
    shutdown: &'a Shutdown,
    session: u64,
    watcher: Arc<Watcher>,
}

impl ShutdownWatch<'_> {
    /// Resolves with the level once it is above `seen` ([`shutdown_level::KILLED`] once
    /// this session was killed).
    pub async fn above(&self, seen: u8) -> u8 {
        std::future::poll_fn(|cx| {
            self.watcher.waker.register(cx.waker());
            if self.watcher.killed.load(Ordering::SeqCst) {
                return Poll::Ready(shutdown_level::KILLED);
            }
            match self.shutdown.level.load(Ordering::SeqCst) {
                level if level > seen => Poll::Ready(level),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for ShutdownWatch<'_> {
    fn drop(&mut self) {
        self.shutdown.wakers.remove(&self.session);
    }
}

/// A client-visible cancel key, mapped to its backend until dropped.
pub struct CancelRegistration {
    proxy: Arc<Proxy>,
    pub client_key: CancelKey,
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        self.proxy.cancel_keys.remove(&self.client_key);
    }
}
