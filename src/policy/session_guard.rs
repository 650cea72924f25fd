//! The statement guard of one session: what its names mean (search_path, tables it
//! created, SQL-level prepared statements) and a cache of decisions by statement shape, so
//! that an application sending the same statements with different literals pays for one
//! analysis per statement, not one per call.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::policy::guard::{GuardPolicy, Names, Prepared, RowLimit};
use crate::policy::{Denied, Refusal};
use crate::sql::analysis::{Analysed, Analysis, FactsCache};
use crate::sql::guard::{opaque_call, Access, Effect, StatementFacts};
use crate::sql::lex::{lex, Strings};

/// Decisions kept per session; past this the cache starts over.
const CACHE: usize = 1024;

#[derive(Debug)]
pub struct SessionGuard {
    policy: GuardPolicy,
    pub catalog: Arc<Catalog>,
    /// The login user, as refusals name it.
    role: String,
    /// Every schema the session's search_path has held (see `policy::guard::Names`).
    search_path: Vec<String>,
    created: HashSet<String>,
    prepared: Prepared,
    /// Decision by shape: permitted (under a row limit or none), or refused.
    decisions: HashMap<Box<str>, Result<Option<RowLimit>, Denied>>,
}

impl SessionGuard {
    pub fn new(
        policy: GuardPolicy,
        catalog: Arc<Catalog>,
        role: String,
        search_path: Vec<String>,
    ) -> SessionGuard {
        SessionGuard {
            policy,
            catalog,
            role,
            search_path,
            created: HashSet::new(),
            prepared: HashMap::new(),
            decisions: HashMap::new(),
        }
    }

    /// The login user, as refusals name it.
    pub fn role(&self) -> &str {
        &self.role
    }

    pub fn policy(&self) -> &GuardPolicy {
        &self.policy
    }

    /// Puts a catalog pgveil read again in force, with the rules built on it; what the
    /// session defined stays known.
    pub fn replace_catalog(&mut self, catalog: Arc<Catalog>, policy: GuardPolicy) {
        self.catalog = catalog;
        self.replace_policy(policy);
    }

    /// Puts new rules in force (after a reload); what the session defined stays known.
    pub fn replace_policy(&mut self, policy: GuardPolicy) {
        self.policy = policy;
        self.decisions.clear();
    }

    /// Whether `sql` may be forwarded; `Err` holds the client-facing refusal.
    pub fn screen(&mut self, sql: &str, strings: Strings) -> Result<(), Denied> {
        self.screen_limited(sql, strings).map(|_| ())
    }

    /// [`Self::screen`], with the row limit the statement would run under.
    pub fn screen_limited(
        &mut self,
        sql: &str,
        strings: Strings,
    ) -> Result<Option<RowLimit>, Denied> {
        let lexed = lex(sql, strings);
        self.screen_analysed(sql, &Analysis::of(&lexed), &mut FactsCache::default())
    }

    /// [`Self::screen`] of a text already read as the server reads it, its statement facts
    /// from the session's `cache`; `Ok` holds the row limit it runs under, if any.
    pub fn screen_analysed(
        &mut self,
        sql: &str,
        analysed: &Analysed<'_>,
        cache: &mut FactsCache,
    ) -> Result<Option<RowLimit>, Denied> {
        let analysis = match analysed {
            Ok(a) => a,
            Err(e) => {
                let facts = StatementFacts {
                    unanalysable: Some(format!("pgveil cannot read it as the server does: {e}")),
                    ..Default::default()
                };
                return self.decide(&facts, sql);
            }
        };
        // The cache key: the statement's shape (what the server reads but for literal
        // values).
        let shape = analysis.lexed().statement_shape();
        if let Some(decision) = self.decisions.get(shape) {
            return decision.clone();
        }
        let facts = analysis.guard_facts(cache);
        let decision = self.decide(&facts, sql);
        if decision.is_ok() {
            self.apply(&facts);
        }
        if facts.shape_independent() {
            if self.decisions.len() >= CACHE {
                self.decisions.clear();
            }
            self.decisions.insert(Box::from(shape), decision.clone());
        }
        decision
    }

    /// A message that cannot be analysed at all (a fast-path function call).
    pub fn screen_unanalysable(&self, reason: &str) -> Result<(), Denied> {
        let facts = StatementFacts {
            kinds: vec!["function call"],
            unanalysable: Some(reason.to_string()),
            ..Default::default()
        };
        self.decide(&facts, "").map(|_| ())
    }

    /// The decision on `facts`, the analysis of `sql` (named in refusals).
    fn decide(&self, facts: &StatementFacts, sql: &str) -> Result<Option<RowLimit>, Denied> {
        // EXECUTE runs what PREPARE defined, possibly earlier in the same string.
        let mut local: HashMap<&str, &[Access]> = HashMap::new();
        let mut executed = Vec::new();
        let mut unknown = None;
        for effect in &facts.effects {
            match effect {
                Effect::Prepare(name, accesses) => {
                    local.insert(name, accesses);
                }
                Effect::Execute(name) => {
                    let prepared = local
                        .get(name.as_str())
                        .copied()
                        .or_else(|| self.prepared.get(name).map(Vec::as_slice));
                    match prepared {
                        Some(accesses) => executed.extend_from_slice(accesses),
                        None => unknown = Some(name),
                    }
                }
                _ => {}
            }
        }
        let mut facts = std::borrow::Cow::Borrowed(facts);
        if facts.unanalysable.is_none() {
            if let Some(reason) = opaque_call(&facts.calls, &self.catalog) {
                facts.to_mut().unanalysable = Some(reason);
            }
        }
        if let Some(name) = unknown {
            facts.to_mut().unanalysable.get_or_insert_with(|| {
                format!("EXECUTE of {name}, which pgveil did not see prepared")
            });
        }
        // What the string itself does to names (a relation it creates, schemas it puts on
        // the search_path) holds for every statement in it.
        let mut created = std::borrow::Cow::Borrowed(&self.created);
        let mut search_path = std::borrow::Cow::Borrowed(&self.search_path);
        for effect in &facts.effects {
            match effect {
                Effect::Created(name) if !created.contains(name) => {
                    created.to_mut().insert(name.clone());
                }
                Effect::SearchPath(Some(schemas)) => {
                    for s in schemas {
                        let s = if s == "$user" { &self.role } else { s };
                        if !search_path.contains(s) {
                            search_path.to_mut().push(s.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let names = Names {
            catalog: &self.catalog,
            search_path: &search_path,
            created: &created,
        };
        self.policy
            .authorize(&facts, &executed, &names)
            .map(|permit| permit.limit)
            .map_err(|d: Refusal| d.denied(&self.role, sql))
    }

    fn apply(&mut self, facts: &StatementFacts) {
        // Cached decisions were made on the names as they were: when what a name can mean
        // changes, they go.
        let mut names_changed = false;
        for effect in &facts.effects {
            match effect {
                Effect::SearchPath(Some(schemas)) => {
                    for s in schemas {
                        let s = if s == "$user" { &self.role } else { s };
                        if !self.search_path.contains(s) {
                            self.search_path.push(s.clone());
                            names_changed = true;
                        }
                    }
                }
                Effect::SearchPath(None) => {}
                Effect::Prepare(name, accesses) => {
                    self.prepared.insert(name.clone(), accesses.clone());
                }
                Effect::Created(name) => names_changed |= self.created.insert(name.clone()),
                Effect::Execute(_) => {}
            }
        }
        if names_changed {
            self.decisions.clear();
        }
    }
}
