//! README.md is run, not just read: every shell block in it is either run here, in order,
//! as one shell session from the repository root, or marked as skipped with a reason. A
//! newcomer who follows the README top to bottom runs exactly the commands run here.
//!
//! A block's mark is an HTML comment (invisible on GitHub) on the line before its fence:
//!
//! ```text
//! <!-- readme-test: run; expect: 139****7919; absent: 13910007919 -->
//! <!-- readme-test: skip: needs a Docker engine -->
//! ```
//!
//! `expect` and `absent` are checked against everything the block printed (stdout and
//! stderr, including that of the processes it started in the background). The "existing
//! server" of the walk-through is a scratch PostgreSQL with only its superuser, reached
//! through libpq's PGHOST, PGPORT, PGUSER and PGPASSWORD as the README asks the reader to
//! set them. The fixed ports the README uses for pgveil (6432, 6433, 9187) are replaced by
//! free ones, so the test can run beside other tests and servers. The walk-through keeps its
//! files in `quickstart/` (ignored by git), which this test empties before and after.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ClusterOptions, PgCluster, SUPERUSER_PASSWORD};

const MARK: &str = "<!-- readme-test:";
/// Fence info strings that hold commands a reader would type.
const SHELLS: [&str; 4] = ["sh", "bash", "shell", "console"];
/// The README's fixed ports, replaced by free ones.
const README_PORTS: [&str; 4] = ["6432", "6433", "6434", "9187"];
/// A cold `cargo build --release` included.
const DEADLINE: Duration = Duration::from_secs(20 * 60);

#[derive(Debug, PartialEq)]
enum Mark {
    Run {
        expect: Vec<String>,
        absent: Vec<String>,
    },
    Skip(String),
}

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    text: String,
    mark: Mark,
}

/// The shell blocks of a Markdown text with their marks, or every problem found (an
/// unmarked shell block, a mark that is not understood, a mark before no shell block).
fn shell_blocks(markdown: &str) -> Result<Vec<Block>, Vec<String>> {
    let lines: Vec<&str> = markdown.lines().collect();
    let fences = fences(markdown);
    let mut blocks = Vec::new();
    let mut problems = Vec::new();
    // Marks outside fences must stand right before a shell fence.
    for (i, line) in lines.iter().enumerate() {
        let line_no = i + 1;
        let inside = fences.iter().any(|f| (f.line..=f.end).contains(&line_no));
        if inside || !line.trim().starts_with(MARK) {
            continue;
        }
        match fences.iter().find(|f| f.line == i + 2) {
            Some(f) if f.shell() => {}
            Some(_) => problems.push(format!(
                "line {}: mark before a block that is not shell",
                i + 1
            )),
            None => problems.push(format!(
                "line {}: mark not directly before a shell block",
                i + 1
            )),
        }
    }
    for fence in fences.into_iter().filter(Fence::shell) {
        let before = fence.line.checked_sub(2).map(|i| lines[i].trim());
        let Some(rest) = before.and_then(|l| l.strip_prefix(MARK)) else {
            problems.push(format!(
                "line {}: shell block without a `{MARK} run|skip: reason -->` line before it",
                fence.line
            ));
            continue;
        };
        let parsed = rest
            .strip_suffix("-->")
            .ok_or_else(|| "a mark must fit on one line".to_string())
            .and_then(parse_mark);
        match parsed {
            Ok(mark) => blocks.push(Block {
                line: fence.line,
                text: fence.text,
                mark,
            }),
            Err(e) => problems.push(format!("line {}: {e}", fence.line - 1)),
        }
    }
    if problems.is_empty() {
        Ok(blocks)
    } else {
        Err(problems)
    }
}

/// A fenced block: the 1-based lines of its opening and closing fence, its info string's
/// first word, its text.
struct Fence {
    line: usize,
    end: usize,
    lang: String,
    text: String,
}

impl Fence {
    fn shell(&self) -> bool {
        SHELLS.contains(&self.lang.as_str())
    }
}

/// Every fenced block of a Markdown text, in order.
fn fences(markdown: &str) -> Vec<Fence> {
    let mut found = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```") else {
            continue;
        };
        let mut fence = Fence {
            line: i + 1,
            end: usize::MAX,
            lang: info.split_whitespace().next().unwrap_or("").to_string(),
            text: String::new(),
        };
        for (j, body) in lines.by_ref() {
            if body.trim() == "```" {
                fence.end = j + 1;
                break;
            }
            fence.text.push_str(body);
            fence.text.push('\n');
        }
        found.push(fence);
    }
    found
}

