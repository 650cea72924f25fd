//! Pure policy decisions: which columns a session sees masked, and how each is masked.

pub mod guard;
pub mod mask;
pub mod masks;
pub mod pgtypes;
pub mod sqlmask;

pub use masks::{ColumnMask, SessionMasks};

use crate::config::rules::Origin;

/// Why a statement may not run (a guard or masking decision); [`Refusal::message`] is
/// what the client sees (spec section 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The statement kind as rules name it (`delete`), or `statement` when unanalysable.
    pub kind: &'static str,
    pub table: String,
    pub reason: String,
    pub rule: Option<Origin>,
}

impl Refusal {
    pub fn message(&self, role: &str) -> String {
        let rule = match &self.rule {
            Some(o) => format!(" (rule {o})"),
            None => String::new(),
        };
        format!(
            "pgveil: {} on {} is not allowed for role \"{role}\": {}{rule}",
            self.kind.to_uppercase(),
            self.table,
            self.reason
        )
    }
}
