//! Who audit records are about: fixed for a session, or what a StartupMessage claims
//! before authentication; and session event records.

use time::OffsetDateTime;

use crate::audit::record::timestamp;
use crate::audit::{Event, Record};
use crate::identity::SessionIdentity;

/// Who the records are about (fixed for the session).
#[derive(Debug, Clone)]
pub struct Who {
    pub session: u64,
    pub user: String,
    pub database: String,
    pub client_addr: String,
    pub application_name: String,
}

impl Who {
    pub fn of(identity: &SessionIdentity) -> Who {
        Who {
            session: identity.session_id,
            user: identity.user.clone(),
            database: identity.database.clone(),
            client_addr: identity.client_addr.to_string(),
            application_name: identity.application_name.clone(),
        }
    }

    /// Before authentication: what the StartupMessage claims.
    pub fn before_auth(
        session: u64,
        message: &crate::protocol::startup::StartupMessage,
        client_addr: std::net::SocketAddr,
    ) -> Who {
        let param = |k: &str| message.param(k).unwrap_or_default().to_string();
        let user = param("user");
        let database = match message.param("database") {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => user.clone(),
        };
        Who {
            session,
            user,
            database,
            client_addr: client_addr.to_string(),
            application_name: crate::session::encoding::startup_param(message, "application_name"),
        }
    }

    /// A session event record (connect, disconnect, auth failure, alert ...).
    pub fn event(&self, event: Event, message: Option<&str>, rule: Option<&str>) -> Vec<u8> {
        Record {
            application_name: &self.application_name,
            client_addr: &self.client_addr,
            database: &self.database,
            event: Some(event),
            message,
            rule,
            session: self.session,
            ts: timestamp(OffsetDateTime::now_utc()),
            user: &self.user,
            ..Default::default()
        }
        .canonical()
    }
}