fn parse_mark(text: &str) -> Result<Mark, String> {
    // A reason is free text, semicolons included.
    if let Some(rest) = text.trim().strip_prefix("skip") {
        return match rest.trim().strip_prefix(':') {
            Some(reason) if !reason.trim().is_empty() => Ok(Mark::Skip(reason.trim().into())),
            _ => Err("`skip: REASON`, with a reason".into()),
        };
    }
    let mut items = text.split(';').map(str::trim).filter(|s| !s.is_empty());
    match items.next() {
        Some("run") => {
            let (mut expect, mut absent) = (Vec::new(), Vec::new());
            for item in items {
                match item.split_once(':') {
                    Some(("expect", t)) if !t.trim().is_empty() => expect.push(t.trim().into()),
                    Some(("absent", t)) if !t.trim().is_empty() => absent.push(t.trim().into()),
                    _ => {
                        return Err(format!(
                            "`{item}`: expected `expect: TEXT` or `absent: TEXT`"
                        ))
                    }
                }
            }
            Ok(Mark::Run { expect, absent })
        }
        _ => Err("a mark is `run[; expect: T][; absent: T]` or `skip: REASON`".into()),
    }
}

/// `text` with each README port, where it stands as a whole number, replaced.
fn replace_ports(text: &str, ports: &[(&str, u16)]) -> String {
    let mut out = text.to_string();
    for (from, to) in ports {
        let mut result = String::new();
        let mut rest = out.as_str();
        while let Some(at) = rest.find(from) {
            let before = rest[..at].chars().next_back();
            let after = rest[at + from.len()..].chars().next();
            let whole = !before.is_some_and(|c| c.is_ascii_digit())
                && !after.is_some_and(|c| c.is_ascii_digit());
            result.push_str(&rest[..at]);
            if whole {
                result.push_str(&to.to_string());
            } else {
                result.push_str(from);
            }
            rest = &rest[at + from.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// One bash script that runs the blocks in order in one shell (so `export`, `cd` and
/// background jobs carry over), each block's output in `<out>/<n>.out`, and `<out>/done`
/// listing the blocks that finished.
fn session_script(blocks: &[&Block], ports: &[(&str, u16)], out: &Path) -> String {
    let mut script = String::from("set -euo pipefail\n");
    for (n, block) in blocks.iter().enumerate() {
        let file = out.join(format!("{n}.out"));
        script += &format!(
            "{{\n{}}} >'{}' 2>&1 </dev/null\necho {n} >>'{}'\n",
            replace_ports(&block.text, ports),
            file.display(),
            out.join("done").display()
        );
    }
    script
}

/// The shell's process group: stopped (with pgveil servers the README left running) when
/// the test ends, whether it passed or not.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        for signal in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, "--", &format!("-{}", self.0)])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The walk-through's directory in the repository, emptied before and after.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_readme_shell_block_is_marked_and_the_runnable_ones_run() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let blocks = shell_blocks(&readme).unwrap_or_else(|problems| {
        panic!("README.md: {}", problems.join("\n"));
    });
    let run: Vec<&Block> = blocks
        .iter()
        .filter(|b| matches!(b.mark, Mark::Run { .. }))
        .collect();
    // The walk-through exists and is not all skipped.
    for needed in [
        "cargo build --release",
        "pgveil serve",
        "pgveil check",
        "kill -TERM",
    ] {
        assert!(
            run.iter().any(|b| b.text.contains(needed)),
            "no runnable README block runs `{needed}`"
        );
    }

    let pg = PgCluster::start(ClusterOptions {
        bare: true,
        ..Default::default()
    });
    let scratch = Scratch(repo.join("quickstart"));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let out = tempfile::tempdir().unwrap();
    let ports: Vec<(&str, u16)> = README_PORTS
        .iter()
        .map(|p| (*p, common::free_port()))
        .collect();
    let script = out.path().join("readme.sh");
    std::fs::write(&script, session_script(&run, &ports, out.path())).unwrap();

    let mut shell = Command::new("bash");
    shell
        .arg(&script)
        .current_dir(repo)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGDATABASE")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // What `cargo test` sets for its test binaries is not the reader's environment (and
    // would change the fingerprints of the README's own `cargo build`).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO_") && name != "CARGO_HOME") || name == "CARGO" {
            shell.env_remove(name.as_ref());
        }
    }
    std::os::unix::process::CommandExt::process_group(&mut shell, 0);
    let mut child = shell.spawn().unwrap();
    let group = ProcessGroup(child.id());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(group);

    let done = std::fs::read_to_string(out.path().join("done")).unwrap_or_default();
    let finished = done.lines().count();
    let output = |n: usize| std::fs::read_to_string(out.path().join(format!("{n}.out")));
    for (n, block) in run.iter().enumerate().take(finished + 1) {
        eprintln!(
            "--- README.md:{} ---\n{}--- output ---\n{}",
            block.line,
            block.text,
            output(n).unwrap_or_default()
        );
    }
    if finished < run.len() {
        let block = run[finished];
        panic!(
            "README.md:{}: the block {} (shell status {status:?}, ports replaced: {ports:?}):\n{}--- output ---\n{}",
            block.line,
            if status.is_some() { "failed" } else { "did not finish in time" },
            block.text,
            output(finished).unwrap_or_default()
        );
    }
    let mut problems = Vec::new();
    for (n, block) in run.iter().enumerate() {
        let Mark::Run { expect, absent } = &block.mark else {
            unreachable!()
        };
        let text = output(n).unwrap();
        for e in expect.iter().filter(|e| !text.contains(e.as_str())) {
            problems.push(format!("README.md:{}: output lacks `{e}`", block.line));
        }
        for a in absent.iter().filter(|a| text.contains(a.as_str())) {
            problems.push(format!("README.md:{}: output shows `{a}`", block.line));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(scratch);
}

/// The README's TOML examples are what pgveil accepts: a block with rule tables loads as
/// rules, any other as a `serve --config` file (unknown keys and bad values are errors in
/// both).
#[test]
fn readme_toml_examples_are_valid_rules_or_config() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks: Vec<(usize, String)> = fences(&readme)
        .into_iter()
        .filter(|f| f.lang == "toml")
        .map(|f| (f.line, f.text))
        .collect();
    assert!(
        blocks.len() >= 2,
        "the README shows a rules file and a config file"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut rules, mut configs) = (0, 0);
    for (line, text) in blocks {
        let path = dir.path().join(format!("readme-{line}.toml"));
        std::fs::write(&path, &text).unwrap();
        let is_rules = text.lines().any(|l| {
            let l = l.trim();
            l == "[settings]" || l.starts_with("[[")
        });
        if is_rules {
            rules += 1;
            if let Err(e) = pgveil::config::rules::Rules::load(&path) {
                panic!("README.md:{line}: the rules example does not load: {e:?}");
            }
        } else {
            configs += 1;
            if let Err(e) = pgveil::config::ServeSettings::from_file(&path) {
                panic!("README.md:{line}: the config example does not load: {e}");
            }
        }
    }
    assert!(
        rules >= 1 && configs >= 1,
        "rules {rules}, configs {configs}"
    );
}

