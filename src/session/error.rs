//! Session errors, and the one function that tells a client about them.

use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::protocol::write::{error_response, Severity};
use crate::protocol::{ProtocolError, SqlState};

#[derive(Debug, Error)]
pub enum SessionError {
    /// The client broke the protocol; the message is about message shape only.
    #[error("client protocol violation: {0}")]
    Client(ProtocolError),
    /// The client went away.
    #[error("client disconnected")]
    ClientGone,
    /// The upstream connection failed or broke the protocol; details stay in our log.
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("could not connect to upstream: {0}")]
    Connect(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("client idle past the idle timeout")]
    IdleTimeout,
    #[error("pgveil is shutting down")]
    Shutdown,
    /// An operator ended the session (the admin console's KILL).
    #[error("killed from the admin console")]
    Killed,
    /// A refusal whose message is written for the client.
    #[error("{message}")]
    Refused { code: SqlState, message: String },
    /// The client has already been told (for example the server's own FATAL was relayed).
    #[error("reported to client")]
    Reported(Reported),
}

/// Proof that the client was sent an error (or could not be reached).
#[derive(Debug)]
pub struct Reported(());

impl SessionError {
    pub fn from_client(e: ProtocolError) -> SessionError {
        if e.is_disconnect() {
            SessionError::ClientGone
        } else {
            SessionError::Client(e)
        }
    }

    pub fn upstream(e: impl std::fmt::Display) -> SessionError {
        SessionError::Upstream(e.to_string())
    }

    /// The SQLSTATE and the message a client may see; `None` when there is no one to tell.
    fn client_view(&self) -> Option<(SqlState, String)> {
        Some(match self {
            SessionError::Client(e) => (
                if matches!(e, ProtocolError::UnsupportedVersion { .. }) {
                    SqlState::FEATURE_NOT_SUPPORTED
                } else {
                    SqlState::PROTOCOL_VIOLATION
                },
                format!("pgveil: {e}"),
            ),
            SessionError::Upstream(_) => (
                SqlState::CONNECTION_FAILURE,
                "pgveil: the connection to the database server was lost".into(),
            ),
            SessionError::Connect(_) => (
                SqlState::CONNECTION_FAILURE,
                "pgveil: could not connect to the database server".into(),
            ),
            SessionError::HandshakeTimeout => (
                SqlState::PROTOCOL_VIOLATION,
                "pgveil: connection startup timed out".into(),
            ),
            SessionError::IdleTimeout => (
                SqlState::IDLE_SESSION_TIMEOUT,
                "pgveil: terminating connection due to idle timeout".into(),
            ),
            SessionError::Shutdown => (
                SqlState::ADMIN_SHUTDOWN,
                "pgveil: terminating connection because the proxy is shutting down".into(),
            ),
            SessionError::Killed => (
                SqlState::ADMIN_SHUTDOWN,
                "pgveil: terminating connection due to administrator command".into(),
            ),
            SessionError::Refused { code, message } => (*code, message.clone()),
            SessionError::ClientGone | SessionError::Reported(_) => return None,
        })
    }
}

/// Sends `err` to the client as a FATAL ErrorResponse, logging what the client is not told.
pub async fn report<W: AsyncWrite + Unpin>(client: &mut W, err: &SessionError) -> Reported {
    match err {
        SessionError::ClientGone | SessionError::Reported(_) => {}
        SessionError::Refused { .. } => tracing::info!("refused: {err}"),
        _ => tracing::warn!("session ends: {err}"),
    }
    if let Some((code, message)) = err.client_view() {
        let frame = error_response(Severity::Fatal, code, &message);
        // The client may already be gone; there is nobody else to tell.
        let _ = client.write_all(frame.raw()).await;
        let _ = client.flush().await;
    }
    Reported(())
}

/// For errors the server itself reported to the client.
pub fn already_reported() -> Reported {
    Reported(())
}
