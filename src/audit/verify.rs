//! `pgveil audit verify`: recomputes every record's hash and checks each `prev_hash`
//! against the record before it, across the files given in order. It names the first
//! line that fails and why, and a torn last line (an interrupted write) distinctly.

use std::path::{Path, PathBuf};

use super::record::{chain_hash, GENESIS};

/// How a chain checked out.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Intact,
    /// The first line that does not verify.
    Broken {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    /// Every line verifies except the file's last, which was cut short.
    Torn {
        file: PathBuf,
        line: usize,
    },
}

#[derive(Debug)]
pub struct Report {
    pub outcome: Outcome,
    pub records: u64,
    /// `hash` of the last record that verified.
    pub last_hash: String,
    /// Set when the first file continues a chain from an earlier file not given.
    pub continues_from: Option<String>,
}

/// Verifies `files` as one chain, in the order given.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Report> {
    verify_with_progress(files, |_, _| {})
}

/// [`verify`], reading each file as a stream (files of any size, in constant memory) and
/// calling `progress(bytes read, bytes in all files)` every few megabytes and at the end.
pub fn verify_with_progress(
    files: &[PathBuf],
    mut progress: impl FnMut(u64, u64),
) -> std::io::Result<Report> {
    let mut report = Report {
        outcome: Outcome::Intact,
        records: 0,
        last_hash: String::new(),
        continues_from: None,
    };
    let total = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut done = 0u64;
    let mut expected: Option<String> = None;
    for path in files {
        let file = std::fs::File::open(path)?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let outcome = verify_file(path, &mut reader, &mut expected, &mut report, |n| {
            done += n;
            progress(done, total);
        })?;
        if let Some(outcome) = outcome {
            report.outcome = outcome;
            return Ok(report);
        }
    }
    progress(total, total);
    Ok(report)
}

fn verify_file(
    path: &Path,
    reader: &mut impl std::io::BufRead,
    expected: &mut Option<String>,
    report: &mut Report,
    mut read: impl FnMut(u64),
) -> std::io::Result<Option<Outcome>> {
    let broken = |line: usize, reason: String| {
        Ok(Some(Outcome::Broken {
            file: path.to_path_buf(),
            line,
            reason,
        }))
    };
    let mut line = Vec::with_capacity(4096);
    let mut n = 0;
    let mut unreported = 0u64;
    loop {
        line.clear();
        let got = reader.read_until(b'\n', &mut line)?;
        if got == 0 {
            break;
        }
        n += 1;
        unreported += got as u64;
        if unreported >= 8 << 20 {
            read(std::mem::take(&mut unreported));
        }
        // The text after the last newline: a line an interrupted write cut short.
        if line.last() != Some(&b'\n') {
            read(unreported);
            return Ok(Some(Outcome::Torn {
                file: path.to_path_buf(),
                line: n,
            }));
        }
        let (prev, hash) = match check_line(&line[..line.len() - 1]) {
            Ok(v) => v,
            Err(reason) => return broken(n, reason),
        };
        match expected.as_deref() {
            None if prev != GENESIS => report.continues_from = Some(prev.clone()),
            None => {}
            Some(want) if want != prev => {
                let reason = if n == 1 {
                    "prev_hash does not continue the previous file's last record (a file is missing, out of order, or its end was cut)".to_string()
                } else {
                    format!("prev_hash does not match the hash of line {} (a line was removed, inserted or reordered)", n - 1)
                };
                return broken(n, reason);
            }
            Some(_) => {}
        }
        *expected = Some(hash.clone());
        report.last_hash = hash;
        report.records += 1;
    }
    read(unreported);
    Ok(None)
}

/// A line's `prev_hash` and `hash`, once its hash is recomputed and matches.
fn check_line(line: &[u8]) -> Result<(String, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON record ({e})"))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err("not a JSON object".into());
    };
    let mut take = |key: &str| match fields.remove(key) {
        Some(serde_json::Value::String(s))
            if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(s)
        }
        _ => Err(format!("no valid {key}")),
    };
    let hash = take("hash")?;
    let prev = take("prev_hash")?;
    let canonical = serde_json::to_vec(&fields).map_err(|e| e.to_string())?;
    if chain_hash(&prev, &canonical) != hash {
        return Err("hash does not match the record's contents (the line was edited)".into());
    }
    Ok((prev, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{line, Record};

    fn chain(n: usize) -> Vec<Vec<u8>> {
        let mut prev = GENESIS.to_string();
        (0..n)
            .map(|i| {
                let statement = format!("SELECT {i}");
                let r = Record {
                    statement: Some(&statement),
                    session: 1,
                    ..Default::default()
                };
                let c = r.canonical();
                let h = chain_hash(&prev, &c);
                let mut out = Vec::new();
                line(&c, &prev, &h, &mut out);
                prev = h;
                out
            })
            .collect()
    }

    fn check(lines: &[Vec<u8>]) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, lines.concat()).unwrap();
        verify(&[p]).unwrap().outcome
    }

    fn broken_line(o: Outcome) -> usize {
        match o {
            Outcome::Broken { line, .. } => line,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(check(&chain(5)), Outcome::Intact);
    }

    #[test]
    fn progress_counts_every_byte_read_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(6);
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, lines[..3].concat()).unwrap();
        std::fs::write(&b, lines[3..].concat()).unwrap();
        let total = lines.concat().len() as u64;
        let mut seen = Vec::new();
        let r = verify_with_progress(&[a, b], |done, all| seen.push((done, all))).unwrap();
        assert_eq!(r.outcome, Outcome::Intact);
        assert_eq!(r.records, 6);
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
        assert_eq!(seen.last(), Some(&(total, total)));
    }

    #[test]
    fn edits_deletions_reorders_are_named() {
        let mut edited = chain(5);
        edited[2] = String::from_utf8(edited[2].clone())
            .unwrap()
            .replace("SELECT 2", "SELECT 9")
            .into_bytes();
        assert_eq!(broken_line(check(&edited)), 3);
        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(broken_line(check(&deleted)), 2);
        let mut swapped = chain(5);
        swapped.swap(3, 4);
        assert_eq!(broken_line(check(&swapped)), 4);
        let mut first_gone = chain(3);
        first_gone.remove(0);
        // Alone, a file that starts mid-chain verifies, and says so.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, first_gone.concat()).unwrap();
        let r = verify(&[p]).unwrap();
        assert_eq!(r.outcome, Outcome::Intact);
        assert!(r.continues_from.is_some());
    }

    #[test]
    fn torn_last_line_is_distinct() {
        let mut lines = chain(3);
        let last = lines.pop().unwrap();
        lines.push(last[..last.len() / 2].to_vec());
        assert!(matches!(check(&lines), Outcome::Torn { line: 3, .. }));
    }
}
