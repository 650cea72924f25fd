//! The one task that writes the audit log: sessions send batches of canonical records over
//! a bounded channel (a full channel makes statements wait; records are never dropped),
//! the writer chains them, writes each group of batches with one `write(2)`, and answers
//! every batch once its records are in the file. The task runs on the sessions' runtime:
//! a record costs no thread hop (on a 2-core machine a futex wake each way per statement
//! cost more than the rest of the audit); only `fdatasync` runs on a blocking thread, and
//! batches arriving meanwhile share the next write (group commit).
//!
//! The guarantee (spec section 6): a batch is answered only after `write(2)` returned, so
//! a record is in the operating system's hands before the session releases the statement's
//! result; killing pgveil (even SIGKILL) cannot lose it. What a machine crash can lose
//! depends on the flush policy: `always` calls `fdatasync` before answering, so nothing
//! answered is lost; `interval` syncs at most that long after a write, so at most the
//! last interval is lost. A write cut short leaves at most a torn last line, which the
//! next start truncates (recording a `recovered` event with the torn bytes' length and
//! SHA-256) before continuing the chain.
//!
//! Rotation: once the file reaches `max_bytes` it is renamed to
//! `<stem>.<UTC timestamp>.jsonl` next to it and a new file starts; the new file's first
//! `prev_hash` is the old file's last `hash`, so `audit verify old... current` checks the
//! chain across files.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::record::{chain_hash, hex, line, timestamp, Event, Record, GENESIS};

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
}

/// Canonical records (see `record`) and who to tell once they are written.
pub struct Batch {
    pub records: Vec<Vec<u8>>,
    pub written: Option<oneshot::Sender<bool>>,
}

enum Message {
    Batch(Batch),
    /// Write everything sent before, sync, answer, stop.
    Close(oneshot::Sender<()>),
}

/// The sending side, shared by every session.
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// The writer until [`AuditLog::start`] spawns it.
    writer: std::sync::Mutex<Option<(Writer, mpsc::Receiver<Message>)>>,
    path: String,
}

/// Answered once a batch's records are written (`true`), or could not be (`false`).
pub type Written = oneshot::Receiver<bool>;

impl AuditLog {
    /// Opens (or creates) the log and repairs a torn end; records queue until
    /// [`AuditLog::start`].
    pub fn open(config: WriterConfig) -> Result<AuditLog, AuditError> {
        let (sink, prev, recovered) = Sink::open(&config)?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let mut writer = Writer {
            sink,
            prev,
            flush: config.flush,
            max_bytes: config.max_bytes,
            dirty_since: None,
            syncing: Arc::new(AtomicBool::new(false)),
            buf: Vec::with_capacity(64 * 1024),
            records: 0,
        };
        if let Some(canonical) = recovered {
            writer.write(&[canonical]);
        }
        Ok(AuditLog {
            tx,
            writer: std::sync::Mutex::new(Some((writer, rx))),
            path: config.path,
        })
    }

