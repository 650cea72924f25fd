//! Configuration: `serve` settings from flags and an optional TOML file (flags win), and the
//! rules (`rules.rs`), each turned from raw serde structs into validated types.

pub mod rules;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub use rules::{Rules, RulesError};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// How pgveil talks to the upstream server (libpq's `sslmode` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without verifying its certificate.
    Prefer,
    /// TLS or fail, without verifying the certificate.
    Require,
    /// TLS with the certificate chained to `--upstream-ca`, whatever host it names.
    VerifyCa,
    /// TLS with the certificate verified against `--upstream-ca` and the host name.
    VerifyFull,
}

impl UpstreamTls {
    /// The mode named by a libpq `sslmode` value (`allow` reads as `prefer`: TLS when the
    /// server offers it is the safer reading of "either").
    pub fn from_sslmode(value: &str) -> Option<UpstreamTls> {
        Some(match value {
            "disable" => UpstreamTls::Disable,
            "allow" | "prefer" => UpstreamTls::Prefer,
            "require" => UpstreamTls::Require,
            "verify-ca" => UpstreamTls::VerifyCa,
            "verify-full" => UpstreamTls::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, UpstreamTls::VerifyCa | UpstreamTls::VerifyFull)
    }
}

/// When audit records are forced to disk (see `audit::writer` for the guarantees).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuditFlush {
    /// fdatasync before any statement whose record is in the batch is answered.
    Always,
    /// fdatasync at most --audit-flush-interval-ms after a write.
    Interval,
}

/// The audit log as `serve` runs it.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub writer: crate::audit::WriterConfig,
    /// Literals in `statement` become `?`.
    pub redact: bool,
}

/// Every setting of `pgveil serve`, as read from a config file; all optional so that
/// command-line flags can be layered on top.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub rules: Option<PathBuf>,
    pub audit_log: Option<String>,
    /// `false` turns the audit log off (benchmarks; nothing is recorded).
    pub audit: Option<bool>,
    pub audit_flush: Option<AuditFlush>,
    pub audit_flush_interval_ms: Option<u64>,
    pub audit_max_bytes: Option<u64>,
    pub audit_keep: Option<usize>,
    pub audit_keep_days: Option<u64>,
    pub audit_redact: Option<bool>,
    pub auth_max_failures: Option<u32>,
    pub auth_failure_window_secs: Option<u64>,
    pub auth_ban_secs: Option<u64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub require_tls: Option<bool>,
    pub upstream_tls: Option<UpstreamTls>,
    pub upstream_ca: Option<PathBuf>,
    pub metrics: Option<String>,
    pub admin_listen: Option<String>,
    pub unix_socket_dir: Option<PathBuf>,
    pub max_client_conn: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub client_idle_timeout_secs: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub max_message_bytes: Option<usize>,
    pub worker_threads: Option<usize>,
}

impl ServeSettings {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<ServeSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: location(path, &text, e.span()),
            message: e.message().trim().replace('\n', "; "),
        })
    }

    /// `self` with every unset value taken from `base`.
    pub fn or(self, base: ServeSettings) -> ServeSettings {
        ServeSettings {
            listen: self.listen.or(base.listen),
            upstream: self.upstream.or(base.upstream),
            rules: self.rules.or(base.rules),
            audit_log: self.audit_log.or(base.audit_log),
            audit: self.audit.or(base.audit),
            audit_flush: self.audit_flush.or(base.audit_flush),
            audit_flush_interval_ms: self
                .audit_flush_interval_ms
                .or(base.audit_flush_interval_ms),
            audit_max_bytes: self.audit_max_bytes.or(base.audit_max_bytes),
            audit_keep: self.audit_keep.or(base.audit_keep),
            audit_keep_days: self.audit_keep_days.or(base.audit_keep_days),
            audit_redact: self.audit_redact.or(base.audit_redact),
            auth_max_failures: self.auth_max_failures.or(base.auth_max_failures),
            auth_failure_window_secs: self
                .auth_failure_window_secs
                .or(base.auth_failure_window_secs),
            auth_ban_secs: self.auth_ban_secs.or(base.auth_ban_secs),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            require_tls: self.require_tls.or(base.require_tls),
            upstream_tls: self.upstream_tls.or(base.upstream_tls),
            upstream_ca: self.upstream_ca.or(base.upstream_ca),
            metrics: self.metrics.or(base.metrics),
            admin_listen: self.admin_listen.or(base.admin_listen),
            unix_socket_dir: self.unix_socket_dir.or(base.unix_socket_dir),
            max_client_conn: self.max_client_conn.or(base.max_client_conn),
            handshake_timeout_secs: self.handshake_timeout_secs.or(base.handshake_timeout_secs),
            client_idle_timeout_secs: self
                .client_idle_timeout_secs
                .or(base.client_idle_timeout_secs),
            connect_timeout_secs: self.connect_timeout_secs.or(base.connect_timeout_secs),
            shutdown_grace_secs: self.shutdown_grace_secs.or(base.shutdown_grace_secs),
            max_message_bytes: self.max_message_bytes.or(base.max_message_bytes),
            worker_threads: self.worker_threads.or(base.worker_threads),
        }
    }
}

