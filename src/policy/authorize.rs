//! The one decision on each statement a session sends, in one order: the guard first,
//! then masking, then `block` alerts. Forwarding a statement takes the [`Permit`] that only
//! this module makes; a refusal is a [`Denied`] that names its rule.

use std::sync::Arc;

use super::guard::RowLimit;
use super::masking::CopyOut;
use super::session_guard::SessionGuard;
use super::session_masking::{Screen, SessionPolicy};
use super::{Denied, Refusal, UNANALYSABLE_BY_DEFAULT};
use crate::sql::analysis::{Analysed, FactsCache};
use crate::sql::lex::Strings;

/// Leave to forward a statement: as the client wrote it, or rewritten so that masked
/// columns are computed masked by the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    rewrite: Option<String>,
    /// A COPY whose rows are masked in flight (its `sql` is the rewrite).
    copy: Option<Arc<CopyOut>>,
    /// The row limit an `[[allow]]` rule's `max_rows` sets on it.
    limit: Option<RowLimit>,
}

impl Permit {
    fn plain() -> Permit {
        Permit {
            rewrite: None,
            copy: None,
            limit: None,
        }
    }

    pub fn limit(&self) -> Option<&RowLimit> {
        self.limit.as_ref()
    }

    /// The SQL to send instead of the client's (`None`: the client's), the row limit it
    /// runs under, and the COPY whose rows are masked in flight.
    pub fn into_parts(self) -> (Option<String>, Option<RowLimit>, Option<Arc<CopyOut>>) {
        (self.rewrite, self.limit, self.copy)
    }
}

/// What decides for one session: its guard and its masking, each present when rules
/// apply to the session, and the session's statement facts.
pub struct SessionRules<'a> {
    pub guard: Option<&'a mut SessionGuard>,
    pub masking: Option<&'a mut SessionPolicy>,
    pub facts: &'a mut FactsCache,
}

impl SessionRules<'_> {
    /// The login user, as refusals name it; `None` when nothing can be refused.
    fn role(&self) -> Option<&str> {
        match (&self.masking, &self.guard) {
            (Some(p), _) => Some(&p.role),
            (None, Some(g)) => Some(g.role()),
            (None, None) => None,
        }
    }

    /// Decides on a statement, `sql` as the server reads it (`analysed`, under
    /// `strings`). `alerts` is asked last, only for a statement the rules let run: whether
    /// a `block` alert refuses it.
    pub fn authorize(
        &mut self,
        sql: &str,
        analysed: &Analysed<'_>,
        strings: Strings,
        alerts: impl FnOnce(&mut FactsCache) -> Option<Denied>,
    ) -> Result<Permit, Denied> {
        let limit = match self.guard.as_deref_mut() {
            Some(g) => g.screen_analysed(sql, analysed, self.facts)?,
            None => None,
        };
        let masking = self.masking.as_deref_mut();
        let (rewrite, copy) = match masking.map(|p| p.screen_analysed(sql, analysed, strings)) {
            Some(Screen::Refuse(denied)) => return Err(denied),
            Some(Screen::Rewrite(sql)) => (Some(sql), None),
            Some(Screen::CopyOut(copy)) => (Some(copy.sql.clone()), Some(copy)),
            Some(Screen::Forward) | None => (None, None),
        };
        match alerts(self.facts) {
            Some(denied) => Err(denied),
            None => Ok(Permit {
                rewrite,
                copy,
                limit,
            }),
        }
    }

    /// Decides on a statement whose text pgveil cannot read as the server will (`why`):
    /// refused when the session is guarded or masked, forwarded as it is otherwise.
    pub fn unreadable(&self, sql: &str, why: String) -> Result<Permit, Denied> {
        match self.role() {
            Some(role) => Err(Refusal::unanalysable(why, None).denied(role, sql)),
            None => Ok(Permit::plain()),
        }
    }

    /// Refuses a permitted rewrite (or a row limit, which is one) that cannot be sent
    /// (`why`), or lets a statement that needs none go on.
    pub fn without_rewrite(
        &self,
        sql: &str,
        decided: Result<Permit, Denied>,
        why: impl FnOnce() -> String,
    ) -> Result<Permit, Denied> {
        match decided {
            Ok(p) if p.rewrite.is_some() || p.limit.is_some() => self.unreadable(sql, why()),
            other => other,
        }
    }

    /// Decides on a fast-path function call, which names its function by OID, beyond
    /// the analysis.
    pub fn function_call(&self) -> Result<Permit, Denied> {
        match (self.masking.as_deref(), self.guard.as_deref()) {
            (Some(p), _) => Err(Denied {
                message: format!(
                    "pgveil: FUNCTION CALL is not allowed for role \"{}\": fast-path calls cannot be analysed",
                    p.role
                ),
                rule: p
                    .masks
                    .rule_for(None)
                    .map_or_else(|| UNANALYSABLE_BY_DEFAULT.to_string(), |o| o.to_string()),
            }),
            (None, Some(g)) => g
                .screen_unanalysable("a fast-path call names its function by OID")
                .map(|()| Permit::plain()),
            (None, None) => Ok(Permit::plain()),
        }
    }
}
