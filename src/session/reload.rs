//! Rules reloads as a running session takes them: masks, guard, sensitive columns and
//! alerts are rebuilt for the session's identity, checked before each batch of client
//! messages (one atomic load when nothing changed).

use std::sync::Arc;

use super::state::SessionState;
use crate::catalog::Catalog;
use crate::identity::SessionIdentity;
use crate::policy::guard::GuardPolicy;
use crate::policy::session_masking::SessionPolicy;
use crate::policy::session_rules::SessionRuleSet;
use crate::proxy::{CachedCatalog, CatalogVersion, Proxy};

/// Keeps a session's policy in step with rules reloads: checked before each batch of client
/// messages (one atomic load when nothing changed).
pub struct PolicyRefresh {
    proxy: Arc<Proxy>,
    identity: SessionIdentity,
    generation: u64,
    /// Whether the session's rules guard its DELETEs of recycled tables (so it follows
    /// the schema even while its guard is set aside because the bin is in place).
    recycles: bool,
}

impl PolicyRefresh {
    pub fn new(proxy: Arc<Proxy>, identity: SessionIdentity, generation: u64) -> PolicyRefresh {
        let recycles = GuardPolicy::for_session(&proxy.rules.load_full(), &identity)
            .is_some_and(|g| g.recycles());
        PolicyRefresh {
            proxy,
            identity,
            generation,
            recycles,
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
        // The session's catalog; a session that has neither masks nor guard yet uses the
        // database's cached one.
        let catalog = st
            .policy
            .as_ref()
            .map(|p| p.catalog.clone())
            .or_else(|| st.guard.as_ref().map(|g| g.catalog.clone()))
            .or_else(|| {
                self.proxy
                    .catalogs
                    .get(&self.identity.database)
                    .map(|c| c.catalog.clone())
            });
        let applies = rules
            .masks
            .iter()
            .any(|r| crate::policy::masks::applies(r, &self.identity))
            || rules
                .filters
                .iter()
                .any(|r| crate::policy::filters::applies(r, &self.identity));
        let new_guard = GuardPolicy::for_session(&rules, &self.identity);
        self.recycles = new_guard.as_ref().is_some_and(|g| g.recycles());
        let Some(catalog) = catalog else {
            if applies || new_guard.is_some() {
                // Masks, filters or a guard now apply to a session pgveil never read a catalog for.
                tracing::info!(
                    "a rules reload applies to a session pgveil has no catalog for; ending it"
                );
                return Err(RELOADED.into());
            }
            st.guard = None;
            return Ok(());
        };
        let built = SessionRuleSet::build(&rules, &self.identity, &catalog);
        let fingerprint = |p: Option<&SessionPolicy>| {
            p.map(|p| (p.masks.fingerprint(), p.filters.fingerprint()))
                .unwrap_or_default()
        };
        if fingerprint(st.policy.as_ref()) != fingerprint(built.masking.as_ref()) {
            tracing::info!("masks or row filters changed by a rules reload; ending the session");
            return Err(RELOADED.into());
        }
        let old = st.guard.as_ref().map(|g| g.policy());
        let new = built.guard.as_ref().map(|g| g.policy());
        if GuardPolicy::fingerprint(old) == GuardPolicy::fingerprint(new) {
            return Ok(());
        }
        let Some(new) = built.guard else {
            st.guard = None;
            return Ok(());
        };
        // What the session defined (search_path, tables, SQL prepared statements) stays
        // known under the new rules.
        let mut guard = match st.guard.take() {
            Some(mut g) => {
                g.replace_policy(new.policy().clone());
                g
            }
            None => new,
        };
        let scs = st.lexing();
        for sql in st.prepared_sql() {
            // A statement prepared as it was (not wrapped to count its rows) that the new
            // rules limit would run unlimited: as good as refused.
            if !matches!(guard.screen_limited(&sql, scs), Ok(None)) {
                tracing::info!(
                    "a rules reload refuses a statement the session prepared; ending it"
                );
                return Err(RELOADED.into());
            }
        }
        st.guard = Some(guard);
        Ok(())
    }
}

impl PolicyRefresh {
    /// Whether the masked session should read the catalog again before its next
    /// statement, and can: a statement was refused, or rows withheld, for what the catalog
    /// lacks, or a statement through pgveil changed the schema since the session's catalog
    /// was read. A newer catalog another session read since is taken as it is.
    pub fn catalog_wanted(&mut self, st: &mut SessionState) -> bool {
        // Masked sessions, and guarded ones that delete from recycled tables only while
        // the capture is in place, follow the schema: also those whose guard only
        // enforced the capture and was set aside because it was in place, so that a
        // change to the capture puts the guard back before their next statement.
        let current = match (&st.policy, &st.guard) {
            (Some(p), _) => Arc::as_ptr(&p.catalog),
            (None, Some(g)) if g.policy().recycles() || g.policy().limits() => {
                Arc::as_ptr(&g.catalog)
            }
            (None, None) if self.recycles && st.catalog_version.is_some() => std::ptr::null(),
            _ => return false,
        };
        let asked = st.policy.as_ref().is_some_and(|p| p.catalog_wanted);
        let stale = st.catalog_version.as_ref().is_some_and(|v| !v.is_current());
        if !asked && !stale {
            return false;
        }
        if !asked {
            let newer = self
                .proxy
                .catalogs
                .get(&self.identity.database)
                .filter(|c| c.version.is_current())
                .filter(|c| !std::ptr::eq(Arc::as_ptr(&c.catalog), current))
                .map(|c| c.clone());
            if let Some(newer) = newer {
                self.put_in_force(st, newer.catalog, newer.version);
                return false;
            }
        }
        st.can_read_catalog()
    }

