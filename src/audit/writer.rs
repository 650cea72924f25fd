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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::record::{chain_hash, line};
use super::sink::Sink;

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
            // Let the sessions already runnable add their records first: one write(2)
            // then serves them all, which costs less than the wait.
            tokio::task::yield_now().await;
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
