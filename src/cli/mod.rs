//! The command line: `pgveil serve` and the review and maintenance subcommands of spec
//! section 1. Flag names are part of the contract.

pub mod docs;
pub mod health;
pub mod inspect;
pub mod pgconn;
mod pgpass;
pub mod trash;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{ServeSettings, UpstreamTls};

#[derive(Debug, Parser)]
#[command(
    name = "pgveil",
    version,
    about = "PostgreSQL proxy that masks sensitive CRM columns, guards destructive statements and audits every statement",
    after_help = "Examples:\n  pgveil serve --upstream 127.0.0.1:5432 --rules rules/\n  pgveil serve --config /etc/pgveil/pgveil.toml\n  pgveil check --rules rules/ --upstream-url postgres://postgres@127.0.0.1/crm\n  pgveil explain --rules rules/ --role alice --upstream-url postgres://postgres@127.0.0.1/crm 'SELECT phone FROM customers'\n  pgveil audit search audit.jsonl --user alice --decision blocked\n  pgveil audit verify audit.*.jsonl audit.jsonl\n\nEach command has its own --help. Log level: PGVEIL_LOG=debug."
)]
pub struct Cli {
    /// pgveil's own log on stderr (not the audit log): text, or JSON Lines for log
    /// collectors (one object per event: timestamp, level, target, message, fields,
    /// spans). The level comes from PGVEIL_LOG (info by default).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: clients connect to --listen, sessions are relayed to --upstream.
    ///
    /// Every flag can also be set in a TOML file given with --config (same names with
    /// underscores, e.g. audit_flush = "always"); flags win. SIGHUP or a change of the rules
    /// files reloads the rules (invalid new rules are logged, the old stay); SIGTERM and
    /// SIGINT stop accepting and let running statements finish within the grace period.
    #[command(
        after_help = "Examples:\n  pgveil serve --upstream db.internal:5432 --rules /etc/pgveil/rules\n  pgveil serve --listen 0.0.0.0:6432 --tls-cert server.crt --tls-key server.key --require-tls \\\n    --upstream db.internal:5432 --upstream-tls verify-full --upstream-ca ca.crt\n  pgveil serve --audit-log /var/log/pgveil/audit.jsonl --audit-flush always --metrics 127.0.0.1:9187"
    )]
    Serve(Box<ServeArgs>),
    /// Validate rules; exit 0 when valid, 1 with each problem on its own line as file:line,
    /// 2 when the database given could not be read.
    ///
    /// With --upstream-url, also check that every table, column and role named exists, that
    /// every mask fits its column's type, and warn about searchable masks, allow globs that
    /// match nothing and recycle rules whose bin is not installed.
    #[command(
        after_help = "Examples:\n  pgveil check --rules rules/\n  pgveil check --rules rules/crm.toml --upstream-url postgres://postgres@127.0.0.1:5432/crm"
    )]
    Check {
        /// A rules file or a directory of *.toml files.
        #[arg(long, default_value = "rules/")]
        rules: PathBuf,
        /// Also check the named tables, columns and roles against this database (a libpq URL
        /// or key=value string: sslmode, sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE,
        /// PGSSLROOTCERT).
        #[arg(long)]
        upstream_url: Option<String>,
    },
    /// Dry run: how SQL would be treated for ROLE: statement kind, tables touched, the
    /// guard's decision, and per output column the mask applied, or the refusal and the
    /// rule behind it. Without --upstream-url only the statement kind can be told.
    #[command(
        after_help = "Examples:\n  pgveil explain --rules rules/ --role alice --upstream-url postgres://postgres@127.0.0.1/crm 'SELECT phone, email FROM customers'\n  pgveil explain --rules rules/ --role crm_support --upstream-url postgres://postgres@127.0.0.1/crm 'DELETE FROM tasks'"
    )]
    Explain {
        /// A rules file or a directory of *.toml files.
        #[arg(long)]
        rules: PathBuf,
        /// A role (or login user) whose memberships are read from the database.
        #[arg(long)]
        role: String,
        /// The database whose catalog resolves tables, columns and roles (a libpq URL or
        /// key=value string: sslmode, sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE,
        /// PGSSLROOTCERT).
        #[arg(long)]
        upstream_url: Option<String>,
        /// The SQL to judge (one or several statements).
        sql: String,
    },
    /// Review the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The recycle bin of deleted rows (schema pgveil_trash).
    #[command(subcommand)]
    Trash(TrashCommand),
    /// Tokens of the `tokenize` mask.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Whether pgveil answers on ADDR and reaches its server, as pg_isready tells: exit 0
    /// when a server answered through pgveil, 1 when pgveil answered but its server cannot
    /// be reached or takes no connections now, 2 when nothing answered. For container and
    /// load balancer health checks; it needs no role or password.
    #[command(
        after_help = "Examples:\n  pgveil health\n  pgveil health --addr 10.0.0.5:6432 --timeout 3"
    )]
    Health {
        /// Where pgveil listens (host:port).
        #[arg(long, default_value = "127.0.0.1:6432")]
        addr: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Print the shell completion script for SHELL, generated from this binary's commands
    /// and flags.
    #[command(
        after_help = "Examples:\n  pgveil completions bash > /etc/bash_completion.d/pgveil\n  pgveil completions zsh > \"${fpath[1]}/_pgveil\"\n  pgveil completions fish > ~/.config/fish/completions/pgveil.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Print the manual page, pgveil(1), in roff, generated from this binary's commands and
    /// flags.
    #[command(
        after_help = "Examples:\n  pgveil man | man -l -\n  pgveil man > /usr/local/share/man/man1/pgveil.1"
    )]
    Man,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of audit files, given oldest first (rotated files, then the
    /// current one). Exit 0 intact, 1 with the first broken line named (or a torn last
    /// line, reported as such), 2 when a file cannot be read.
    ///
    /// Example: pgveil audit verify audit.*.jsonl audit.jsonl
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The hash the chain must end with (kept elsewhere, e.g. from pgveil's log at
        /// shutdown): without it, removing the last lines of the newest file goes unseen.
        #[arg(long)]
        last_hash: Option<String>,
    },
    /// Filter audit records: a table for people, or the records as JSON lines (--json).
    ///
    /// Example: pgveil audit search audit.jsonl --table customers --decision blocked --since 2026-11-23
    Search {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Login user.
        #[arg(long)]
        user: Option<String>,
        /// schema.table, or a bare table name in any schema.
        #[arg(long)]
        table: Option<String>,
        /// allowed, masked, blocked or error.
        #[arg(long)]
        decision: Option<String>,
        /// select, insert, update, delete, copy, ddl, truncate, transaction, ...
        #[arg(long)]
        kind: Option<String>,
        /// statement, connect, auth_failed, connection_refused, disconnect, alert, recovered.
        #[arg(long)]
        event: Option<String>,
        /// Session id.
        #[arg(long)]
        session: Option<u64>,
        /// From this time on (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (RFC 3339, or YYYY-MM-DD).
        #[arg(long)]
        until: Option<String>,
        /// Print the matching records as JSON lines (for jq).
        #[arg(long)]
        json: bool,
    },
}

