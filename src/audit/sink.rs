//! Where audit lines go: a file (opened for append, its torn end repaired, rotated by
//! size) or standard output.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::record::{hex, timestamp, Event, Record, GENESIS};

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit log {path}: its last complete line is not an audit record; move the file aside to start a new chain")]
    NotALog { path: String },
    #[error("the audit log cannot be written; statements are held back until it can")]
    Unavailable,
}

/// When written records are forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// `fdatasync` before any batch is answered.
    Always,
    /// `fdatasync` at most this long after a write.
    Interval(Duration),
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// A file path, or `-` for standard output.
    pub path: String,
    pub flush: FlushPolicy,
    /// Rotate past this size; 0 never rotates.
    pub max_bytes: u64,
    /// Batches the channel holds before senders wait.
    pub queue: usize,
    /// Which rotated files are kept.
    pub retention: Retention,
}

/// Which rotated audit files are kept: pruned after each rotation and when the log opens.
/// The live file is never removed, and `audit verify` reads a chain whose first files are
/// gone (it reports the hash the remaining files continue from).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// At most this many rotated files (the newest); `None` keeps every one.
    pub files: Option<usize>,
    /// Rotated files younger than this (by the time in their names); `None`: any age.
    pub max_age: Option<std::time::Duration>,
}

impl Retention {
    fn prunes(&self) -> bool {
        self.files.is_some() || self.max_age.is_some()
    }
}

pub(super) enum Sink {
    Stdout,
    File {
        path: PathBuf,
        retention: Retention,
        file: File,
        size: u64,
    },
}

impl Sink {
    /// The sink, the hash to continue from, and a `recovered` record if the file ended
    /// in a torn line.
    pub(super) fn open(
        config: &WriterConfig,
    ) -> Result<(Sink, String, Option<Vec<u8>>), AuditError> {
        if config.path == "-" {
            return Ok((Sink::Stdout, GENESIS.to_string(), None));
        }
        let path = PathBuf::from(&config.path);
        let io = |source| AuditError::Io {
            path: config.path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let (last_line, torn) = tail(&mut file).map_err(io)?;
        let mut recovered = None;
        if !torn.is_empty() {
            let keep = file.metadata().map_err(io)?.len() - torn.len() as u64;
            file.set_len(keep).map_err(io)?;
            let message =
                format!(
                "a torn last line ({} bytes, sha256 {}) left by an interrupted write was removed",
                torn.len(),
                hex(&sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&torn)))
            );
            tracing::warn!(path = %config.path, "{message}");
            let record = Record {
                event: Some(Event::Recovered),
                message: Some(&message),
                ts: timestamp(time::OffsetDateTime::now_utc()),
                ..Default::default()
            };
            recovered = Some(record.canonical());
        }
        let prev = match last_line {
            None => GENESIS.to_string(),
            Some(l) => last_hash(&l).ok_or_else(|| AuditError::NotALog {
                path: config.path.clone(),
            })?,
        };
        let size = file.metadata().map_err(io)?.len();
        let retention = config.retention;
        prune(&path, retention);
        Ok((
            Sink::File {
                path,
                retention,
                file,
                size,
            },
            prev,
            recovered,
        ))
    }

    pub(super) fn size(&self) -> u64 {
        match self {
            Sink::Stdout => 0,
            Sink::File { size, .. } => *size,
        }
    }

    pub(super) fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File { file, size, .. } => match file.write_all(bytes) {
                Ok(()) => {
                    *size += bytes.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    // Leave no partial line for the next write to follow.
                    let _ = file.set_len(*size);
                    Err(e)
                }
            },
        }
    }

    /// A second handle on the file, for syncing off the writer task.
    pub(super) fn handle(&self) -> Option<File> {
        match self {
            Sink::Stdout => None,
            Sink::File { file, .. } => file.try_clone().ok(),
        }
    }

    pub(super) fn rotate(&mut self) -> std::io::Result<()> {
        let Sink::File {
            path,
            retention,
            file,
            size,
        } = self
        else {
            return Ok(());
        };
        let rotated = rotated_name(path);
        std::fs::rename(&*path, &rotated)?;
        let new = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&*path)?;
        let old = std::mem::replace(file, new);
        *size = 0;
        // The full file is synced off the writing path: an inline fdatasync of 100 MiB
        // held every session's statement back for its whole duration. (Under `always`
        // everything in it is synced already; under `interval` this is the sync the
        // interval would have done.)
        let _ = std::thread::Builder::new()
            .name("pgveil-audit-sync".into())
            .spawn(move || {
                if let Err(e) = old.sync_data() {
                    tracing::error!("syncing the rotated audit log failed: {e}");
                }
            });
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        prune(path, *retention);
        Ok(())
    }
}

