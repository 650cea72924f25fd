//! The sessions pgveil is serving, as operators see them (`SHOW CLIENTS`, `SHOW STATS`,
//! `KILL` in the admin console): who each one is, since when, what it is doing, and what it
//! has done. Each session keeps its own counters (relaxed atomics, touched once per
//! statement or batch); a closed session's counters are added to its database's totals.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use time::OffsetDateTime;

use crate::identity::SessionIdentity;
use crate::protocol::startup::CancelKey;

/// What one session (or a database, summed) has done.
#[derive(Debug, Default)]
pub struct Counters {
    pub statements: AtomicU64,
    /// Rows the statements returned or changed, as the server counted them.
    pub rows: AtomicU64,
    /// Rows returned with masked columns.
    pub masked_rows: AtomicU64,
    /// Statements pgveil refused.
    pub refusals: AtomicU64,
    /// Bytes from the client to the server, and back.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub statements: u64,
    pub rows: u64,
    pub masked_rows: u64,
    pub refusals: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Counters {
    pub fn statement(&self, rows: u64, masked: bool, refused: bool) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        if masked {
            self.masked_rows.fetch_add(rows, Ordering::Relaxed);
        }
        if refused {
            self.refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn totals(&self) -> Totals {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            statements: load(&self.statements),
            rows: load(&self.rows),
            masked_rows: load(&self.masked_rows),
            refusals: load(&self.refusals),
            bytes_received: load(&self.bytes_received),
            bytes_sent: load(&self.bytes_sent),
        }
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.statements += o.statements;
        self.rows += o.rows;
        self.masked_rows += o.masked_rows;
        self.refusals += o.refusals;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
    }
}

/// What a session is doing, in `pg_stat_activity`'s words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Idle,
    Active,
    IdleInTransaction,
    IdleInFailedTransaction,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::Active => "active",
            Activity::IdleInTransaction => "idle in transaction",
            Activity::IdleInFailedTransaction => "idle in transaction (aborted)",
        }
    }

    fn from_u8(v: u8) -> Activity {
        match v {
            1 => Activity::Active,
            2 => Activity::IdleInTransaction,
            3 => Activity::IdleInFailedTransaction,
            _ => Activity::Idle,
        }
    }
}

/// One session past authentication.
#[derive(Debug)]
pub struct LiveSession {
    pub identity: SessionIdentity,
    pub since: OffsetDateTime,
    pub tls: bool,
    /// Whether any mask, or the guard, applies to the session (rules reloads change it).
    masked: AtomicBool,
    guarded: AtomicBool,
    /// The server backend's cancel key, to stop what a killed session was running.
    pub server_key: Option<CancelKey>,
    pub counters: Counters,
    activity: AtomicU8,
}

impl LiveSession {
    pub fn new(
        identity: SessionIdentity,
        tls: bool,
        masked: bool,
        guarded: bool,
        server_key: Option<CancelKey>,
    ) -> LiveSession {
        LiveSession {
            identity,
            since: OffsetDateTime::now_utc(),
            tls,
            masked: AtomicBool::new(masked),
            guarded: AtomicBool::new(guarded),
            server_key,
            counters: Counters::default(),
            activity: AtomicU8::new(Activity::Idle as u8),
        }
    }

    pub fn masked(&self) -> bool {
        self.masked.load(Ordering::Relaxed)
    }

    pub fn guarded(&self) -> bool {
        self.guarded.load(Ordering::Relaxed)
    }

    /// The session's policy after a rules reload.
    pub fn set_policy(&self, masked: bool, guarded: bool) {
        self.masked.store(masked, Ordering::Relaxed);
        self.guarded.store(guarded, Ordering::Relaxed);
    }

    pub fn activity(&self) -> Activity {
        Activity::from_u8(self.activity.load(Ordering::Relaxed))
    }

    pub fn set_activity(&self, a: Activity) {
        self.activity.store(a as u8, Ordering::Relaxed);
    }
}

/// Every live session, and the totals of closed ones by database.
#[derive(Default)]
pub struct Sessions {
    live: DashMap<u64, Arc<LiveSession>>,
    closed: Mutex<BTreeMap<String, Totals>>,
}

/// One database's line of `SHOW STATS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatabaseStats {
    pub database: String,
    pub sessions: u64,
    pub totals: Totals,
}

impl Sessions {
    pub fn open(&self, session: Arc<LiveSession>) {
        self.live.insert(session.identity.session_id, session);
    }

    /// Removes a session; its counters go to its database's totals.
    pub fn close(&self, id: u64) {
        if let Some((_, s)) = self.live.remove(&id) {
            let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            *closed.entry(s.identity.database.clone()).or_default() += s.counters.totals();
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<LiveSession>> {
        self.live.get(&id).map(|s| s.clone())
    }

    /// The live sessions, by id.
    pub fn list(&self) -> Vec<Arc<LiveSession>> {
        let mut all: Vec<_> = self.live.iter().map(|s| s.clone()).collect();
        all.sort_by_key(|s| s.identity.session_id);
        all
    }

    /// Per database: live sessions and everything done since pgveil started.
    pub fn stats(&self) -> Vec<DatabaseStats> {
        let mut by_db: BTreeMap<String, DatabaseStats> = self
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(db, t)| {
                let stats = DatabaseStats {
                    database: db.clone(),
                    sessions: 0,
                    totals: *t,
                };
                (db.clone(), stats)
            })
            .collect();
        for s in self.live.iter() {
            let db = &s.identity.database;
            let e = by_db.entry(db.clone()).or_insert_with(|| DatabaseStats {
                database: db.clone(),
                ..Default::default()
            });
            e.sessions += 1;
            e.totals += s.counters.totals();
        }
        by_db.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, db: &str) -> Arc<LiveSession> {
        let mut identity = SessionIdentity::offline("alice", &[], "app");
        identity.session_id = id;
        identity.database = db.into();
        let key = Some(CancelKey { pid: 1, secret: 2 });
        Arc::new(LiveSession::new(identity, false, true, true, key))
    }

    #[test]
    fn a_closed_session_counts_in_its_database_totals() {
        let all = Sessions::default();
        let (a, b) = (session(1, "crm"), session(2, "crm"));
        all.open(a.clone());
        all.open(b.clone());
        all.open(session(3, "other"));
        a.counters.statement(5, true, false);
        a.counters.statement(0, false, true);
        b.counters.statement(2, false, false);
        b.counters.received(10);
        b.counters.sent(20);
        all.close(1);
        assert_eq!(all.list().len(), 2);
        let stats = all.stats();
        assert_eq!(stats.len(), 2);
        let crm = &stats[0];
        assert_eq!((crm.database.as_str(), crm.sessions), ("crm", 1));
        assert_eq!(
            crm.totals,
            Totals {
                statements: 3,
                rows: 7,
                masked_rows: 5,
                refusals: 1,
                bytes_received: 10,
                bytes_sent: 20
            }
        );
        assert_eq!(
            (stats[1].database.as_str(), stats[1].sessions),
            ("other", 1)
        );
        all.close(1);
        assert_eq!(
            all.stats()[0].totals.statements,
            3,
            "closing twice adds once"
        );
    }

    #[test]
    fn activity_round_trips() {
        let s = session(1, "crm");
        for a in [
            Activity::Active,
            Activity::IdleInTransaction,
            Activity::IdleInFailedTransaction,
            Activity::Idle,
        ] {
            s.set_activity(a);
            assert_eq!(s.activity(), a);
        }
    }
}
