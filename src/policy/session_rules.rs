//! A session's rules in force, built in one place for session start, a rules reload and
//! `pgveil explain`: its masking and row filters (when a mask or a filter applies to its roles) and its statement
//! guard (when something can be refused to it), both resolving names along the session's
//! search_path in the database's catalog.

use std::sync::Arc;

use super::filters::SessionFilters;
use super::guard::GuardPolicy;
use super::session_guard::SessionGuard;
use super::session_masking::SessionPolicy;
use super::SessionMasks;
use crate::catalog::{search_path_schemas, Catalog};
use crate::config::rules::Rules;
use crate::identity::SessionIdentity;

/// The masking and guard of one session.
#[derive(Debug, Default)]
pub struct SessionRuleSet {
    pub masking: Option<SessionPolicy>,
    pub guard: Option<SessionGuard>,
}

impl SessionRuleSet {
    pub fn build(rules: &Rules, identity: &SessionIdentity, catalog: &Arc<Catalog>) -> Self {
        let search_path = search_path_schemas(&identity.search_path, &identity.user);
        let masks = SessionMasks::build(rules, identity, catalog);
        let filters = SessionFilters::build(rules, identity, catalog);
        let masking = (!masks.is_empty() || !filters.is_empty()).then(|| {
            SessionPolicy::new(
                Arc::new(masks),
                Arc::new(filters),
                catalog.clone(),
                search_path.clone(),
                &rules.settings,
                identity.user.clone(),
            )
        });
        // A guard that allows every protected kind everywhere only enforces the recycle
        // bin: with the bin installed, it has nothing to refuse.
        let guard = GuardPolicy::for_session(rules, identity)
            .filter(|g| !(g.allows_everything() && recycle_bin_ready(rules, catalog)))
            .map(|g| SessionGuard::new(g, catalog.clone(), identity.user.clone(), search_path));
        SessionRuleSet { masking, guard }
    }
}

/// Whether every `[[recycle]]` table has its recycle-bin capture intact in this catalog
/// ([`Catalog::recycle_bin_problem`]).
pub fn recycle_bin_ready(rules: &Rules, catalog: &Catalog) -> bool {
    rules
        .recycles
        .iter()
        .all(|r| catalog.recycle_bin_ready(&r.schema, &r.table))
}