/// Validated settings the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: String,
    /// `host:port` of the real server.
    pub upstream: String,
    /// The host part of `upstream`, for TLS server-name checks.
    pub upstream_host: String,
    /// The server's socket file when `upstream` is `unix:...`.
    pub upstream_socket: Option<PathBuf>,
    pub rules_path: PathBuf,
    pub audit_log: String,
    /// `None` when the audit log is off.
    pub audit: Option<AuditConfig>,
    pub auth_throttle: AuthThrottleConfig,
    pub client_tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// Where the admin console listens (`--admin-listen`).
    pub admin: Option<String>,
    /// A directory to listen in too (`--unix-socket-dir`).
    pub unix_socket_dir: Option<PathBuf>,
    pub limits: Limits,
}

/// Resource limits and timeouts; zero durations mean "no limit".
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_client_conn: usize,
    pub handshake_timeout: Duration,
    pub client_idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_message_bytes: usize,
    /// Runtime threads; 1 runs every session on one thread, as PgBouncer does.
    pub worker_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_conn: 1000,
            handshake_timeout: Duration::from_secs(60),
            client_idle_timeout: None,
            connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            max_message_bytes: 256 * 1024 * 1024,
            worker_threads: 1,
        }
    }
}

impl Config {
    /// Applies defaults and checks the combination of settings.
    pub fn from_settings(s: ServeSettings) -> Result<Config, ConfigError> {
        let d = Limits::default();
        let upstream = s.upstream.unwrap_or_else(|| "127.0.0.1:5432".into());
        let upstream_socket = unix_socket(&upstream, 5432);
        let upstream_host = match upstream_socket {
            Some(_) => "localhost".to_string(),
            None => split_host_port(&upstream).ok_or_else(|| ConfigError::Invalid {
                key: "upstream",
                message: format!("{upstream:?} is not HOST:PORT or unix:DIRECTORY"),
            })?,
        };
        if upstream_socket.is_some()
            && !matches!(
                s.upstream_tls,
                None | Some(UpstreamTls::Disable) | Some(UpstreamTls::Prefer)
            )
        {
            return Err(ConfigError::Invalid {
                key: "upstream_tls",
                message: "PostgreSQL offers no TLS over a Unix-domain socket: use disable or prefer with a unix: upstream".into(),
            });
        }
        if let (Some(listen), Some(_)) = (&s.listen, &s.unix_socket_dir) {
            if unix_socket(listen, 6432).is_some() {
                return Err(ConfigError::Invalid {
                    key: "unix_socket_dir",
                    message: "--listen unix:... already names the socket; --unix-socket-dir adds one beside a TCP --listen".into(),
                });
            }
        }
        let client_tls = match (s.tls_cert, s.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    message: "--tls-cert and --tls-key go together".into(),
                })
            }
        };
        let require_tls = s.require_tls.unwrap_or(false);
        if require_tls && client_tls.is_none() {
            return Err(ConfigError::Invalid {
                key: "require_tls",
                message: "--require-tls needs --tls-cert and --tls-key".into(),
            });
        }
        let upstream_tls = s.upstream_tls.unwrap_or(UpstreamTls::Prefer);
        if upstream_tls.verifies() && s.upstream_ca.is_none() {
            return Err(ConfigError::Invalid {
                key: "upstream_tls",
                message: "verify-ca and verify-full need --upstream-ca".into(),
            });
        }
        let metrics = match s.metrics {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| ConfigError::Invalid {
                key: "metrics",
                message: format!("{m:?} is not an IP:PORT address"),
            })?),
        };
        let secs = |v: Option<u64>, dflt: Duration| v.map(Duration::from_secs).unwrap_or(dflt);
        let audit_log = s.audit_log.unwrap_or_else(|| "audit.jsonl".into());
        if audit_log.is_empty() {
            return Err(ConfigError::Invalid {
                key: "audit_log",
                message: "an empty path; use --no-audit to turn the audit log off".into(),
            });
        }
        let flush = match s.audit_flush.unwrap_or(AuditFlush::Interval) {
            AuditFlush::Always => crate::audit::FlushPolicy::Always,
            AuditFlush::Interval => crate::audit::FlushPolicy::Interval(Duration::from_millis(
                s.audit_flush_interval_ms.unwrap_or(1000).max(1),
            )),
        };
        let audit = s.audit.unwrap_or(true).then(|| AuditConfig {
            writer: crate::audit::WriterConfig {
                path: audit_log.clone(),
                flush,
                max_bytes: s.audit_max_bytes.unwrap_or(100 * 1024 * 1024),
                queue: 4096,
                retention: crate::audit::Retention {
                    files: s.audit_keep.filter(|n| *n > 0),
                    max_age: s
                        .audit_keep_days
                        .filter(|d| *d > 0)
                        .map(|d| Duration::from_secs(d.saturating_mul(86_400))),
                },
            },
            redact: s.audit_redact.unwrap_or(false),
        });
        let auth_throttle = AuthThrottleConfig {
            max_failures: s.auth_max_failures.unwrap_or(10),
            window: secs(s.auth_failure_window_secs, Duration::from_secs(60)),
            ban: secs(s.auth_ban_secs, Duration::from_secs(300)),
        };
        Ok(Config {
            listen: s.listen.unwrap_or_else(|| "127.0.0.1:6432".into()),
            upstream,
            upstream_host,
            upstream_socket,
            rules_path: s.rules.unwrap_or_else(|| PathBuf::from("rules/")),
            audit_log,
            audit,
            auth_throttle,
            client_tls,
            require_tls,
            upstream_tls,
            upstream_ca: s.upstream_ca,
            metrics,
            admin: s.admin_listen.filter(|a| !a.is_empty()),
            unix_socket_dir: s.unix_socket_dir,
            limits: Limits {
                max_client_conn: s.max_client_conn.unwrap_or(d.max_client_conn).max(1),
                handshake_timeout: secs(s.handshake_timeout_secs, d.handshake_timeout),
                client_idle_timeout: s
                    .client_idle_timeout_secs
                    .filter(|&v| v > 0)
                    .map(Duration::from_secs),
                connect_timeout: secs(s.connect_timeout_secs, d.connect_timeout),
                shutdown_grace: secs(s.shutdown_grace_secs, d.shutdown_grace),
                max_message_bytes: s.max_message_bytes.unwrap_or(d.max_message_bytes),
                worker_threads: s.worker_threads.unwrap_or(d.worker_threads).max(1),
            },
        })
    }
}