/// Which kept rows a trash command is about.
#[derive(Debug, Args)]
pub struct TrashSelection {
    /// Only rows deleted from this [schema.]table (schema defaults to public).
    #[arg(long)]
    pub table: Option<String>,
    /// Only rows deleted at or after this time (e.g. 2026-11-23T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only rows deleted at or before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only these kept rows, by the id `trash list` shows (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<i64>,
}

#[derive(Debug, Subcommand)]
pub enum TrashCommand {
    /// Install the recycle bin and the capture triggers of every [[recycle]] table (run it
    /// as the tables' owner or a superuser, again after changing [[recycle]] rules).
    #[command(
        after_help = "Example:\n  pgveil trash init --rules rules/ --upstream-url postgres://postgres@db/crm"
    )]
    Init {
        /// The database, as libpq reads it: a postgres:// URL or key=value string (sslmode,
        /// sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE, PGSSLROOTCERT when not in
        /// it).
        #[arg(long)]
        upstream_url: String,
        #[arg(long, default_value = "rules/")]
        rules: PathBuf,
    },
    /// Show kept rows, oldest first.
    #[command(
        after_help = "Example:\n  pgveil trash list --upstream-url postgres://postgres@db/crm --table customers --since 2026-11-01"
    )]
    List {
        /// The database, as libpq reads it: a postgres:// URL or key=value string (sslmode,
        /// sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE, PGSSLROOTCERT when not in
        /// it).
        #[arg(long)]
        upstream_url: String,
        #[command(flatten)]
        selection: TrashSelection,
        /// Print JSON Lines (one kept row per line) instead of a table.
        #[arg(long)]
        json: bool,
        /// Most rows to show.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Put kept rows back into their tables (all or nothing unless --skip-conflicts).
    #[command(
        after_help = "Examples:\n  pgveil trash restore --upstream-url URL --id 42 --id 43\n  pgveil trash restore --upstream-url URL --table customers --since 2026-11-23T09:00:00Z --until 2026-11-23T09:05:00Z"
    )]
    Restore {
        /// The database, as libpq reads it: a postgres:// URL or key=value string (sslmode,
        /// sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE, PGSSLROOTCERT when not in
        /// it).
        #[arg(long)]
        upstream_url: String,
        #[command(flatten)]
        selection: TrashSelection,
        /// Restore what can be restored and report the rest: rows whose key exists again,
        /// and rows whose parent (kept in the bin) would not come back with them.
        #[arg(long)]
        skip_conflicts: bool,
    },
    /// Remove kept rows older than their table's retention (or --older-than-days).
    #[command(
        after_help = "Examples:\n  pgveil trash purge --upstream-url postgres://postgres@db/crm\n  pgveil trash purge --upstream-url postgres://postgres@db/crm --older-than-days 7"
    )]
    Purge {
        /// The database, as libpq reads it: a postgres:// URL or key=value string (sslmode,
        /// sslrootcert; PGPASSWORD or ~/.pgpass, PGSSLMODE, PGSSLROOTCERT when not in
        /// it).
        #[arg(long)]
        upstream_url: String,
        #[arg(long)]
        older_than_days: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Reverse `tokenize` with the key in environment variable VAR: one clear value per
    /// line, in the order of the tokens; exit 1 if a token does not decode with that key.
    #[command(
        after_help = "Example:\n  PGVEIL_TOKEN_KEY=... pgveil token decode --key-env PGVEIL_TOKEN_KEY tok_AbC... tok_XyZ..."
    )]
    Decode {
        /// The environment variable holding the key the mask rule names in key_env.
        #[arg(long)]
        key_env: String,
        /// Tokens as the masked column shows them (tok_...).
        #[arg(required = true)]
        tokens: Vec<String>,
    },
}

