//! The drivers most CRM applications use, through pgveil, as a masked and as an exempt
//! role: pgjdbc (statement reuse past its prepare threshold, fetch-size portals, batches,
//! metadata calls, scrollable result sets, COPY), asyncpg (its statement cache, prepared
//! statements, Cursor.forward, executemany, COPY) and psycopg2 (new literals each time, a
//! scrollable named cursor moved with scroll(), executemany, COPY), and an ORM application
//! (SQLAlchemy over psycopg2: a small CRM model's list, detail, search, export and
//! rolled-back edit views, lazy and eager loading, server-side cursors). Each suite prints one
//! line per result: the exempt role's output through pgveil must equal a direct
//! connection's, and the masked role's must hold masked values and no clear one.
//!
//! The drivers come from Debian (default-jdk-headless, libpostgresql-jdbc-java,
//! python3-asyncpg, python3-psycopg2, python3-sqlalchemy), installed by
//! scripts/install-deps.sh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{shared, stderr, stdout, PgCluster, TestProxy};

const RULES: &str = r#"
[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.customers.email"
function = "email"
unmasked_for = ["crm_admin"]
"#;

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn cluster() -> &'static PgCluster {
    shared()
}

fn suites() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// The first Python with the drivers and the ORM (the system's, where a version manager's shim comes
/// first on PATH).
fn python() -> &'static str {
    static PYTHON: OnceLock<&'static str> = OnceLock::new();
    PYTHON.get_or_init(|| {
        ["python3", "/usr/bin/python3"]
            .into_iter()
            .find(|py| {
                Command::new(py)
                    .args(["-c", "import asyncpg, psycopg2, sqlalchemy"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("asyncpg, psycopg2 or sqlalchemy is missing: run scripts/install-deps.sh")
    })
}

/// The JDBC suite, compiled once per test run.
fn java_classes() -> &'static Path {
    static CLASSES: OnceLock<tempfile::TempDir> = OnceLock::new();
    CLASSES
        .get_or_init(|| {
            assert!(
                Path::new(JDBC_JAR).exists(),
                "pgjdbc is missing: run scripts/install-deps.sh"
            );
            let dir = tempfile::tempdir().unwrap();
            let out = Command::new("javac")
                .args(["-cp", JDBC_JAR, "-d"])
                .arg(dir.path())
                .arg(suites().join("Drivers.java"))
                .output()
                .expect("javac (default-jdk-headless) is missing: run scripts/install-deps.sh");
            assert!(out.status.success(), "javac: {}", stderr(&out));
            dir
        })
        .path()
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn jdbc(addr: &str, user: &str, password: &str) -> String {
    let url = format!("jdbc:postgresql://{addr}/crm?sslmode=disable");
    let classpath = format!("{}:{JDBC_JAR}", java_classes().display());
    run(
        Command::new("java").args(["-cp", &classpath, "Drivers", &url, user, password]),
        &format!("pgjdbc as {user} via {addr}"),
    )
}

fn python_suite(script: &str, addr: &str, user: &str, password: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let dsn = format!("postgresql://{user}:{password}@{host}:{port}/crm?sslmode=disable");
    run(
        Command::new(python()).arg(suites().join(script)).arg(&dsn),
        &format!("{script} as {user} via {addr}"),
    )
}

/// Distinctive fragments of every clear phone and e-mail.
fn secrets() -> Vec<String> {
    cluster()
        .psql_super(
            "crm",
            "SELECT substr(phone, 4, 4) || '|' || split_part(email, '@', 1) FROM customers WHERE id <= 12",
        )
        .lines()
        .flat_map(|l| l.split('|').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| s.len() >= 4)
        .collect()
}

/// The exempt role through pgveil sees exactly what a direct connection sees; the masked
/// role gets every line (the same statements ran), masked values, and no clear one.
fn compare(suite: impl Fn(&str, &str, &str) -> String, pgveil: &str) {
    let direct = suite(&cluster().addr(), "crm_admin", "admin_pw");
    let exempt = suite(pgveil, "crm_admin", "admin_pw");
    assert_eq!(
        exempt, direct,
        "the exempt role's results differ through pgveil"
    );
    let masked = suite(pgveil, "alice", "alice_pw");
    assert_eq!(
        masked.lines().count(),
        direct.lines().count(),
        "{masked}\n---\n{direct}"
    );
    assert!(masked.contains("139****"), "{masked}");
    assert!(masked.contains("***@example.com"), "{masked}");
    for s in secrets() {
        for l in masked.lines() {
            // Metadata lines name columns, not values.
            assert!(
                !l.contains(&format!("{s}@")) && !l.contains(&format!("139{s}")),
                "{s} in clear: {l}"
            );
        }
    }
}

/// Runs `suite` directly and through a pgveil with the masks above (see `compare`).
async fn through_pgveil(suite: fn(&str, &str, &str) -> String) {
    let p = TestProxy::with_rules(cluster(), RULES).await;
    let addr = p.addr_string();
    tokio::task::spawn_blocking(move || compare(suite, &addr))
        .await
        .unwrap();
    p.shutdown().await;
}

fn asyncpg_suite(addr: &str, user: &str, password: &str) -> String {
    python_suite("asyncpg_suite.py", addr, user, password)
}

fn psycopg2_suite(addr: &str, user: &str, password: &str) -> String {
    python_suite("psycopg2_suite.py", addr, user, password)
}

fn sqlalchemy_suite(addr: &str, user: &str, password: &str) -> String {
    python_suite("sqlalchemy_app.py", addr, user, password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    through_pgveil(jdbc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    through_pgveil(asyncpg_suite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2() {
    through_pgveil(psycopg2_suite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_orm_application() {
    through_pgveil(sqlalchemy_suite).await;
}
