//! Who a session is: login user, every role it belongs to (transitively, from the catalog,
//! read on the session's own upstream connection before the client sees ReadyForQuery),
//! database, client address and application name. Masking and guards key on this.

use std::net::SocketAddr;

/// The identity of one client session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionIdentity {
    pub session_id: u64,
    /// `session_user` as the server reports it.
    pub user: String,
    /// The login user and every role it is a member of, directly or indirectly; sorted.
    pub roles: Vec<String>,
    pub database: String,
    pub client_addr: SocketAddr,
    pub application_name: String,
    pub search_path: String,
}

impl SessionIdentity {
    /// An identity that did not come from a session (`explain`, tests): `user` with
    /// `roles` (the user itself is added), default search_path.
    pub fn offline(user: &str, roles: &[&str], application_name: &str) -> SessionIdentity {
        let mut all: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        all.push(user.to_string());
        all.sort();
        all.dedup();
        SessionIdentity {
            session_id: 0,
            user: user.to_string(),
            roles: all,
            database: String::new(),
            client_addr: "127.0.0.1:0".parse().expect("literal address"),
            application_name: application_name.to_string(),
            search_path: "\"$user\", public".into(),
        }
    }

    /// Whether any of the session's roles is in `names` (`"*"` matches every role).
    pub fn has_any_role(&self, names: &[String]) -> bool {
        names
            .iter()
            .any(|n| n == "*" || self.roles.binary_search(n).is_ok())
    }
}

/// Reads the identity in one round trip. Membership follows `pg_auth_members` recursively
/// (UNION stops at cycles); a superuser is not treated as a member of every role, because
/// the rules name roles, not privileges. It runs under the session's own search_path, which
/// the client sets: every operator is spelled `OPERATOR(pg_catalog.=)` and every function
/// qualified, so that an operator the user created in a schema of theirs cannot answer
/// for the catalog's (an `=` that is always true would make the user a member of every
/// role, exempt from every mask).
pub const IDENTITY_QUERY: &str = "WITH RECURSIVE m(oid) AS (\
 SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) session_user \
 UNION SELECT a.roleid FROM pg_catalog.pg_auth_members a \
 JOIN m ON a.member OPERATOR(pg_catalog.=) m.oid) \
 SELECT 'u', session_user::pg_catalog.text \
 UNION ALL SELECT 'd', pg_catalog.current_database()::pg_catalog.text \
 UNION ALL SELECT 's', pg_catalog.current_setting('search_path') \
 UNION ALL SELECT 'r', r.rolname::pg_catalog.text FROM pg_catalog.pg_roles r \
 JOIN m ON r.oid OPERATOR(pg_catalog.=) m.oid";

/// Collects the rows of [`IDENTITY_QUERY`].
#[derive(Default)]
pub struct IdentityRows {
    user: Option<String>,
    database: Option<String>,
    search_path: Option<String>,
    roles: Vec<String>,
}

impl IdentityRows {
    /// Adds one `(kind, value)` row.
    pub fn push(&mut self, kind: &[u8], value: &[u8]) {
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b"u" => self.user = Some(value),
            b"d" => self.database = Some(value),
            b"s" => self.search_path = Some(value),
            b"r" => self.roles.push(value),
            _ => {}
        }
    }

    /// The identity, if the server told us who the session is.
    pub fn finish(
        mut self,
        session_id: u64,
        client_addr: SocketAddr,
        application_name: String,
    ) -> Option<SessionIdentity> {
        let user = self.user?;
        if !self.roles.contains(&user) {
            self.roles.push(user.clone());
        }
        self.roles.sort();
        self.roles.dedup();
        Some(SessionIdentity {
            session_id,
            user,
            roles: self.roles,
            database: self.database?,
            client_addr,
            application_name,
            search_path: self.search_path.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_user_and_wildcard_matches() {
        let mut rows = IdentityRows::default();
        rows.push(b"u", b"alice");
        rows.push(b"d", b"crm");
        rows.push(b"r", b"crm_support");
        rows.push(b"r", b"alice");
        rows.push(b"r", b"crm_base");
        let id = rows
            .finish(1, "127.0.0.1:5000".parse().unwrap(), "psql".into())
            .unwrap();
        assert_eq!(id.roles, vec!["alice", "crm_base", "crm_support"]);
        assert!(id.has_any_role(&["crm_base".into()]));
        assert!(id.has_any_role(&["*".into()]));
        assert!(!id.has_any_role(&["crm_admin".into()]));
    }

    #[test]
    fn missing_user_is_no_identity() {
        let mut rows = IdentityRows::default();
        rows.push(b"d", b"crm");
        assert!(rows
            .finish(1, "127.0.0.1:5000".parse().unwrap(), String::new())
            .is_none());
    }
}
