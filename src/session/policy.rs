//! The session's masking policy on the client side: each statement is checked before it
//! is forwarded (with verdicts cached by SQL text), and refused statements are replaced by
//! one that makes the server raise the refusal itself, so transaction state stays in step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::guard::SessionGuard;
use super::identity::SessionIdentity;
use super::state::SessionState;
use crate::catalog::search_path_schemas;
use crate::catalog::Catalog;
use crate::config::rules::{Origin, Settings, Unanalysable};
use crate::policy::guard::GuardPolicy;
use crate::policy::{Denied, SessionMasks};
use crate::server::Proxy;
use crate::sql::lex::{lex, LexError, Lexed};
use crate::sql::masking::{self, Verdict};
use crate::sql::Strings;

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

    /// Whether the rules were reloaded since this session last looked (one atomic load).
    pub fn changed(&self) -> bool {
        self.proxy.rules_generation() != self.generation
    }

    /// Brings the session in step with reloaded rules. Masks: statements prepared,
    /// cursors declared and verdicts cached under the old masks cannot be re-checked, so a
    /// session whose masks changed is ended (`Err`) and reconnects under the new rules.
    /// Guard: the new rules take over at once, and every statement the session has
    /// prepared is checked again under them; if one is now refused, the session is ended
    /// too. A session the reload does not concern goes on.
    pub fn refresh(&mut self, st: &mut SessionState) -> Result<(), String> {
        self.generation = self.proxy.rules_generation();
        let rules = self.proxy.rules.load_full();
        if let Some(a) = st.audit.as_mut() {
            let sensitive = super::audit::Sensitive::build(&rules, &self.identity, a.catalog());
            let alerts = crate::watch::AlertWatch::for_session(
                &self.proxy.alerts,
                &rules.alerts,
                &self.identity,
            );
            a.replace_rules(sensitive, alerts);
        }
        self.refresh_masks(&rules, &st.policy)?;
        let new = GuardPolicy::for_session(&rules, &self.identity);
        let old = st.guard.as_ref().map(|g| g.policy());
        if GuardPolicy::fingerprint(old) == GuardPolicy::fingerprint(new.as_ref()) {
            return Ok(());
        }
        let Some(new) = new else {
            st.guard = None;
            return Ok(());
        };
        let mut guard = match st.guard.take() {
            Some(mut g) => {
                g.replace_policy(new);
                g
            }
            None => {
                let catalog = st.policy.as_ref().map(|p| p.catalog.clone()).or_else(|| {
                    self.proxy
                        .catalogs
                        .get(&self.identity.database)
                        .map(|c| c.catalog.clone())
                });
                let Some(catalog) = catalog else {
                    tracing::info!(
                        "a rules reload guards a session pgveil has no catalog for; ending it"
                    );
                    return Err(RELOADED.into());
                };
                let search_path =
                    search_path_schemas(&self.identity.search_path, &self.identity.user);
                SessionGuard::new(new, catalog, self.identity.user.clone(), search_path)
            }
        };
        let scs = st.lexing();
        for sql in st.prepared_sql() {
            if guard.screen(&sql, scs).is_err() {
                tracing::info!(
                    "a rules reload refuses a statement the session prepared; ending it"
                );
                return Err(RELOADED.into());
            }
        }
        st.guard = Some(guard);
        Ok(())
    }

    fn refresh_masks(
        &self,
        rules: &crate::config::rules::Rules,
        policy: &Option<SessionPolicy>,
    ) -> Result<(), String> {
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
                Some(c) => SessionMasks::build(rules, &self.identity, &c).fingerprint(),
                // Masks apply but were never resolved for this session: they changed.
                None => vec![(String::new(), "unresolved", false)],
            }
        };
        if before == after {
            return Ok(());
        }
        tracing::info!("masks changed by a rules reload; ending the session");
        Err(RELOADED.into())
    }
}

/// What a session ended by a rules reload is told.
const RELOADED: &str = "pgveil: the rules changed; reconnect to continue";

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
    /// Where `[settings]` is in the rules (named by refusals of what cannot be analysed).
    pub settings: Option<Origin>,
    /// The login user, as refusals name it.
    pub role: String,
    /// Tables this session created (temporary or not), unknown to the cached catalog,
    /// once the server confirmed their creation.
    pub created: HashSet<String>,
    /// Tables the statement screened last would create, until the session state knows
    /// whether the server did (`take_staged`, `confirm_created`).
    staged: Vec<String>,
    verdicts: HashMap<Arc<str>, Verdict>,
}

impl SessionPolicy {
    pub fn new(
        masks: Arc<SessionMasks>,
        catalog: Arc<Catalog>,
        search_path: Vec<String>,
        settings: &Settings,
        role: String,
    ) -> SessionPolicy {
        SessionPolicy {
            masks,
            catalog,
            search_path,
            unanalysable: settings.unanalysable,
            settings: settings.origin.clone(),
            role,
            created: HashSet::new(),
            staged: Vec::new(),
            verdicts: HashMap::new(),
        }
    }

    /// What to do with `sql` before it is forwarded.
    /// The tables the statement screened last would create.
    pub fn take_staged(&mut self) -> Vec<String> {
        std::mem::take(&mut self.staged)
    }

    /// The server completed a query string that created these tables.
    pub fn confirm_created(&mut self, names: Vec<String>) {
        if names.iter().any(|n| !self.created.contains(n)) {
            // Verdicts cached before may have refused these names as unknown.
            self.verdicts.clear();
            self.created.extend(names);
        }
    }

    pub fn screen(&mut self, sql: &str, strings: Strings) -> Screen {
        self.screen_lexed(sql, &lex(sql, strings), strings)
    }

    /// [`Self::screen`] of a text already read as the server reads it.
    pub fn screen_lexed(
        &mut self,
        sql: &str,
        lexed: &Result<Lexed<'_>, LexError>,
        strings: Strings,
    ) -> Screen {
        self.staged.clear();
        // A text without a backslash reads alike whatever standard_conforming_strings is.
        let cacheable = strings == Strings::Standard || !sql.contains('\\');
        if let Some(v) = self.verdicts.get(sql).filter(|_| cacheable) {
            return screen_of(v, &self.role, sql);
        }
        let ctx = masking::Context {
            catalog: &self.catalog,
            masks: &self.masks,
            search_path: &self.search_path,
            temp_tables: &self.created,
            unanalysable: self.unanalysable,
            settings: self.settings.as_ref(),
            strings,
        };
        let (verdict, created) = masking::check_lexed(sql, lexed, &ctx);
        self.staged = created;
        let message = screen_of(&verdict, &self.role, sql);
        if cacheable {
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
    /// Refuse, with this message and rule.
    Refuse(Denied),
}

fn screen_of(v: &Verdict, role: &str, sql: &str) -> Screen {
    match v {
        Verdict::Refused(r) => Screen::Refuse(r.denied(role, sql)),
        Verdict::Rewritten(sql) => Screen::Rewrite(sql.clone()),
        Verdict::Pass | Verdict::Masked => Screen::Forward,
    }
}
