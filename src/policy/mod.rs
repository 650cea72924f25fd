//! Policy decisions: which columns a session sees masked and how each is masked, what the
//! guard allows, and (`authorize`) the one decision on each statement a session sends,
//! whose `Permit` forwarding requires and whose `Denied` names its rule.

pub mod authorize;
pub mod filters;
pub mod guard;
pub mod mask;
pub mod masking;
pub mod masks;
pub mod pgtypes;
pub mod session_guard;
pub mod session_masking;
pub mod session_rules;
pub mod sqlmask;

pub use masks::{ColumnMask, SessionMasks};

use crate::config::rules::Origin;

/// The kind of a refusal of what pgveil could not analyse.
pub const UNANALYSABLE: &str = "statement";

/// Why a statement may not run (a guard or masking decision); [`Refusal::message`] is
/// what the client sees (spec section 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The statement kind as rules name it (`delete`), or [`UNANALYSABLE`].
    pub kind: &'static str,
    pub table: String,
    pub reason: String,
    pub rule: Option<Origin>,
}

/// The rule a refusal names when pgveil's default `protected` kinds refused it (no
/// `[settings]` in the rules).
pub const PROTECTED_BY_DEFAULT: &str = "settings.protected";
/// The rule a refusal names when the default `unanalysable = "deny"` refused it.
pub const UNANALYSABLE_BY_DEFAULT: &str = "settings.unanalysable";

/// A refusal as a session reports it: the client's message, and the rule behind it for
/// the audit record and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub message: String,
    /// `file:line` of the rule behind the refusal, or the default setting's name
    /// ([`PROTECTED_BY_DEFAULT`], [`UNANALYSABLE_BY_DEFAULT`]).
    pub rule: String,
}

impl Refusal {
    /// A statement pgveil could not analyse, which counts as touching every table.
    pub fn unanalysable(reason: String, rule: Option<Origin>) -> Refusal {
        Refusal {
            kind: UNANALYSABLE,
            table: "(tables unknown)".into(),
            reason,
            rule,
        }
    }

    /// The refusal of `sql` as `role` sees it. A statement that could not be analysed is
    /// named by its opening keyword when the string holds one statement.
    pub fn denied(&self, role: &str, sql: &str) -> Denied {
        let kind = match self.kind {
            UNANALYSABLE => crate::sql::leading_keyword(sql).unwrap_or(UNANALYSABLE),
            kind => kind,
        };
        let rule = match (&self.rule, self.kind) {
            (Some(o), _) => o.to_string(),
            (None, UNANALYSABLE) => UNANALYSABLE_BY_DEFAULT.to_string(),
            (None, _) => PROTECTED_BY_DEFAULT.to_string(),
        };
        Denied {
            message: self.message_as(kind, role),
            rule,
        }
    }

    pub fn message(&self, role: &str) -> String {
        self.message_as(self.kind, role)
    }

    fn message_as(&self, kind: &str, role: &str) -> String {
        let rule = match &self.rule {
            Some(o) => format!(" (rule {o})"),
            None => String::new(),
        };
        format!(
            "pgveil: {} on {} is not allowed for role \"{role}\": {}{rule}",
            kind.to_uppercase(),
            self.table,
            self.reason
        )
    }
}
