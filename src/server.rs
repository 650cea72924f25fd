//! The accept loop owns every session's lifetime: sessions are spawned into a
//! `TaskTracker` and capped by a `Semaphore`; on shutdown they drain, and are stopped
//! once the grace period has passed (`Shutdown`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::proxy::{shutdown_level, Proxy};
use crate::tls::Stream;

/// Reloads the rules whenever their files change (polled: works on every filesystem,
/// including bind mounts and network shares where inotify does not).
pub async fn watch_rules(proxy: Arc<Proxy>, every: Duration) {
    let path = proxy.config.rules_path.clone();
    let mut last = crate::config::rules::fingerprint(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = crate::config::rules::fingerprint(&path);
        if now != last {
            last = now;
            tracing::info!(path = %path.display(), "rules files changed");
            // All of it, as SIGHUP: the gauge then speaks for rules and TLS files alike.
            let _ = proxy.reload();
        }
    }
}

/// Connections past the cap that may be told so at once; beyond this they are dropped.
const MAX_PENDING_REFUSALS: usize = 64;

/// Where clients connect: TCP, and optionally a Unix-domain socket too.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixSocket>,
}

/// A listening Unix-domain socket; its file is removed when it is dropped.
pub struct UnixSocket {
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
}

impl UnixSocket {
    /// Listens at `path` (who may connect is up to the directory's permissions, as with
    /// PostgreSQL's sockets). A socket left there by a process that is gone (connecting is
    /// refused) is replaced; anything else there is not touched.
    pub fn bind(path: &std::path::Path) -> std::io::Result<UnixSocket> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        let refused = || {
            std::os::unix::net::UnixStream::connect(path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        };
        if socket && refused() {
            std::fs::remove_file(path)?;
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(UnixSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Listeners {
        Listeners {
            tcp: Some(tcp),
            unix: None,
        }
    }
}

impl Listeners {
    async fn accept(&self) -> std::io::Result<(Stream, std::net::SocketAddr)> {
        let tcp = async {
            match &self.tcp {
                Some(l) => l.accept().await.map(|(s, a)| (Stream::Plain(s), a)),
                None => std::future::pending().await,
            }
        };
        let unix = async {
            match &self.unix {
                Some(u) => u
                    .listener
                    .accept()
                    .await
                    .map(|(s, _)| (Stream::Local(s), crate::tls::LOCAL_PEER)),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            a = tcp => a,
            a = unix => a,
        }
    }
}

/// Accepts clients on `listeners` until `shutdown` completes; then idle sessions close,
/// running statements get the grace period to finish, and the rest are cancelled.
pub async fn run(
    listeners: impl Into<Listeners>,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) {
    let listener = listeners.into();
    if let Some(log) = &proxy.audit {
        log.start();
    }
    let tracker = TaskTracker::new();
    let sessions = Arc::new(Semaphore::new(proxy.config.limits.max_client_conn));
    let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
    tokio::pin!(shutdown);
    let mut accepted_count: u64 = 0;
    loop {
        let (conn, peer) = tokio::select! {
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
        if accepted_count.is_multiple_of(1024) {
            proxy.auth_throttle.prune();
        }
        accepted_count = accepted_count.wrapping_add(1);
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
        tracker.spawn(async move {
            crate::session::serve(conn, peer, proxy, permit).await;
            drop(refusal);
        });
    }
    drop(listener);
    tracker.close();
    proxy.shutdown.raise(shutdown_level::DRAIN);
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
        proxy.shutdown.raise(shutdown_level::STOP);
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    if let Some(log) = &proxy.audit {
        log.close().await;
    }
}

/// Serves `/metrics` on `listener` for as long as the task runs.
pub async fn serve_metrics(listener: TcpListener, proxy: Arc<Proxy>) {
    let render = Arc::new(move || proxy.metrics.render(proxy.active_sessions()));
    crate::metrics::serve(listener, render).await;
}
