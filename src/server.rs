//! The accept loop owns every session's lifetime: sessions are spawned into a
//! `TaskTracker`, capped by a `Semaphore`, and cancelled through a `CancellationToken`
//! once the shutdown grace period has passed.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Rules, RulesError};
use crate::protocol::startup::CancelKey;
use crate::session::identity::SessionIdentity;
use crate::tls::{self, TlsError, UpstreamConnector};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("rules: {0}")]
    Rules(#[from] RulesError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Everything sessions share.
pub struct Proxy {
    pub config: Arc<Config>,
    pub rules: ArcSwap<Rules>,
    pub client_tls: Option<TlsAcceptor>,
    pub upstream_tls: UpstreamConnector,
    /// Client-visible cancel key → the upstream backend's key.
    pub cancel_keys: DashMap<CancelKey, CancelKey>,
    /// Identities of the sessions past authentication, by session id.
    pub sessions: DashMap<u64, SessionIdentity>,
    session_ids: AtomicU64,
    active_sessions: AtomicUsize,
}

impl Proxy {
    /// Loads rules and TLS material; fails on anything invalid.
    pub fn new(config: Config) -> Result<Proxy, ServerError> {
        let rules = Rules::load(&config.rules_path)?;
        let client_tls = match &config.client_tls {
            Some((cert, key)) => Some(tls::client_acceptor(cert, key)?),
            None => None,
        };
        let upstream_tls = UpstreamConnector::new(
            config.upstream_tls,
            config.upstream_ca.as_deref(),
            &config.upstream_host,
        )?;
        Ok(Proxy {
            config: Arc::new(config),
            rules: ArcSwap::from_pointee(rules),
            client_tls,
            upstream_tls,
            cancel_keys: DashMap::new(),
            sessions: DashMap::new(),
            session_ids: AtomicU64::new(1),
            active_sessions: AtomicUsize::new(0),
        })
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Re-reads the rules; invalid new rules are logged and the old ones stay.
    pub fn reload_rules(&self) -> Result<(), RulesError> {
        match Rules::load(&self.config.rules_path) {
            Ok(rules) => {
                self.rules.store(Arc::new(rules));
                tracing::info!(path = %self.config.rules_path.display(), "rules reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!("new rules are invalid, keeping the old ones:\n{e}");
                Err(e)
            }
        }
    }

    /// A key for the client in place of the server's: same pid (so `pg_backend_pid()`
    /// still matches), a fresh secret, so a CancelRequest reaches only backends this
    /// proxy opened for that client.
    pub fn issue_cancel_key(&self, server: CancelKey) -> CancelKey {
        loop {
            let key = CancelKey {
                pid: server.pid,
                secret: rand::random(),
            };
            if let dashmap::Entry::Vacant(v) = self.cancel_keys.entry(key) {
                v.insert(server);
                return key;
            }
        }
    }

    pub fn active_sessions(&self) -> usize {
        self.active_sessions.load(Ordering::Relaxed)
    }

    pub fn metrics_session_started(&self) {
        self.active_sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn metrics_session_ended(&self) {
        self.active_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections past the cap that may be told so at once; beyond this they are dropped.
const MAX_PENDING_REFUSALS: usize = 64;

/// Accepts clients on `listener` until `shutdown` completes; then idle sessions close,
/// running statements get the grace period to finish, and the rest are cancelled.
pub async fn run(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let tracker = TaskTracker::new();
    let drain = CancellationToken::new();
    let cancel = CancellationToken::new();
    let sessions = Arc::new(Semaphore::new(proxy.config.limits.max_client_conn));
    let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = sessions.clone().try_acquire_owned().ok();
        let refusal = if permit.is_none() {
            match refusals.clone().try_acquire_owned() {
                Ok(r) => Some(r),
                Err(_) => continue, // dropping the socket closes it
            }
        } else {
            None
        };
        let proxy = proxy.clone();
        let (drain, now) = (drain.child_token(), cancel.child_token());
        tracker.spawn(async move {
            crate::session::serve(tcp, peer, proxy, permit, drain, now).await;
            drop(refusal);
        });
    }
    drop(listener);
    tracker.close();
    drain.cancel();
    let grace = proxy.config.limits.shutdown_grace;
    tracing::info!(
        sessions = tracker.len(),
        ?grace,
        "stopped accepting; waiting for sessions"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "grace period over; closing sessions"
        );
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}