    /// Whether a masked session must look at the schema before its next statement (read
    /// the catalog again, or probe for masks the catalog does not have yet), whether or
    /// not it can right now.
    pub fn schema_check_due(&self, st: &SessionState) -> bool {
        let Some(p) = &st.policy else {
            return false;
        };
        p.catalog_wanted
            || p.masks.pending_probe().is_some()
            || st.catalog_version.as_ref().is_some_and(|v| !v.is_current())
    }

    /// For a masked session with masks the catalog does not have yet (when nothing is in
    /// flight and no failed transaction block is open): the query that finds whether any of them
    /// exists now, so that the catalog is read again first. A table renamed, or a column
    /// renamed, into a masked name behind pgveil's back keeps its OID and attribute number
    /// (a view created earlier reads it under them): only its name tells. One round trip
    /// before each batch, for such sessions only.
    pub fn pending_probe(&self, st: &SessionState) -> Option<Arc<str>> {
        let probe = st.policy.as_ref()?.masks.pending_probe()?;
        st.can_read_catalog().then(|| probe.clone())
    }

    /// The schema version a catalog read now is read at.
    pub fn version_now(&self, st: &SessionState) -> CatalogVersion {
        st.catalog_version
            .as_ref()
            .map_or_else(CatalogVersion::first, CatalogVersion::now)
    }

    /// Puts the catalog pgveil read on the session's connection in force (`None`: the
    /// server refused the query; the session goes on with what it had), and, when
    /// `shared`, offers it to sessions that start later.
    /// A catalog that could not be read (`None`) ends the session: the statements that
    /// asked for it would otherwise be judged by a schema known to be out of date (a
    /// table renamed into a masked name would be read in clear).
    pub fn adopt_catalog(
        &mut self,
        st: &mut SessionState,
        catalog: Option<Arc<Catalog>>,
        version: CatalogVersion,
        shared: bool,
    ) -> Result<(), String> {
        let Some(catalog) = catalog else {
            tracing::warn!("pgveil could not read the catalog again; ending the session");
            return Err(
                "pgveil: the schema could not be read again to judge this statement; \
                        the session ends: reconnect"
                    .into(),
            );
        };
        if shared {
            self.proxy.catalogs.insert(
                self.identity.database.clone(),
                CachedCatalog {
                    catalog: catalog.clone(),
                    version: version.clone(),
                },
            );
        }
        self.put_in_force(st, catalog, version);
        Ok(())
    }

    fn put_in_force(
        &mut self,
        st: &mut SessionState,
        catalog: Arc<Catalog>,
        version: CatalogVersion,
    ) {
        let rules = self.proxy.rules.load_full();
        let built = SessionRuleSet::build(&rules, &self.identity, &catalog);
        // What the session defined stays known under the new catalog.
        st.policy = match (st.policy.take(), built.masking) {
            (Some(old), Some(mut new)) => {
                new.created = old.created;
                new.own_relations = old.own_relations;
                Some(new)
            }
            (_, new) => new,
        };
        st.guard = match (st.guard.take(), built.guard) {
            (Some(mut old), Some(new)) => {
                old.replace_catalog(catalog.clone(), new.policy().clone());
                Some(old)
            }
            (_, new) => new,
        };
        if let Some(a) = st.audit.as_mut() {
            let sensitive = super::audit::Sensitive::build(&rules, &self.identity, Some(&catalog));
            a.replace_catalog(catalog, sensitive);
        }
        st.catalog_version = Some(version);
    }
}

/// What a session ended by a rules reload is told.
const RELOADED: &str = "pgveil: the rules changed; reconnect to continue";

impl std::fmt::Debug for PolicyRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyRefresh(generation {})", self.generation)
    }
}
