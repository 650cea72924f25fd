//! The session's masking policy on the client side: each statement is checked before it
//! is forwarded (with verdicts cached by SQL text), and refused statements are replaced by
//! one that makes the server raise the refusal itself, so transaction state stays in step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::identity::SessionIdentity;
use crate::catalog::Catalog;
use crate::config::rules::Unanalysable;
use crate::policy::SessionMasks;
use crate::server::Proxy;
use crate::sql::masking::{self, Verdict};

/// Keeps a session's policy in step with rules reloads: checked before each batch of client
/// messages (one atomic load when nothing changed).
pub struct PolicyRefresh {
    proxy: Arc<Proxy>,
    identity: SessionIdentity,
    generation: u64,
}

impl PolicyRefresh {
    pub fn new(proxy: Arc<Proxy>, identity: SessionIdentity, generation: u64) -> PolicyRefresh {
        PolicyRefresh {
            proxy,
            identity,
            generation,
        }
    }

    /// Checks, after a rules reload, whether this session's masks changed. Statements
    /// prepared, cursors declared and verdicts cached under the old masks cannot be
    /// re-checked, so a session whose masks changed is ended (`Err`) and reconnects under
    /// the new rules; a session the reload does not concern goes on.
    pub fn refresh(&mut self, policy: &mut Option<SessionPolicy>) -> Result<(), String> {
        let generation = self.proxy.rules_generation();
        if generation == self.generation {
            return Ok(());
        }
        self.generation = generation;
        let rules = self.proxy.rules.load_full();
        let applies = rules
            .masks
            .iter()
            .any(|r| crate::policy::masks::applies(r, &self.identity));
        let before = policy
            .as_ref()
            .map(|p| p.masks.fingerprint())
            .unwrap_or_default();
        let after = if !applies {
            Vec::new()
        } else {
            let catalog = policy.as_ref().map(|p| p.catalog.clone()).or_else(|| {
                self.proxy
                    .catalogs
                    .get(&self.identity.database)
                    .map(|c| c.catalog.clone())
            });
            match catalog {
                Some(c) => SessionMasks::build(&rules, &self.identity, &c).fingerprint(),
                // Masks apply but were never resolved for this session: they changed.
                None => vec![(String::new(), "unresolved", false)],
            }
        };
        if before == after {
            return Ok(());
        }
        tracing::info!("masks changed by a rules reload; ending the session");
        Err("pgveil: the masking rules changed; reconnect to continue".into())
    }
}

impl std::fmt::Debug for PolicyRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyRefresh(generation {})", self.generation)
    }
}

/// Verdicts kept per session; past this the cache starts over.
const VERDICT_CACHE: usize = 1024;

#[derive(Debug)]
pub struct SessionPolicy {
    pub masks: Arc<SessionMasks>,
    pub catalog: Arc<Catalog>,
    pub search_path: Vec<String>,
    pub unanalysable: Unanalysable,
    /// The login user, as refusals name it.
    pub role: String,
    /// Tables this session created (temporary or not), unknown to the cached catalog.
    pub created: HashSet<String>,
    verdicts: HashMap<Arc<str>, Verdict>,
}

impl SessionPolicy {
    pub fn new(
        masks: Arc<SessionMasks>,
        catalog: Arc<Catalog>,
        search_path: Vec<String>,
        unanalysable: Unanalysable,
        role: String,
    ) -> SessionPolicy {
        SessionPolicy {
            masks,
            catalog,
            search_path,
            unanalysable,
            role,
            created: HashSet::new(),
            verdicts: HashMap::new(),
        }
    }

    /// What to do with `sql` before it is forwarded.
    pub fn screen(&mut self, sql: &str, standard_conforming_strings: bool) -> Screen {
        if let Some(v) = self.verdicts.get(sql) {
            return screen_of(v, &self.role);
        }
        let ctx = masking::Context {
            catalog: &self.catalog,
            masks: &self.masks,
            search_path: &self.search_path,
            temp_tables: &self.created,
            unanalysable: self.unanalysable,
            standard_conforming_strings,
        };
        let (verdict, created) = masking::check(sql, &ctx);
        if !created.is_empty() {
            // Verdicts cached before may have refused these names as unknown.
            self.verdicts.clear();
            self.created.extend(created);
        }
        let message = screen_of(&verdict, &self.role);
        if standard_conforming_strings {
            if self.verdicts.len() >= VERDICT_CACHE {
                self.verdicts.clear();
            }
            self.verdicts.insert(Arc::from(sql), verdict);
        }
        message
    }
}

/// The treatment of one statement.
#[derive(Debug, PartialEq, Eq)]
pub enum Screen {
    Forward,
    /// Forward this SQL instead (masked columns computed masked by the server).
    Rewrite(String),
    /// Refuse with this message.
    Refuse(String),
}

fn screen_of(v: &Verdict, role: &str) -> Screen {
    match v {
        Verdict::Refused(r) => Screen::Refuse(r.message(role)),
        Verdict::Rewritten(sql) => Screen::Rewrite(sql.clone()),
        Verdict::Pass | Verdict::Masked => Screen::Forward,
    }
}
