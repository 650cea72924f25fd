//! The PostgreSQL v3 wire protocol as pgveil needs it: bounded framing, startup packets,
//! typed read-only views of the messages the session inspects, and builders for the few
//! messages pgveil writes itself. Frames that need no change are forwarded as the bytes
//! they arrived in; nothing here re-encodes a message it did not create.
//!
//! Reference: <https://www.postgresql.org/docs/15/protocol-message-formats.html>.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;
pub mod write;

pub use frame::{Frame, FrameReader, ProtocolError};
pub use sqlstate::SqlState;
