//! docker/ without a Docker engine: the compose file parses and wires what the README says
//! (PostgreSQL 15 seeded with the sample CRM, the recycle bin installed, pgveil in front
//! with rules/, the audit log on a volume, metrics exposed), every path the Dockerfile and
//! the compose file copy or mount exists, and the binary works the way the image runs it:
//! as an unprivileged user, from a copied directory, with only its rules.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, shared, SUPERUSER_PASSWORD};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_file_parses_and_wires_the_sample_setup() {
    let text = std::fs::read_to_string(repo().join("docker/compose.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("compose.yaml is valid YAML");
    let doc = &docs[0];
    let services = &doc["services"];
    assert_eq!(services["postgres"]["image"].as_str(), Some("postgres:15"));
    let seeds = strs(&services["postgres"]["volumes"]);
    assert!(seeds
        .iter()
        .any(|v| v.contains("crm.sql:/docker-entrypoint-initdb.d/")));
    let pgveil = &services["pgveil"];
    let ports = strs(&pgveil["ports"]);
    assert!(ports.contains(&"6432:6432".to_string()) && ports.contains(&"9187:9187".to_string()));
    let command = strs(&pgveil["command"]);
    for flag in ["--rules", "--audit-log", "--metrics", "--upstream"] {
        assert!(
            command.contains(&flag.to_string()),
            "pgveil command lacks {flag}"
        );
    }
    let mounts = strs(&pgveil["volumes"]);
    assert!(mounts
        .iter()
        .any(|m| m.starts_with("audit:/var/lib/pgveil/audit")));
    assert!(
        !doc["volumes"]["audit"].is_badvalue(),
        "an audit volume is declared"
    );
    assert_eq!(
        pgveil["depends_on"]["trash-init"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        strs(&services["trash-init"]["command"])[..2],
        ["trash", "init"]
    );
    // Every host path mounted exists (relative to docker/).
    for service in ["postgres", "trash-init", "pgveil"] {
        for m in strs(&services[service]["volumes"]) {
            let host = m.split(':').next().unwrap();
            if host.starts_with('.') {
                assert!(
                    repo().join("docker").join(host).exists(),
                    "{service}: {host}"
                );
            }
        }
    }
    let context = services["trash-init"]["build"]["context"].as_str().unwrap();
    assert!(repo()
        .join("docker")
        .join(context)
        .join("Cargo.toml")
        .exists());
}

#[test]
fn dockerfile_builds_from_existing_paths_and_runs_unprivileged() {
    let text = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    // .dockerignore leaves everything out (target/ alone is gigabytes) but what it names.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "an allowlist: {rules:?}");
    let sent: Vec<String> = rules[1..]
        .iter()
        .map(|r| {
            r.strip_prefix('!')
                .expect("only exceptions after *")
                .to_string()
        })
        .collect();
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "a build stage and a runtime stage");
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY of a missing path: {src}");
            let top = src.trim_end_matches('/').trim_start_matches("./");
            assert!(
                sent.iter().any(|s| s == top),
                "COPY of {src}, which .dockerignore leaves out of the build context"
            );
        }
    }
    let user = text
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    let health = text
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .nth(1)
        .expect("a HEALTHCHECK command");
    assert!(health.contains("\"pgveil\", \"health\""), "{health}");
    // No PostgreSQL client in the runtime image: the health check is pgveil's own.
    assert!(!text.contains("postgresql-client") && !text.contains("pg_isready"));
    assert!(text.contains("--locked"), "the build uses Cargo.lock");
}