/// Flags of `pgveil serve`; each may also be set in the `--config` file (flags win).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (names with underscores).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where clients connect: HOST:PORT, or unix:DIR for DIR/.s.PGSQL.6432 only
    /// [default: 127.0.0.1:6432]
    #[arg(long)]
    pub listen: Option<String>,
    /// Also listen on a Unix-domain socket in DIR, as DIR/.s.PGSQL.<the --listen port>
    /// (what psql -h DIR connects to)
    #[arg(long, value_name = "DIR")]
    pub unix_socket_dir: Option<PathBuf>,
    /// The real PostgreSQL server: HOST:PORT, or unix:DIR for its socket DIR/.s.PGSQL.5432
    /// (unix:DIR/.s.PGSQL.PORT for another port) [default: 127.0.0.1:5432]
    #[arg(long)]
    pub upstream: Option<String>,
    /// A rules file or a directory of *.toml files, merged [default: rules/]
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// JSON Lines audit log; - for stdout [default: audit.jsonl]
    #[arg(long)]
    pub audit_log: Option<String>,
    /// Record nothing (for benchmarks): no audit log at all.
    #[arg(long)]
    pub no_audit: bool,
    /// When records are forced to disk: always (fdatasync before a statement's result is
    /// released) or interval (written before release, synced every --audit-flush-interval-ms)
    /// [default: interval]
    #[arg(long, value_enum)]
    pub audit_flush: Option<crate::config::AuditFlush>,
    /// Milliseconds between syncs with --audit-flush interval [default: 1000]
    #[arg(long)]
    pub audit_flush_interval_ms: Option<u64>,
    /// Rotate the audit log past this many bytes; the chain continues in the new file;
    /// 0 = never [default: 104857600]
    #[arg(long)]
    pub audit_max_bytes: Option<u64>,
    /// Keep at most N rotated audit files (the oldest go, after each rotation and at
    /// start); 0 = keep all [default: 0]
    #[arg(long, value_name = "N")]
    pub audit_keep: Option<usize>,
    /// Remove rotated audit files older than D days (after each rotation and at start);
    /// 0 = keep all [default: 0]
    #[arg(long, value_name = "D")]
    pub audit_keep_days: Option<u64>,
    /// Write statements with their literals ('...', numbers) replaced by ?.
    #[arg(long)]
    pub audit_redact: bool,
    /// Failed logins from one client address before it is turned away; 0 = no limit
    /// [default: 10]
    #[arg(long)]
    pub auth_max_failures: Option<u32>,
    /// Seconds over which failed logins are counted [default: 60]
    #[arg(long)]
    pub auth_failure_window_secs: Option<u64>,
    /// Seconds an address is turned away once over the limit [default: 300]
    #[arg(long)]
    pub auth_ban_secs: Option<u64>,
    /// PEM certificate chain for client TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for client TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS.
    #[arg(long)]
    pub require_tls: bool,
    /// TLS to the upstream [default: prefer]
    #[arg(long, value_enum)]
    pub upstream_tls: Option<UpstreamTls>,
    /// CA certificate (PEM) for --upstream-tls verify-ca and verify-full.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Serve the admin console (PostgreSQL protocol: SHOW CLIENTS, SHOW STATS, RELOAD, KILL)
    /// on ADDR, for members of [settings] admin_roles.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Most client connections at once; more get SQLSTATE 53300 [default: 1000]
    #[arg(long)]
    pub max_client_conn: Option<usize>,
    /// Seconds a client may take to connect and authenticate [default: 60]
    #[arg(long)]
    pub handshake_timeout_secs: Option<u64>,
    /// Close client connections idle this many seconds outside a transaction; 0 = never [default: 0]
    #[arg(long)]
    pub client_idle_timeout_secs: Option<u64>,
    /// Seconds to wait for the upstream to accept a connection [default: 5]
    #[arg(long)]
    pub connect_timeout_secs: Option<u64>,
    /// Seconds running sessions get to finish after SIGTERM [default: 30]
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// Largest message a client may send, in bytes [default: 268435456]
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Threads that run sessions; 1 is a single-threaded event loop [default: 1]
    #[arg(long)]
    pub worker_threads: Option<usize>,
}

