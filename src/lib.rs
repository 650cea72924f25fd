//! pgveil: a PostgreSQL wire-protocol proxy for CRM databases.
//!
//! One statement's path: `server` accepts a client and hands it to `session`, which
//! negotiates TLS (`tls`), relays authentication to the real server and reads the
//! session's `identity`, then relays frames (`protocol`) in both directions while
//! `session::state` pairs every server reply with the client request it answers. Each
//! statement is read as the server reads it (`sql`: lexing, scoping, analyses), decided
//! by `policy::authorize` (guard, masking, alerts), and recorded by `audit`; `proxy`
//! holds what every session shares. `config` turns flags, config files and rules into validated types.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod predicate;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;
pub mod sessions;
pub mod sql;
pub mod tls;
pub mod trash;
pub mod watch;
