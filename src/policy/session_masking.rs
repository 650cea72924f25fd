//! The session's masking policy on the client side: each statement is checked before it
//! is forwarded (with verdicts cached by SQL text), and refused statements are replaced by
//! one that makes the server raise the refusal itself, so transaction state stays in step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::rules::{Origin, Settings, Unanalysable};
use crate::policy::filters::SessionFilters;
use crate::policy::masking::{self, Verdict};
use crate::policy::{Denied, SessionMasks};
use crate::sql::analysis::Analysed;
use crate::sql::Strings;

/// Verdicts kept per session; past this the cache starts over.
const VERDICT_CACHE: usize = 1024;

/// A masked session's policy: its masks and what name resolution needs, with verdicts
/// cached by statement text.
#[derive(Debug)]
pub struct SessionPolicy {
    pub masks: Arc<SessionMasks>,
    /// The session's row filters (applied by the same analysis, after masking).
    pub filters: Arc<SessionFilters>,
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
    /// A statement was refused because pgveil's catalog lacks a relation or a masked
    /// column it names: the session should read the catalog again.
    pub catalog_wanted: bool,
    /// OIDs of relations the catalog does not have (the session's own above all, its
    /// temporary tables), seen in results of statements that read no relation that is or
    /// may be masked: rows from them are not taken for rows of a changed masked relation.
    pub own_relations: HashSet<u32>,
}

impl SessionPolicy {
    pub fn new(
        masks: Arc<SessionMasks>,
        filters: Arc<SessionFilters>,
        catalog: Arc<Catalog>,
        search_path: Vec<String>,
        settings: &Settings,
        role: String,
    ) -> SessionPolicy {
        SessionPolicy {
            masks,
            filters,
            catalog,
            search_path,
            unanalysable: settings.unanalysable,
            settings: settings.origin.clone(),
            role,
            created: HashSet::new(),
            staged: Vec::new(),
            verdicts: HashMap::new(),
            catalog_wanted: false,
            own_relations: HashSet::new(),
        }
    }

    /// What the masking analysis needs of this session, literals read under `strings`.
    fn context(&self, strings: Strings) -> masking::Context<'_> {
        masking::Context {
            catalog: &self.catalog,
            masks: &self.masks,
            filters: &self.filters,
            search_path: &self.search_path,
            temp_tables: &self.created,
            unanalysable: self.unanalysable,
            settings: self.settings.as_ref(),
            strings,
        }
    }

    /// The verdict on `sql` (with standard strings), uncached, as `explain` shows it.
    pub fn verdict(&self, sql: &str) -> Verdict {
        masking::check(sql, &self.context(Strings::Standard)).0
    }

    /// Whether a relation named `parts` (as written) is, or may be, masked: a masked
    /// relation, or a view over one, bears its name in any schema, or a mask rule names a
    /// table of that name the catalog does not have yet.
    pub fn may_be_masked(&self, parts: &[String]) -> bool {
        let masked = |r: &crate::catalog::Relation| {
            self.masks.of_table(r.oid).is_some() || self.masks.view_reads_masked(r.oid).is_some()
        };
        match parts {
            [name] => {
                self.masks.pending_table(name, &self.catalog).is_some()
                    || self.catalog.named(name).any(|r| masked(r))
            }
            [.., schema, name] => {
                !self.masks.pending(schema, name).is_empty()
                    || self.catalog.relation(schema, name).is_some_and(|r| masked(r))
                    // pg_temp.x may be the session's x or, where it bears a masked name,
                    // stand for it.
                    || (schema == "pg_temp" && self.catalog.named(name).any(|r| masked(r)))
            }
            [] => true,
        }
    }

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

    /// What to do with `sql`, read as the server reads it (`analysed`, under `strings`),
    /// before it is forwarded.
    pub fn screen_analysed(
        &mut self,
        sql: &str,
        analysed: &Analysed<'_>,
        strings: Strings,
    ) -> Screen {
        self.staged.clear();
        // A text without a backslash reads alike whatever standard_conforming_strings is.
        let cacheable = strings == Strings::Standard || !sql.contains('\\');
        if let Some(v) = self.verdicts.get(sql).filter(|_| cacheable) {
            self.catalog_wanted |= unknown_to_catalog(v);
            return screen_of(v, &self.role, sql);
        }
        let (verdict, created) = masking::check_analysed(sql, analysed, &self.context(strings));
        self.staged = created;
        self.catalog_wanted |= unknown_to_catalog(&verdict);
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
    /// Forward this COPY (`sql`) and mask its rows in flight.
    CopyOut(Arc<masking::CopyOut>),
    /// Refuse, with this message and rule.
    Refuse(Denied),
}

/// Whether `v` refuses a statement for naming what pgveil's catalog does not have.
fn unknown_to_catalog(v: &Verdict) -> bool {
    matches!(v, Verdict::Refused(r)
        if r.reason == masking::UNKNOWN_RELATION || r.reason.starts_with(masking::UNKNOWN_COLUMN))
}

fn screen_of(v: &Verdict, role: &str, sql: &str) -> Screen {
    match v {
        Verdict::Refused(r) => Screen::Refuse(r.denied(role, sql)),
        Verdict::Rewritten(sql) => Screen::Rewrite(sql.clone()),
        Verdict::CopyOut(copy) => Screen::CopyOut(copy.clone()),
        Verdict::Pass | Verdict::Masked => Screen::Forward,
    }
}
