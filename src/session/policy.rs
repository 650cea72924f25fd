//! The session's masking policy on the client side: each statement is checked before it
//! is forwarded (with verdicts cached by SQL text), and refused statements are replaced by
//! one that makes the server raise the refusal itself, so transaction state stays in step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::rules::Unanalysable;
use crate::policy::SessionMasks;
use crate::sql::masking::{self, Verdict};

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
        self.created.extend(created);
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
