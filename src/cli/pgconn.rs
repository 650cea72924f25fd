//! The admin commands' connection to the database (`check`, `explain`, `trash`): a
//! connection string as libpq reads it, URL or `key=value`, with libpq's TLS and password
//! conventions where tokio-postgres has none: `sslmode` from `disable` to `verify-full`
//! (default `prefer`, or `PGSSLMODE`), `sslrootcert` (or `PGSSLROOTCERT`, or
//! `~/.postgresql/root.crt`) for the `verify-*` modes, and, when the string has no
//! password, `PGPASSWORD` or the password file (`PGPASSFILE`, `~/.pgpass`). DBAs can paste
//! the connection strings their tools already use.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::config::UpstreamTls;
use crate::tls;

/// A connection string split into what tokio-postgres reads and the TLS settings it does
/// not.
#[derive(Debug, PartialEq)]
struct Parsed {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a `key=value` string.
fn split_tls_params(conn: &str) -> Result<Parsed, String> {
    let mut parsed = Parsed {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            parsed.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            parsed.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            parsed.rest = conn.to_string();
            return Ok(parsed);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(key)?, percent_decode(value)?) {
                kept.push(pair);
            }
        }
        parsed.rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok(parsed);
    }
    let mut kept = Vec::new();
    for (key, value, text) in key_values(conn)? {
        if !take(&key, value) {
            kept.push(text);
        }
    }
    parsed.rest = kept.join(" ");
    Ok(parsed)
}

/// `key=value` pairs of a libpq keyword string, each with its own text; values may be
/// single-quoted with backslash escapes.
fn key_values(conn: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = conn.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(format!("`{key}` without a value in the connection string"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, '\'')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated quote in the value of `{key}`")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                value.push(c);
            }
        }
        let end = chars.peek().map_or(conn.len(), |(i, _)| *i);
        pairs.push((key, value, conn[start..end].trim_end().to_string()));
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in `{s}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8"))
}

/// Connects to `conn` (see the module comment).
pub async fn connect(conn: &str) -> Result<tokio_postgres::Client, String> {
    let shown = redact(conn);
    let parsed = split_tls_params(conn).map_err(|e| format!("reading {shown}: {e}"))?;
    let mut config: tokio_postgres::Config = parsed
        .rest
        .parse()
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if config.get_password().is_none() {
        if let Some(password) = std::env::var_os("PGPASSWORD") {
            config.password(password.as_encoded_bytes());
        } else if let Some(password) = password_file_entry(&config) {
            config.password(password);
        }
    }
    let mode = match parsed.sslmode.or_else(|| std::env::var("PGSSLMODE").ok()) {
        Some(m) => UpstreamTls::from_sslmode(&m)
            .ok_or_else(|| format!("reading {shown}: unknown sslmode `{m}`"))?,
        None => UpstreamTls::Prefer,
    };
    config.ssl_mode(match mode {
        UpstreamTls::Disable => SslMode::Disable,
        UpstreamTls::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let root = parsed
        .sslrootcert
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("PGSSLROOTCERT").map(PathBuf::from));
    let tls = AdminTls::new(mode, root.as_deref()).map_err(|e| format!("{shown}: {e}"))?;
    let (client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| format!("connecting to {shown}: {}", describe(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The password file's entry for the first host of `config` (libpq's defaults for what
/// the string leaves out: host localhost, port 5432, database named as the user).
fn password_file_entry(config: &tokio_postgres::Config) -> Option<String> {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.as_str(),
        _ => "localhost",
    };
    let user = config.get_user()?;
    super::pgpass::lookup(&super::pgpass::Target {
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        database: config.get_dbname().unwrap_or(user),
        user,
    })
}

/// tokio-postgres shows a server's error as just "db error"; the server's message is what
/// a DBA needs ("password authentication failed for user ...").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The connection string without its password, for messages.
fn redact(conn: &str) -> String {
    if let Some((creds, rest)) = conn.split_once('@') {
        if let Some((scheme, _)) = creds.split_once("://") {
            return format!("{scheme}://...@{rest}");
        }
    }
    match key_values(conn) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, _, text)| {
                if k == "password" {
                    "password=...".into()
                } else {
                    text
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "the connection string".into(),
    }
}

/// rustls for tokio-postgres, with libpq's meaning of each `sslmode`.
#[derive(Clone)]
struct AdminTls {
    config: Option<Arc<rustls::ClientConfig>>,
}

impl AdminTls {
    /// `root` is the CA for the verifying modes; libpq's default is ~/.postgresql/root.crt.
    fn new(mode: UpstreamTls, root: Option<&Path>) -> Result<AdminTls, String> {
        let default_root = || {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
                .filter(|p| p.exists())
        };
        let root = root.map(Path::to_path_buf).or_else(default_root);
        if mode.verifies() && root.is_none() {
            return Err(
                "sslmode=verify-ca/verify-full needs sslrootcert=FILE (or PGSSLROOTCERT, \
                        or ~/.postgresql/root.crt)"
                    .into(),
            );
        }
        let config = tls::client_config(mode, root.as_deref()).map_err(|e| e.to_string())?;
        Ok(AdminTls {
            config: config.map(Arc::new),
        })
    }
}

impl MakeTlsConnect<Socket> for AdminTls {
    type Stream = AdminTlsStream;
    type TlsConnect = AdminTlsConnect;
    type Error = String;

    fn make_tls_connect(&mut self, host: &str) -> Result<AdminTlsConnect, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("`{host}` is not a valid TLS server name: {e}"))?;
        Ok(AdminTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

pub struct AdminTlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for AdminTlsConnect {
    type Stream = AdminTlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<AdminTlsStream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            // With sslmode=disable tokio-postgres never asks for TLS.
            let config = self
                .config
                .ok_or_else(|| std::io::Error::other("TLS is disabled"))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, socket)
                .await?;
            Ok(AdminTlsStream(Box::new(stream)))
        })
    }
}

pub struct AdminTlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for AdminTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for AdminTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let p = split_tls_params(
            "postgres://u@db:5432/crm?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(p.rest, "postgres://u@db:5432/crm?application_name=x");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let p = split_tls_params("postgresql://u@db/crm?sslmode=require").unwrap();
        assert_eq!(p.rest, "postgresql://u@db/crm");
        let p = split_tls_params("postgres://u@db/crm").unwrap();
        assert_eq!((p.rest.as_str(), p.sslmode), ("postgres://u@db/crm", None));
    }

    #[test]
    fn tls_parameters_are_taken_out_of_keyword_strings() {
        let p = split_tls_params(
            "host=db  sslmode = verify-ca sslrootcert='/etc/my ca.pem' password='a\\'b c'",
        )
        .unwrap();
        assert_eq!(p.rest, "host=db password='a\\'b c'");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        assert!(split_tls_params("host=db sslrootcert='/x").is_err());
        assert!(split_tls_params("host").is_err());
    }

    #[test]
    fn messages_never_show_a_password() {
        assert_eq!(
            redact("postgres://u:secret@db/crm"),
            "postgres://...@db/crm"
        );
        assert_eq!(
            redact("host=db password='s e' user=u"),
            "host=db password=... user=u"
        );
        assert_eq!(UpstreamTls::from_sslmode("verify-all"), None);
    }
}
