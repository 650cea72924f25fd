//! The command line: `check` reports every problem with file:line and exits 1, valid rules
//! exit 0, bad `serve` settings fail at once with a clear message, every subcommand has
//! help, and rules reload keeps the old rules when the new ones are invalid.

mod common;

use common::{output_text as text, pgveil};

#[test]
fn check_accepts_the_sample_rules() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let out = pgveil(&["check", "--rules", rules]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("valid"));
}

#[test]
fn check_reports_each_problem_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[[mask]]\ncolumn = \"customers.phone\"\nfunction = \"scramble\"\n\n[[mask]]\ncolumn = \"x\"\nfunction = \"null\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[settings]\nprotected = [\"delete\"\n",
    )
    .unwrap();
    let out = pgveil(&["check", "--rules", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].contains("a.toml:1:") && lines[0].contains("scramble"));
    assert!(lines[1].contains("a.toml:5:"));
    assert!(lines[2].contains("b.toml:"));
}

#[test]
fn serve_refuses_bad_settings_and_rules() {
    let out = pgveil(&["serve", "--require-tls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--require-tls needs"), "{}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[[allow]]\nroles = 1\n").unwrap();
    let out = pgveil(&["serve", "--rules", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("bad.toml:1"), "{}", text(&out));

    let cfg = dir.path().join("pgveil.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\nlisten_address = \"x\"\n").unwrap();
    let out = pgveil(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("pgveil.toml:2"), "{}", text(&out));
}

#[test]
fn every_subcommand_has_help() {
    // Every command's help reads as a reference: usage, and (but for the `trash` group)
    // examples.
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
        vec!["explain", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["audit", "search", "--help"],
        vec!["trash", "--help"],
        vec!["trash", "init", "--help"],
        vec!["trash", "list", "--help"],
        vec!["trash", "restore", "--help"],
        vec!["trash", "purge", "--help"],
        vec!["token", "decode", "--help"],
    ] {
        let out = pgveil(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("Usage"), "{args:?}");
        if args != ["trash", "--help"] {
            assert!(
                text(&out).contains("Example"),
                "{args:?} --help has no example"
            );
        }
    }
    let out = pgveil(&["serve", "--help"]);
    for flag in [
        "--listen",
        "--upstream",
        "--rules",
        "--audit-log",
        "--tls-cert",
        "--tls-key",
        "--require-tls",
        "--upstream-tls",
        "--upstream-ca",
        "--metrics",
        "--config",
    ] {
        assert!(text(&out).contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn audit_verify_of_a_missing_file_is_an_error_not_a_verdict() {
    let out = pgveil(&["audit", "verify", "/nonexistent/x.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("No such file"));
}

#[test]
fn reload_keeps_old_rules_when_new_ones_are_invalid() {
    use pgveil::config::{Config, ServeSettings};
    use pgveil::proxy::Proxy;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, "[[mask]]\ncolumn = \"t.c\"\nfunction = \"null\"\n").unwrap();
    let config = Config::from_settings(ServeSettings {
        rules: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let proxy = Proxy::new(config).unwrap();
    assert_eq!(proxy.rules.load().masks.len(), 1);
    std::fs::write(&file, "[[mask]]\ncolumn = \"t.c\"\nfunction = \"nope\"\n").unwrap();
    assert!(proxy.reload_rules().is_err());
    assert_eq!(proxy.rules.load().masks.len(), 1, "old rules stay in force");
    std::fs::write(
        &file,
        "[[mask]]\ncolumn = \"t.c\"\nfunction = \"null\"\n[[mask]]\ncolumn = \"t.d\"\nfunction = \"email\"\n",
    )
    .unwrap();
    proxy.reload_rules().unwrap();
    assert_eq!(proxy.rules.load().masks.len(), 2);
}

#[tokio::test]
async fn rules_reload_when_their_files_change() {
    use pgveil::config::{Config, ServeSettings};
    use pgveil::proxy::Proxy;
    use pgveil::server::watch_rules;
    use std::sync::Arc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, "[[mask]]\ncolumn = \"t.c\"\nfunction = \"null\"\n").unwrap();
    let config = Config::from_settings(ServeSettings {
        rules: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let proxy = Arc::new(Proxy::new(config).unwrap());
    let watcher = tokio::spawn(watch_rules(proxy.clone(), Duration::from_millis(50)));
    // A broken edit is ignored; the old rules stay.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&file, "[[mask]]\ncolumn = \"t.c\"\nfunction = \"broken\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.rules.load().masks.len(), 1);
    // A new file is picked up.
    std::fs::write(
        dir.path().join("s.toml"),
        "[[mask]]\ncolumn = \"t.d\"\nfunction = \"email\"\n",
    )
    .unwrap();
    std::fs::write(&file, "[[mask]]\ncolumn = \"t.c\"\nfunction = \"null\"\n").unwrap();
    for _ in 0..100 {
        if proxy.rules.load().masks.len() == 2 {
            watcher.abort();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rules were not reloaded after the files changed");
}

/// `--log-format json`: pgveil's own log as JSON Lines on stderr, one object per event
/// with its timestamp, level, target, message and fields; text stays the default.
#[test]
fn log_format_json_writes_one_object_per_event() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let spawn = |format: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(format)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", "127.0.0.1:1", "--rules"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"))
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .env("PGVEIL_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = spawn(&["--log-format", "json"]);
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).expect(&first);
    assert_eq!(v["level"], "INFO", "{first}");
    assert_eq!(v["message"], "pgveil ready", "{first}");
    assert_eq!(v["target"], "pgveil", "{first}");
    assert_eq!(v["fields"]["upstream"], "127.0.0.1:1", "{first}");
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{first}");
    let mut child = spawn(&[]);
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.contains("pgveil ready") && !first.starts_with('{'),
        "{first}"
    );
}

/// Every command and long flag of the binary, walked from its own definitions.
fn every_command_and_flag() -> (Vec<String>, Vec<String>) {
    use clap::CommandFactory;
    fn walk(c: &clap::Command, path: String, cmds: &mut Vec<String>, flags: &mut Vec<String>) {
        cmds.push(path.clone());
        for a in c.get_arguments() {
            if let Some(l) = a.get_long() {
                flags.push(format!("--{l}"));
            }
        }
        for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(s, format!("{path} {}", s.get_name()), cmds, flags);
        }
    }
    let (mut cmds, mut flags) = (Vec::new(), Vec::new());
    walk(
        &pgveil::cli::Cli::command(),
        "pgveil".into(),
        &mut cmds,
        &mut flags,
    );
    (cmds, flags)
}

/// `pgveil completions bash|zsh|fish`: scripts generated from the binary's own commands,
/// naming every command and flag; the bash one completes commands, flags, and the values
/// of flags and arguments that have a fixed set, as bash runs it.
#[test]
fn completions_name_every_command_and_flag_and_complete_in_bash() {
    let (cmds, flags) = every_command_and_flag();
    let script = |shell: &str| {
        let out = pgveil(&["completions", shell]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = script("bash");
    for c in &cmds {
        assert!(bash.contains(&format!("\"{c}\"")), "bash: {c}");
    }
    for f in &flags {
        assert!(bash.contains(f.as_str()), "bash: {f}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgveil.bash");
    std::fs::write(&file, &bash).unwrap();
    let complete = |words: &str, cword: usize| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; _pgveil; echo \"${{COMPREPLY[@]}}\"",
                file.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(complete("pgveil se", 1), "serve");
    assert_eq!(
        complete("pgveil serve --audit-k", 2),
        "--audit-keep --audit-keep-days"
    );
    assert_eq!(complete("pgveil --log-format ''", 2), "text json");
    assert_eq!(complete("pgveil audit v", 2), "verify");
    assert!(complete("pgveil completions ''", 2).contains("bash zsh fish"));
    let zsh = script("zsh");
    assert!(zsh.starts_with("#compdef pgveil") && zsh.contains("bashcompinit"));
    let fish = script("fish");
    for c in cmds
        .iter()
        .filter_map(|c| c.rsplit(' ').next())
        .filter(|c| *c != "pgveil")
    {
        assert!(fish.contains(&format!(" -a {c} ")), "fish: {c}");
    }
    for f in &flags {
        assert!(fish.contains(&format!(" -l {}", &f[2..])), "fish: {f}");
    }
}

/// `pgveil man`: a manual page naming every command and flag, which groff renders without
/// a warning (where groff is installed).
#[test]
fn man_page_names_every_command_and_flag_and_renders() {
    let (cmds, flags) = every_command_and_flag();
    let out = pgveil(&["man"]);
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".TH PGVEIL 1"));
    for c in cmds.iter().skip(1) {
        assert!(page.contains(&format!(".SS \"{c}\"")), "man: {c}");
    }
    for f in &flags {
        assert!(page.contains(&f.replace('-', "\\-")), "man: {f}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgveil.1");
    std::fs::write(&file, &page).unwrap();
    match std::process::Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&file)
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "{}", text(&out));
            assert!(out.stderr.is_empty(), "groff warns: {}", text(&out));
        }
        Err(_) => eprintln!("groff is not installed: the page was checked as text only"),
    }
}