    /// Spawns the writer task on the current runtime (once; later calls do nothing).
    pub fn start(&self) {
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some((writer, rx)) = writer {
            tokio::spawn(writer.run(rx));
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Queues records, waiting while the queue is full; the answer comes once they are
    /// written.
    pub async fn send(&self, records: Vec<Vec<u8>>) -> Result<Written, AuditError> {
        let (written, rx) = oneshot::channel();
        self.tx
            .send(Message::Batch(Batch {
                records,
                written: Some(written),
            }))
            .await
            .map_err(|_| AuditError::Unavailable)?;
        Ok(rx)
    }

    /// Queues records and waits until they are written.
    pub async fn write(&self, records: Vec<Vec<u8>>) -> Result<(), AuditError> {
        let written = self.send(records).await?;
        match written.await {
            Ok(true) => Ok(()),
            _ => Err(AuditError::Unavailable),
        }
    }

    /// Writes what is queued, syncs and stops the writer; later sends fail.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Message::Close(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    sink: Sink,
    /// `hash` of the last record written.
    prev: String,
    flush: FlushPolicy,
    max_bytes: u64,
    /// Written but not yet synced since then.
    dirty_since: Option<Instant>,
    /// A background sync (interval policy) is running.
    syncing: Arc<AtomicBool>,
    buf: Vec<u8>,
    records: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut pending = Vec::new();
        loop {
            let next = match (self.flush, self.dirty_since) {
                (FlushPolicy::Interval(every), Some(since)) => {
                    let left = every.saturating_sub(since.elapsed());
                    match tokio::time::timeout(left, rx.recv()).await {
                        Ok(m) => m,
                        Err(_) => {
                            self.sync_in_background();
                            continue;
                        }
                    }
                }
                _ => rx.recv().await,
            };
            let Some(first) = next else { break };
            let mut close = None;
            let mut message = Some(first);
            // Group commit: everything already queued goes out in one write.
            while let Some(m) = message {
                match m {
                    Message::Batch(b) => pending.push(b),
                    Message::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
                if pending.len() >= 512 {
                    break;
                }
                message = rx.try_recv().ok();
            }
            self.commit(&mut pending).await;
            if let Some(done) = close {
                self.sync().await;
                tracing::info!(records = self.records, last_hash = %self.prev, "audit log closed");
                let _ = done.send(());
                return;
            }
        }
        self.sync().await;
    }

    /// Writes the batches' records and answers them.
    async fn commit(&mut self, pending: &mut Vec<Batch>) {
        let records: Vec<Vec<u8>> = pending
            .iter_mut()
            .flat_map(|b| std::mem::take(&mut b.records))
            .collect();
        let ok = self.write(&records);
        match self.flush {
            FlushPolicy::Always if ok => self.sync().await,
            FlushPolicy::Interval(every)
                if self.dirty_since.is_some_and(|s| s.elapsed() >= every) =>
            {
                self.sync_in_background()
            }
            _ => {}
        }
        for b in pending.drain(..) {
            if let Some(w) = b.written {
                let _ = w.send(ok);
            }
        }
    }

    /// Chains and writes records; on failure the file is cut back to where it was and
    /// the chain does not advance.
    fn write(&mut self, records: &[Vec<u8>]) -> bool {
        if records.is_empty() {
            return true;
        }
        if self.max_bytes > 0 && self.sink.size() >= self.max_bytes {
            if let Err(e) = self.sink.rotate() {
                tracing::error!("audit log rotation failed, writing on: {e}");
            }
        }
        self.buf.clear();
        let mut prev = self.prev.clone();
        for canonical in records {
            let hash = chain_hash(&prev, canonical);
            line(canonical, &prev, &hash, &mut self.buf);
            prev = hash;
        }
        match self.sink.append(&self.buf) {
            Ok(()) => {
                self.prev = prev;
                self.records += records.len() as u64;
                self.dirty_since.get_or_insert_with(Instant::now);
                true
            }
            Err(e) => {
                tracing::error!("audit log write failed: {e}");
                false
            }
        }
    }

    /// Syncs and waits (on a blocking thread, so sessions keep running meanwhile).
    async fn sync(&mut self) {
        if self.dirty_since.take().is_none() {
            return;
        }
        let Some(file) = self.sink.handle() else {
            return;
        };
        match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("audit log sync failed: {e}"),
            Err(e) => tracing::error!("audit log sync failed: {e}"),
        }
    }

    /// Starts a sync without waiting for it (the interval policy answers before syncing).
    fn sync_in_background(&mut self) {
        if self.syncing.swap(true, Ordering::AcqRel) {
            return; // the running one will be followed by another at the next interval
        }
        self.dirty_since = None;
        let Some(file) = self.sink.handle() else {
            self.syncing.store(false, Ordering::Release);
            return;
        };
        let syncing = self.syncing.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.sync_data() {
                tracing::error!("audit log sync failed: {e}");
            }
            syncing.store(false, Ordering::Release);
        });
    }
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        size: u64,
    },
}

impl Sink {
    /// The sink, the hash to continue from, and a `recovered` record if the file ended
    /// in a torn line.
    fn open(config: &WriterConfig) -> Result<(Sink, String, Option<Vec<u8>>), AuditError> {
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
        Ok((Sink::File { path, file, size }, prev, recovered))
    }

    fn size(&self) -> u64 {
        match self {
            Sink::Stdout => 0,
            Sink::File { size, .. } => *size,
        }
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
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
    fn handle(&self) -> Option<File> {
        match self {
            Sink::Stdout => None,
            Sink::File { file, .. } => file.try_clone().ok(),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let Sink::File { path, file, size } = self else {
            return Ok(());
        };
        file.sync_data()?;
        let rotated = rotated_name(path);
        std::fs::rename(&*path, &rotated)?;
        *file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&*path)?;
        *size = 0;
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        Ok(())
    }
}

/// `audit.jsonl` → `audit.20261123T055731123456Z.jsonl`, unused.
fn rotated_name(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit".into());
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jsonl".into());
    let now = timestamp(time::OffsetDateTime::now_utc()).replace(['-', ':', '.'], "");
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