/// Copies the binary and rules/ to a fresh directory owned by nobody.
fn copied_install() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("pgveil");
    std::fs::copy(env!("CARGO_BIN_EXE_pgveil"), &bin).unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::copy(
        repo().join("rules/crm.toml"),
        dir.path().join("rules/crm.toml"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("audit")).unwrap();
    let status = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    if is_root() {
        let status = Command::new("chown")
            .arg("nobody")
            .arg(dir.path().join("audit"))
            .status()
            .unwrap();
        assert!(status.success());
    }
    (dir, bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args` as nobody when we are root, as ourselves (already unprivileged) otherwise.
fn unprivileged(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_as_an_unprivileged_user_from_a_copied_directory() {
    let pg = shared();
    let (dir, bin) = copied_install();
    let out = unprivileged(&bin)
        .args(["check", "--rules"])
        .arg(dir.path().join("rules"))
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let audit = dir.path().join("audit/audit.jsonl");
    let mut child = unprivileged(&bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--upstream",
            &pg.addr(),
            "--upstream-tls",
            "disable",
            "--rules",
        ])
        .arg(dir.path().join("rules"))
        .arg("--audit-log")
        .arg(&audit)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conn = format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=crm"
    );
    let mut client = None;
    for _ in 0..100 {
        if let Ok((c, conn)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = client.expect("pgveil started as an unprivileged user");
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    drop(client);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let records = std::fs::read_to_string(&audit).unwrap();
    assert!(records.contains("SELECT count(*) FROM customers"));
}

/// `pgveil health`, the image's health check, tells what pg_isready tells: 0 when a server
/// answered through pgveil, 1 when pgveil answered but cannot reach its server, 2 when
/// nothing listens.
#[tokio::test]
async fn health_probe_tells_accepting_rejecting_and_no_response() {
    let probe = |addr: String| async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgveil"));
        cmd.args(["health", "--addr", &addr, "--timeout", "5"]);
        let out = cmd.output().await.unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let up = common::TestProxy::start(shared(), |_| {}).await;
    let (code, text) = probe(up.addr_string()).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("accepting connections"), "{text}");
    let nowhere = format!("127.0.0.1:{}", free_port());
    let down = common::TestProxy::start_upstream(&nowhere, |_| {}).await;
    let (code, text) = probe(down.addr_string()).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("rejecting connections (08"), "{text}");
    let (code, text) = probe(format!("127.0.0.1:{}", free_port())).await;
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no response"), "{text}");
    // A listener that takes TLS only: the probe speaks TLS.
    let tls = shared().tls.as_ref().unwrap();
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    let tls_only = common::TestProxy::start(shared(), move |s| {
        s.tls_cert = Some(cert);
        s.tls_key = Some(key);
        s.require_tls = Some(true);
    })
    .await;
    let (code, text) = probe(tls_only.addr_string()).await;
    assert_eq!(code, Some(0), "{text}");
    // pgveil turning connections away itself is no health.
    let full = common::TestProxy::start(shared(), |s| s.max_client_conn = Some(1)).await;
    let _held = common::connect(&full.conn_str("crm_admin", "admin_pw", "crm")).await;
    let (code, text) = probe(full.addr_string()).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("pgveil:"), "{text}");
}

/// deploy/pgveil.service, the systemd unit the README installs: the settings it runs with,
/// its hardening, and, where systemd-analyze is installed, a unit systemd accepts without
/// a warning and rates as well confined.
#[test]
fn systemd_unit_parses_and_is_hardened() {
    let text = std::fs::read_to_string(repo().join("deploy/pgveil.service")).unwrap();
    let mut section = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        keys.push((section.clone(), k.to_string(), v.to_string()));
    }
    let get = |s: &str, k: &str| {
        keys.iter()
            .filter(|(sec, key, _)| sec == s && key == k)
            .map(|(_, _, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        get("Service", "ExecStart"),
        ["/usr/local/bin/pgveil serve --config /etc/pgveil/pgveil.toml"]
    );
    assert_eq!(get("Service", "User"), ["pgveil"]);
    assert_eq!(get("Service", "KillSignal"), ["SIGTERM"]);
    assert_eq!(get("Install", "WantedBy"), ["multi-user.target"]);
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/pgveil"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert!(get("Service", k).contains(&v), "{k}={v} missing");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed: the unit's syntax alone was checked");
        return;
    };
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("pgveil.service");
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/pgveil", env!("CARGO_BIN_EXE_pgveil")),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("pgveil.service"), "systemd warns: {err}");
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    if let Some(level) = report.lines().find_map(|l| {
        l.split("Overall exposure level for pgveil.service: ")
            .nth(1)
    }) {
        let level: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
        assert!(level <= 2.0, "exposure {level}: {report}");
    }
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(program))
                .find(|p| p.is_file())
        })
        .ok_or(())
}