impl ServeArgs {
    /// The flags as settings, layered over the config file's.
    pub fn settings(&self) -> Result<ServeSettings, crate::config::ConfigError> {
        let file = match &self.config {
            Some(p) => ServeSettings::from_file(p)?,
            None => ServeSettings::default(),
        };
        let flags = ServeSettings {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            rules: self.rules.clone(),
            audit_log: self.audit_log.clone(),
            audit: self.no_audit.then_some(false),
            audit_flush: self.audit_flush,
            audit_flush_interval_ms: self.audit_flush_interval_ms,
            audit_max_bytes: self.audit_max_bytes,
            audit_keep: self.audit_keep,
            audit_keep_days: self.audit_keep_days,
            audit_redact: self.audit_redact.then_some(true),
            auth_max_failures: self.auth_max_failures,
            auth_failure_window_secs: self.auth_failure_window_secs,
            auth_ban_secs: self.auth_ban_secs,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            require_tls: self.require_tls.then_some(true),
            upstream_tls: self.upstream_tls,
            upstream_ca: self.upstream_ca.clone(),
            metrics: self.metrics.clone(),
            admin_listen: self.admin_listen.clone(),
            unix_socket_dir: self.unix_socket_dir.clone(),
            max_client_conn: self.max_client_conn,
            handshake_timeout_secs: self.handshake_timeout_secs,
            client_idle_timeout_secs: self.client_idle_timeout_secs,
            connect_timeout_secs: self.connect_timeout_secs,
            shutdown_grace_secs: self.shutdown_grace_secs,
            max_message_bytes: self.max_message_bytes,
            worker_threads: self.worker_threads,
        };
        Ok(flags.or(file))
    }
}

