//! The audit log (spec section 6): records and their hash chain (`record`), the writer
//! task that never drops a record (`writer`), and the reviewers' tools, `audit verify`
//! (`verify`) and `audit search` (`search`). Sessions build records in
//! `session::audit`; statement facts come from `sql::audit`.

pub mod record;
pub mod search;
mod sink;
pub mod verify;
pub mod writer;

pub use record::{Decision, Event, Record};
pub use sink::{AuditError, FlushPolicy, Retention, WriterConfig};
pub use writer::AuditLog;
