//! SQLSTATE codes pgveil reports itself (Appendix A of the PostgreSQL manual).

/// A five-character SQLSTATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    /// 40001: nothing ran; running it again is expected to work (drivers retry it).
    pub const SERIALIZATION_FAILURE: SqlState = SqlState("40001");
    /// 08P01: the peer broke the protocol.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    /// 08006: the upstream connection failed or was lost.
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    /// 08001: the upstream could not be reached.
    pub const UNABLE_TO_CONNECT: SqlState = SqlState("08001");
    /// 28000: the client may not connect this way (for example without TLS).
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    /// 42501: a pgveil policy refused the statement.
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    /// 53300: over the configured connection cap.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    /// 57P01: pgveil is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// 57P05: the client stayed idle past the idle timeout.
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    /// 0A000: something PostgreSQL supports but pgveil does not relay.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    /// 58030: the audit log cannot be written, so no result may be released.
    pub const IO_ERROR: SqlState = SqlState("58030");
    /// XX000: an internal fault; details go to pgveil's log only.
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");

    pub fn code(&self) -> &'static str {
        self.0
    }
}
