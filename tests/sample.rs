//! The sample rules in rules/ are what the README, the demo and the Docker setup use: they
//! must pass `pgveil check` against the sample CRM schema (every table, column and role
//! they name exists, every mask fits its column), with no warning once the recycle bin is
//! installed, and they must mean what their comments say for the sample roles.

mod common;

use std::path::Path;

use common::{output_text as text, pgveil, shared, SUPERUSER_PASSWORD};

/// The sample CRM in a database of its own (its recycle bin gets installed).
fn sample_db(name: &str) -> String {
    let pg = shared();
    pg.create_crm_db(name);
    format!(
        "postgres://postgres:{SUPERUSER_PASSWORD}@{}/{name}",
        pg.addr()
    )
}

#[test]
fn sample_rules_pass_check_against_the_sample_schema() {
    let url = sample_db("sample_check");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rules/crm.toml")
        .exists());
    let out = pgveil(&["check", "--rules", "rules/"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Before `trash init` the recycle rules are flagged (as warnings, exit 0) ...
    let out = pgveil(&["check", "--rules", "rules/", "--upstream-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("warning"), "{}", text(&out));
    // ... and after it, nothing is left to say.
    let out = pgveil(&["trash", "init", "--rules", "rules/", "--upstream-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = pgveil(&["check", "--rules", "rules/", "--upstream-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("warning"), "{}", text(&out));
}

#[test]
fn sample_rules_mean_what_their_comments_say() {
    let url = sample_db("sample_explain");
    let out = pgveil(&["trash", "init", "--rules", "rules/", "--upstream-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let explain = |role: &str, sql: &str| {
        let out = pgveil(&[
            "explain",
            "--rules",
            "rules/",
            "--role",
            role,
            "--upstream-url",
            &url,
            sql,
        ]);
        text(&out)
    };
    // Sales read e-mails in clear; support gets them masked.
    let sales = explain("crm_sales", "SELECT email FROM customers");
    let support = explain("crm_support", "SELECT email FROM customers");
    assert!(sales.contains("column 1 email: none"), "{sales}");
    assert!(
        support.contains("column 1 email: email (rule rules/crm.toml:"),
        "{support}"
    );
    // Support may delete a task by id, never all tasks; analysts not at all.
    let one = explain("crm_support", "DELETE FROM tasks WHERE id = 1");
    assert!(!one.contains("refused"), "{one}");
    assert!(explain("crm_support", "DELETE FROM tasks").contains("refused"));
    assert!(explain("crm_analyst", "DELETE FROM tasks WHERE id = 1").contains("refused"));
}

#[test]
fn admin_commands_take_the_password_from_pgpassword_as_libpq_does() {
    let pg = shared();
    let url = format!("postgres://postgres@{}/crm", pg.addr());
    let run = |password: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["check", "--rules", "rules/", "--upstream-url", &url])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    };
    let out = run(SUPERUSER_PASSWORD);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Exit 2: the rules could not be checked (1 would say they are invalid).
    let out = run("wrong_pw");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("wrong_pw"), "{}", text(&out));
    // A password in the URL wins over PGPASSWORD.
    let with_password = format!("postgres://postgres:{SUPERUSER_PASSWORD}@{}/crm", pg.addr());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args([
            "check",
            "--rules",
            "rules/",
            "--upstream-url",
            &with_password,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PGPASSWORD", "wrong_pw")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn admin_commands_read_the_password_file_as_libpq_does() {
    use std::os::unix::fs::PermissionsExt;
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass");
    std::fs::write(
        &file,
        format!(
            "# other servers first\nelsewhere:5432:*:postgres:nope\n127.0.0.1:{}:crm:postgres:{SUPERUSER_PASSWORD}\n",
            pg.port
        ),
    )
    .unwrap();
    let url = format!("postgres://postgres@{}/crm", pg.addr());
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["check", "--rules", "rules/", "--upstream-url", &url])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", &file)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A file others may read is ignored, as libpq ignores it, and said so.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("group or world access"),
        "{}",
        text(&out)
    );
}
