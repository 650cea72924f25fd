//! `pgveil health`: whether a pgveil answers on its listen address and reaches its
//! server, as `pg_isready` tells (so container images need no PostgreSQL client).
//!
//! It opens a session with a StartupMessage for a user that need not exist and reads the
//! first reply, then hangs up: an authentication request, or any error but the ones that
//! say the server cannot be reached or cannot take connections now, means a server
//! answered through pgveil.

use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::startup::StartupMessage;

/// The probe's outcome, with `pg_isready`'s exit codes.
#[derive(Debug, PartialEq, Eq)]
pub enum Health {
    /// 0: a server answered through pgveil.
    Accepting,
    /// 1: pgveil answered, but its server cannot be reached or takes no connections now.
    Rejecting(String),
    /// 2: nothing answered.
    NoResponse(String),
}

impl Health {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Health::Accepting => 0,
            Health::Rejecting(_) => 1,
            Health::NoResponse(_) => 2,
        })
    }
}

/// Probes `addr` (host:port), giving up after `timeout`.
pub async fn probe(addr: &str, timeout: Duration) -> Health {
    match tokio::time::timeout(timeout, exchange(addr)).await {
        Ok(h) => h,
        Err(_) => Health::NoResponse(format!("no answer within {}s", timeout.as_secs_f32())),
    }
}

async fn exchange(addr: &str) -> Health {
    let mut tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Health::NoResponse(e.to_string()),
    };
    // TLS when pgveil offers it (a listener with --require-tls takes nothing else); the
    // probe sends no secret, so the certificate is not checked.
    let ssl = crate::protocol::startup::ssl_request_packet();
    let mut answer = [0u8; 1];
    if let Err(e) = async {
        tcp.write_all(&ssl).await?;
        tcp.read_exact(&mut answer).await
    }
    .await
    {
        return Health::NoResponse(format!("the connection closed: {e}"));
    }
    let mut s = match answer[0] {
        b'S' => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tls =
                crate::tls::UpstreamConnector::new(crate::config::UpstreamTls::Require, None, host)
                    .or_else(|_| {
                        crate::tls::UpstreamConnector::new(
                            crate::config::UpstreamTls::Require,
                            None,
                            "localhost",
                        )
                    });
            match tls {
                Ok(c) => match c.connect(tcp).await {
                    Ok(s) => s,
                    Err(e) => return Health::NoResponse(format!("TLS: {e}")),
                },
                Err(e) => return Health::NoResponse(format!("TLS: {e}")),
            }
        }
        b'N' => crate::tls::Stream::Plain(tcp),
        other => {
            return Health::NoResponse(format!(
                "not a PostgreSQL server (answer {other:#04x} to SSLRequest)"
            ))
        }
    };
    let startup = StartupMessage::new(&[
        ("user", "pgveil_health"),
        ("database", "postgres"),
        ("application_name", "pgveil health"),
    ]);
    if let Err(e) = s.write_all(startup.raw()).await {
        return Health::NoResponse(e.to_string());
    }
    let mut head = [0u8; 5];
    if let Err(e) = s.read_exact(&mut head).await {
        return Health::NoResponse(format!("the connection closed: {e}"));
    }
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    match head[0] {
        b'R' => Health::Accepting,
        b'E' if (4..=64 * 1024).contains(&len) => {
            let mut body = vec![0u8; len as usize - 4];
            if let Err(e) = s.read_exact(&mut body).await {
                return Health::NoResponse(format!("the connection closed: {e}"));
            }
            let fields = error_fields(&body);
            let code = fields
                .iter()
                .find(|(k, _)| *k == b'C')
                .map(|(_, v)| v.as_str());
            let message = fields
                .iter()
                .find(|(k, _)| *k == b'M')
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            match code {
                // The server is starting, stopping or full, or pgveil cannot reach it, or
                // pgveil itself turns connections away (full, or this address banned).
                Some(c)
                    if c == "57P03" || c.starts_with("08") || message.starts_with("pgveil:") =>
                {
                    Health::Rejecting(format!("{} {message}", c))
                }
                _ => Health::Accepting,
            }
        }
        other => Health::NoResponse(format!("not a PostgreSQL server (first byte {other:#04x})")),
    }
}

/// An ErrorResponse's fields by their one-byte codes.
fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// `pgveil health`: prints the outcome, exits as `pg_isready` does.
pub fn run(addr: &str, timeout_secs: u64) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgveil health: {e}");
            return ExitCode::from(2);
        }
    };
    let health = runtime.block_on(probe(addr, Duration::from_secs(timeout_secs)));
    match &health {
        Health::Accepting => println!("{addr}: accepting connections"),
        Health::Rejecting(why) => println!("{addr}: rejecting connections ({why})"),
        Health::NoResponse(why) => println!("{addr}: no response ({why})"),
    }
    health.exit_code()
}