#[test]
fn marks_are_read_strictly() {
    let md = "\
<!-- readme-test: run; expect: DELETE 1; absent: 139123 -->
```sh
echo hi
```
```text
not a command
```
<!-- readme-test: skip: needs a Docker engine; see tests/docker.rs -->
```bash
docker compose up
```
";
    let blocks = shell_blocks(md).unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].line, 2);
    assert_eq!(blocks[0].text, "echo hi\n");
    assert_eq!(
        blocks[0].mark,
        Mark::Run {
            expect: vec!["DELETE 1".into()],
            absent: vec!["139123".into()]
        }
    );
    assert_eq!(
        blocks[1].mark,
        Mark::Skip("needs a Docker engine; see tests/docker.rs".into())
    );

    let unmarked = "```sh\nrm -rf /\n```\n";
    assert!(shell_blocks(unmarked).unwrap_err()[0].contains("line 1: shell block without"));
    let reasonless = "<!-- readme-test: skip -->\n```sh\nx\n```\n";
    assert!(shell_blocks(reasonless).is_err());
    let unknown = "<!-- readme-test: run; expected: x -->\n```sh\nx\n```\n";
    assert!(shell_blocks(unknown).is_err());
    let detached = "<!-- readme-test: run -->\n\ntext\n```sh\nx\n```\n";
    assert_eq!(shell_blocks(detached).unwrap_err().len(), 2);
    let not_shell = "<!-- readme-test: run -->\n```toml\nx = 1\n```\n";
    assert!(shell_blocks(not_shell).is_err());
}

#[test]
fn only_whole_port_numbers_are_replaced() {
    let ports = [("6432", 50000), ("9187", 50001)];
    assert_eq!(
        replace_ports("-p 6432 127.0.0.1:6432 16432 64321 :9187/metrics", &ports),
        "-p 50000 127.0.0.1:50000 16432 64321 :50001/metrics"
    );
}

/// Users have the repository and nothing beside it: the README, the code, the scripts and
/// the deployment files never point at the developers' own files outside it.
#[test]
fn nothing_points_outside_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack: Vec<std::path::PathBuf> = [
        "README.md",
        "src",
        "scripts",
        "docker",
        "deploy",
        "rules",
        "tests",
        "benches",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    let needle = ["..", "/shared/"].concat();
    let mut found = Vec::new();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            if text.contains(&needle) {
                found.push(path.display().to_string());
            }
        }
    }
    assert!(
        found.is_empty(),
        "files pointing outside the repository: {found:?}"
    );
}
