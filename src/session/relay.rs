//! The Ready phase: two pumps in one task, client → server and server → client, sharing
//! the session state. Frames are read in batches and written with one write per batch;
//! each frame is forwarded as the bytes it arrived in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::server::{shutdown_level, ShutdownWatch};
use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::error::{already_reported, SessionError};
use super::state::SessionState;
use super::{BoxRead, Legs};
use crate::protocol::backend::{self, TransactionStatus};
use crate::protocol::frontend::FrontendMessage;
use crate::protocol::{Frame, FrameReader};

/// How the relay ended without an error to report.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated,
    /// The server ended the session with a FATAL error the client has received.
    ServerClosed,
}

/// Relays until one side ends or the proxy stops.
pub async fn run(
    legs: &mut Legs,
    state: &Mutex<SessionState>,
    idle_timeout: Option<Duration>,
    shutdown: &ShutdownWatch<'_>,
) -> Result<RelayEnd, SessionError> {
    // Set while a pump is part-way through writing to the client, so that no error frame
    // is written into the middle of another message afterwards.
    let client_dirty = AtomicBool::new(false);
    // Set once shutdown begins; each pump then ends the session when nothing is running.
    let draining = AtomicBool::new(false);
    let client_partial = AtomicBool::new(false);
    let c2s = client_to_server(
        &mut legs.client_r,
        &mut legs.upstream_w,
        state,
        idle_timeout,
        &draining,
        &client_partial,
    );
    let s2c = server_to_client(
        &mut legs.upstream_r,
        &mut legs.client_w,
        state,
        &client_dirty,
        &draining,
    );
    tokio::pin!(c2s, s2c);
    let mut level = shutdown_level::RUNNING;
    let result = loop {
        tokio::select! {
            // Fixed order: no per-wake random number, and replies first.
            biased;
            r = &mut s2c => break r,
            r = &mut c2s => break r,
            seen = shutdown.above(level) => {
                level = seen;
                if level >= shutdown_level::STOP {
                    break Err(SessionError::Shutdown);
                }
                draining.store(true, Ordering::Relaxed);
                let idle = lock(state).is_idle();
                if idle && !client_partial.load(Ordering::Relaxed) {
                    break Err(SessionError::Shutdown);
                }
            }
        }
    };
    if client_dirty.load(Ordering::Acquire) && result.is_err() {
        return Err(SessionError::Reported(already_reported()));
    }
    result
}

fn lock(state: &Mutex<SessionState>) -> std::sync::MutexGuard<'_, SessionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn client_to_server(
    client: &mut FrameReader<BoxRead>,
    upstream: &mut (impl AsyncWrite + Unpin),
    state: &Mutex<SessionState>,
    idle_timeout: Option<Duration>,
    draining: &AtomicBool,
    client_partial: &AtomicBool,
) -> Result<RelayEnd, SessionError> {
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        let (idle, outside_tx) = {
            let st = lock(state);
            (
                st.is_idle() && !client.has_partial(),
                st.transaction != Some(TransactionStatus::InBlock),
            )
        };
        if idle && draining.load(Ordering::Relaxed) {
            return Err(SessionError::Shutdown);
        }
        client_partial.store(client.has_partial(), Ordering::Relaxed);
        let first = match idle_timeout.filter(|_| idle && outside_tx) {
            Some(limit) => tokio::time::timeout(limit, client.next())
                .await
                .map_err(|_| SessionError::IdleTimeout)?,
            None => client.next().await,
        }
        .map_err(SessionError::from_client)?;
        let mut terminated = false;
        {
            let mut st = lock(state);
            let mut frame = Some(first);
            while let Some(f) = frame {
                let msg = FrontendMessage::parse(&f).map_err(SessionError::Client)?;
                if msg == FrontendMessage::Terminate {
                    terminated = true;
                }
                st.on_client(&msg);
                out.extend_from_slice(f.raw());
                if terminated {
                    break;
                }
                frame = client.buffered().map_err(SessionError::Client)?;
            }
        }
        client_partial.store(client.has_partial(), Ordering::Relaxed);
        upstream
            .write_all(&out)
            .await
            .map_err(SessionError::upstream)?;
        out.clear();
        if terminated {
            return Ok(RelayEnd::Terminated);
        }
    }
}

async fn server_to_client(
    upstream: &mut FrameReader<BoxRead>,
    client: &mut (impl AsyncWrite + Unpin),
    state: &Mutex<SessionState>,
    client_dirty: &AtomicBool,
    draining: &AtomicBool,
) -> Result<RelayEnd, SessionError> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let first = upstream.next().await.map_err(|e| {
            if e.is_disconnect() {
                SessionError::Upstream("the server closed the connection".into())
            } else {
                SessionError::upstream(e)
            }
        })?;
        let mut fatal = false;
        {
            let mut st = lock(state);
            let mut frame = Some(first);
            while let Some(f) = frame {
                fatal |= on_server_frame(&mut st, &f)?;
                out.extend_from_slice(f.raw());
                // Bound the batch so a fast server cannot grow it without limit.
                if fatal || out.len() >= 256 * 1024 {
                    break;
                }
                frame = upstream.buffered().map_err(SessionError::upstream)?;
            }
        }
        client_dirty.store(true, Ordering::Release);
        client
            .write_all(&out)
            .await
            .map_err(|e| SessionError::from_client(e.into()))?;
        client_dirty.store(false, Ordering::Release);
        out.clear();
        if fatal {
            return Ok(RelayEnd::ServerClosed);
        }
        if draining.load(Ordering::Relaxed) && lock(state).is_idle() {
            return Err(SessionError::Shutdown);
        }
    }
}

/// Updates the state for one server frame; true when it is a FATAL error that ends the
/// session.
fn on_server_frame(st: &mut SessionState, f: &Frame) -> Result<bool, SessionError> {
    match f.tag() {
        // DataRow: the hot path; nothing to learn until masking plans exist.
        b'D' => {}
        b'T' => {
            let rows = backend::row_description(f).map_err(SessionError::upstream)?;
            st.on_server(b'T', Some(rows));
        }
        b'Z' => {
            let status = backend::ready_for_query(f).map_err(SessionError::upstream)?;
            st.on_server(b'Z', None);
            st.on_ready(status);
        }
        b'S' => {
            let (k, v) = backend::parameter_status(f).map_err(SessionError::upstream)?;
            st.server_params.insert(k.to_string(), v.to_string());
        }
        b'E' => {
            st.on_server(b'E', None);
            let (_, severity) = backend::error_code_and_severity(f);
            return Ok(severity == "FATAL" || severity == "PANIC");
        }
        tag => {
            st.on_server(tag, None);
        }
    }
    Ok(false)
}
