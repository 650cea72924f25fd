//! Pure policy decisions: which columns a session sees masked, and how each is masked.

pub mod guard;
pub mod mask;
pub mod masks;
pub mod pgtypes;
pub mod sqlmask;

pub use masks::{ColumnMask, SessionMasks};