/// Removes the rotated files of the log at `path` that `retention` does not keep.
fn prune(path: &Path, retention: Retention) {
    if !retention.prunes() {
        return;
    }
    let mut rotated = rotated_files(path);
    rotated.sort();
    // An age past the calendar's range keeps everything.
    let cutoff = retention
        .max_age
        .and_then(|age| time::Duration::try_from(age).ok())
        .and_then(|age| time::OffsetDateTime::now_utc().checked_sub(age))
        .map(compact_timestamp);
    let over = retention
        .files
        .map_or(0, |keep| rotated.len().saturating_sub(keep));
    for (i, (stamp, file)) in rotated.iter().enumerate() {
        let too_old = cutoff.as_ref().is_some_and(|c| &stamp.0 < c);
        if i < over || too_old {
            match std::fs::remove_file(file) {
                Ok(()) => {
                    tracing::info!(removed = %file.display(), "rotated audit file removed (retention)")
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), "could not remove a rotated audit file: {e}")
                }
            }
        }
    }
}

/// The rotated files of the log at `path` (`audit.20261123T055731123456Z.jsonl`, with
/// `-N` before the extension when several rotated within one microsecond), each with its
/// name's time (and `-N`), which sort oldest first.
fn rotated_files(path: &Path) -> Vec<((String, u32), PathBuf)> {
    let (stem, ext) = stem_and_ext(path);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let prefix = format!("{stem}.");
    let suffix = format!(".{ext}");
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let middle = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            let (stamp, n) = match middle.split_once('-') {
                Some((stamp, n)) => (stamp, n.parse().ok()?),
                None => (middle, 0),
            };
            let b = stamp.as_bytes();
            let shaped = b.len() == 22
                && b[8] == b'T'
                && b[21] == b'Z'
                && b[..8].iter().chain(&b[9..21]).all(u8::is_ascii_digit);
            shaped.then(|| ((stamp.to_string(), n), e.path()))
        })
        .collect()
}

fn stem_and_ext(path: &Path) -> (String, String) {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit".into());
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jsonl".into());
    (stem, ext)
}

/// A rotated file's time as its name writes it: `20261123T055731123456Z`.
fn compact_timestamp(at: time::OffsetDateTime) -> String {
    timestamp(at).replace(['-', ':', '.'], "")
}

/// `audit.jsonl` → `audit.20261123T055731123456Z.jsonl`, unused.
fn rotated_name(path: &Path) -> PathBuf {
    let (stem, ext) = stem_and_ext(path);
    let now = compact_timestamp(time::OffsetDateTime::now_utc());
    let mut n = 0;
    loop {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let candidate = path.with_file_name(format!("{stem}.{now}{suffix}.{ext}"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

/// The last complete line of a file and whatever follows it (a torn line, normally
/// empty). Reads backwards from the end, in growing chunks.
fn tail(file: &mut File) -> std::io::Result<(Option<Vec<u8>>, Vec<u8>)> {
    let len = file.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity((len - start) as usize);
        file.read_to_end(&mut bytes)?;
        let last_nl = bytes.iter().rposition(|&b| b == b'\n');
        let torn = match last_nl {
            Some(i) => bytes[i + 1..].to_vec(),
            None if start == 0 => return Ok((None, bytes)),
            None => {
                window *= 4;
                continue;
            }
        };
        let end = last_nl.expect("matched above");
        match bytes[..end].iter().rposition(|&b| b == b'\n') {
            Some(i) => return Ok((Some(bytes[i + 1..end].to_vec()), torn)),
            None if start == 0 => return Ok((Some(bytes[..end].to_vec()), torn)),
            None => window *= 4,
        }
    }
}

fn last_hash(line: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let h = v.get("hash")?.as_str()?;
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_by_count_and_age_and_never_panics_on_huge_ages() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let names = [
            "audit.20200101T000000000000Z.jsonl",
            "audit.20200101T000000000000Z-1.jsonl",
            "audit.29990101T000000000000Z.jsonl",
            "audit.notes.jsonl",
            "other.20200101T000000000000Z.jsonl",
            "audit.jsonl",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        let exists = |n: &str| dir.path().join(n).exists();
        // An age past the calendar keeps everything.
        prune(
            &log,
            Retention {
                files: None,
                max_age: Some(std::time::Duration::from_secs(u64::MAX)),
            },
        );
        assert!(names.iter().all(|n| exists(n)));
        // By count: the newest rotated file stays.
        prune(
            &log,
            Retention {
                files: Some(1),
                max_age: None,
            },
        );
        assert!(!exists(names[0]) && !exists(names[1]) && exists(names[2]));
        assert!(exists("audit.notes.jsonl") && exists("other.20200101T000000000000Z.jsonl"));
        assert!(exists("audit.jsonl"));
    }
}