/// The socket file of a `unix:` address, in libpq's convention: `unix:/dir` is
/// `/dir/.s.PGSQL.<default_port>`, `unix:/dir/.s.PGSQL.5433` names the file itself.
/// `None` for a TCP address.
pub fn unix_socket(address: &str, default_port: u16) -> Option<PathBuf> {
    let path = Path::new(address.strip_prefix("unix:")?);
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".s.PGSQL."));
    Some(if named {
        path.to_path_buf()
    } else {
        path.join(format!(".s.PGSQL.{default_port}"))
    })
}

/// The host of `host:port` (`[v6]:port` too), if the port is a number.
fn split_host_port(s: &str) -> Option<String> {
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// `path:line` for a byte span of `text`.
pub(crate) fn location(path: &Path, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => format!("{}:{}", path.display(), line_of(text, span.start)),
        None => path.display().to_string(),
    }
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Brute-force guard settings; `max_failures` 0 turns it off.
#[derive(Clone, Copy, Debug)]
pub struct AuthThrottleConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub ban: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_addresses_follow_libpq_and_refuse_what_cannot_work() {
        let socket = |a: &str| unix_socket(a, 5432);
        assert_eq!(
            socket("unix:/run/pg"),
            Some(PathBuf::from("/run/pg/.s.PGSQL.5432"))
        );
        assert_eq!(
            socket("unix:/run/pg/.s.PGSQL.6000"),
            Some(PathBuf::from("/run/pg/.s.PGSQL.6000"))
        );
        assert_eq!(socket("127.0.0.1:5432"), None);
        let both = ServeSettings {
            listen: Some("unix:/tmp".into()),
            unix_socket_dir: Some("/tmp".into()),
            ..Default::default()
        };
        assert!(Config::from_settings(both).is_err());
        let tls = ServeSettings {
            upstream: Some("unix:/run/postgresql".into()),
            upstream_tls: Some(UpstreamTls::Require),
            ..Default::default()
        };
        assert!(Config::from_settings(tls).is_err());
        let plain = ServeSettings {
            upstream: Some("unix:/run/postgresql".into()),
            ..Default::default()
        };
        assert!(Config::from_settings(plain).is_ok());
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_settings(ServeSettings::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6432");
        assert_eq!(c.upstream, "127.0.0.1:5432");
        assert_eq!(c.rules_path, PathBuf::from("rules/"));
        assert_eq!(c.audit_log, "audit.jsonl");
        assert_eq!(c.upstream_tls, UpstreamTls::Prefer);
        assert!(c.client_tls.is_none() && !c.require_tls && c.metrics.is_none());
    }

    #[test]
    fn audit_and_login_guard_settings_from_a_config_file() {
        let file: ServeSettings = toml::from_str(
            "audit_log = \"/var/log/pgveil/a.jsonl\"\naudit_flush = \"always\"\n\
             audit_max_bytes = 0\naudit_redact = true\nauth_max_failures = 3\n\
             auth_failure_window_secs = 10\nauth_ban_secs = 20\nmetrics = \"127.0.0.1:9187\"\n",
        )
        .unwrap();
        let c = Config::from_settings(file).unwrap();
        let audit = c.audit.expect("on unless audit = false");
        assert_eq!(audit.writer.path, "/var/log/pgveil/a.jsonl");
        assert_eq!(audit.writer.flush, crate::audit::FlushPolicy::Always);
        assert_eq!(audit.writer.max_bytes, 0);
        assert!(audit.redact);
        assert_eq!(c.auth_throttle.max_failures, 3);
        assert_eq!(c.auth_throttle.ban, Duration::from_secs(20));
        let defaults = Config::from_settings(ServeSettings::default()).unwrap();
        let audit = defaults.audit.expect("the audit log is on by default");
        assert_eq!(
            audit.writer.flush,
            crate::audit::FlushPolicy::Interval(Duration::from_secs(1))
        );
        assert_eq!(audit.writer.max_bytes, 100 * 1024 * 1024);
        let off: ServeSettings = toml::from_str("audit = false\n").unwrap();
        assert!(Config::from_settings(off).unwrap().audit.is_none());
    }

    #[test]
    fn flags_win_over_file() {
        let file: ServeSettings =
            toml::from_str("listen = \"0.0.0.0:7000\"\nupstream = \"db:5433\"\n").unwrap();
        let flags = ServeSettings {
            listen: Some("127.0.0.1:7001".into()),
            ..Default::default()
        };
        let c = Config::from_settings(flags.or(file)).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7001");
        assert_eq!(c.upstream, "db:5433");
        assert_eq!(c.upstream_host, "db");
    }

    #[test]
    fn rejects_inconsistent_settings() {
        let bad = |s: ServeSettings| Config::from_settings(s).is_err();
        assert!(bad(ServeSettings {
            require_tls: Some(true),
            ..Default::default()
        }));
        assert!(bad(ServeSettings {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        }));
        assert!(bad(ServeSettings {
            upstream_tls: Some(UpstreamTls::VerifyFull),
            ..Default::default()
        }));
        assert!(bad(ServeSettings {
            upstream_tls: Some(UpstreamTls::VerifyCa),
            ..Default::default()
        }));
        assert!(bad(ServeSettings {
            upstream: Some("nohost".into()),
            ..Default::default()
        }));
    }

    #[test]
    fn unknown_config_keys_are_reported_with_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgveil.toml");
        std::fs::write(&p, "listen = \"x:1\"\nlisten_port = 5\n").unwrap();
        let err = ServeSettings::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("pgveil.toml:2"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }
}