/// `pgveil check`: every problem on its own line, exit 1 if any (warnings alone pass).
pub fn check(rules_path: &std::path::Path, upstream_url: Option<&str>) -> ExitCode {
    let rules = match inspect::load_rules(rules_path) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if let Some(url) = upstream_url {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("pgveil check: {e}");
                return ExitCode::from(2);
            }
        };
        match runtime.block_on(inspect::check_against_database(&rules, url)) {
            Ok(lines) => {
                let errors = lines.iter().filter(|l| !l.contains(": warning: ")).count();
                for l in &lines {
                    println!("{l}");
                }
                if errors > 0 {
                    return ExitCode::from(1);
                }
            }
            Err(e) => {
                eprintln!("pgveil check: {e}");
                return ExitCode::from(2);
            }
        }
    }
    println!(
        "{}: valid ({} masks, {} row filters, {} allow rules, {} recycle rules, {} alerts)",
        rules_path.display(),
        rules.masks.len(),
        rules.filters.len(),
        rules.allows.len(),
        rules.recycles.len(),
        rules.alerts.len()
    );
    ExitCode::SUCCESS
}

/// `pgveil explain`: prints the dry run; exit 1 on bad rules, 2 if the database fails.
pub fn explain(
    rules_path: &std::path::Path,
    role: &str,
    upstream_url: Option<&str>,
    sql: &str,
) -> ExitCode {
    let rules = match inspect::load_rules(rules_path) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgveil explain: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(inspect::explain(&rules, role, upstream_url, sql)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgveil explain: {e}");
            ExitCode::from(2)
        }
    }
}

/// The answer of a subcommand the contract names but this version does not provide yet.
/// `pgveil audit verify` and `pgveil audit search`.
pub fn audit(command: AuditCommand) -> ExitCode {
    use crate::audit::{search, verify};
    match command {
        AuditCommand::Verify { files, last_hash } => {
            // On a terminal, how far the check is (files of many gigabytes take a while).
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut shown = None;
            let progress = |done: u64, total: u64| {
                if !terminal || total == 0 {
                    return;
                }
                let percent = done * 100 / total;
                if shown != Some(percent) {
                    shown = Some(percent);
                    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                    eprint!(
                        "\rverifying: {:.0} of {:.0} MiB ({percent}%)",
                        mib(done),
                        mib(total)
                    );
                    if done >= total {
                        eprintln!();
                    }
                }
            };
            let report = match verify::verify_with_progress(&files, progress) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pgveil audit verify: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(prev) = &report.continues_from {
                println!("note: the chain starts mid-way (prev_hash {prev}); give the earlier files first to check the link");
            }
            match report.outcome {
                verify::Outcome::Intact => {}
                verify::Outcome::Broken { file, line, reason } => {
                    println!("{}:{line}: broken: {reason}", file.display());
                    println!("{} records verified before it", report.records);
                    return ExitCode::from(1);
                }
                verify::Outcome::Torn { file, line } => {
                    println!("{}:{line}: torn last line: a write was cut short (pgveil stopped while writing it); every line before it verifies", file.display());
                    println!("{} records verified", report.records);
                    return ExitCode::from(1);
                }
            }
            if let Some(want) = last_hash.filter(|h| *h != report.last_hash) {
                println!("broken: the chain ends with {} but {want} was expected (records were removed from the end)", report.last_hash);
                return ExitCode::from(1);
            }
            println!(
                "intact: {} records in {} files, last hash {}",
                report.records,
                files.len(),
                report.last_hash
            );
            ExitCode::SUCCESS
        }
        AuditCommand::Search {
            files,
            user,
            table,
            decision,
            kind,
            event,
            session,
            since,
            until,
            json,
        } => {
            let time = |t: Option<String>| t.map(|t| search::parse_time(&t)).transpose();
            let (since, until) = match (time(since), time(until)) {
                (Ok(s), Ok(u)) => (s, u),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("pgveil audit search: {e}");
                    return ExitCode::from(2);
                }
            };
            let filter = search::Filter {
                user,
                table,
                decision,
                kind,
                event,
                session,
                since,
                until,
            };
            let mut out = std::io::stdout().lock();
            match search::search(&files, &filter, json, &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgveil audit search: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
