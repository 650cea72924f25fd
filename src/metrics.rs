//! Prometheus metrics (spec section 7): counters updated by sessions with relaxed atomics,
//! rendered in the text exposition format at `GET /metrics` on `--metrics ADDR`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the statement duration histogram.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    statements: DashMap<(&'static str, &'static str), AtomicU64>,
    rows_masked: AtomicU64,
    duration_buckets: [AtomicU64; BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    refusals: DashMap<String, AtomicU64>,
    alerts: DashMap<(String, &'static str), AtomicU64>,
    auth_failures: AtomicU64,
    connections_refused: DashMap<&'static str, AtomicU64>,
    connections_total: AtomicU64,
    audit_records: AtomicU64,
    /// The last reload failed (the rules or TLS material in force are older than the files).
    reload_failed: std::sync::atomic::AtomicBool,
}

fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K, by: u64) {
    if let Some(c) = map.get(&key) {
        c.fetch_add(by, Ordering::Relaxed);
        return;
    }
    map.entry(key).or_default().fetch_add(by, Ordering::Relaxed);
}

impl Metrics {
    /// One statement finished (or was refused).
    pub fn statement(&self, kind: &'static str, decision: &'static str, duration: Duration) {
        bump(&self.statements, (kind, decision), 1);
        let secs = duration.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.duration_buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    /// A reload (rules, or rules and TLS files) succeeded (`true`) or was refused, keeping
    /// the old.
    pub fn config_reloaded(&self, ok: bool) {
        self.reload_failed.store(!ok, Ordering::Relaxed);
    }

    pub fn rows_masked(&self, rows: u64) {
        self.rows_masked.fetch_add(rows, Ordering::Relaxed);
    }

    /// A refusal; `rule` is `file:line`, or what refused when no rule line did.
    pub fn refusal(&self, rule: &str) {
        bump(&self.refusals, rule.to_string(), 1);
    }

    pub fn alert(&self, rule: &str, action: &'static str) {
        bump(&self.alerts, (rule.to_string(), action), 1);
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_refused(&self, reason: &'static str) {
        bump(&self.connections_refused, reason, 1);
    }

    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn audit_records(&self, n: u64) {
        self.audit_records.fetch_add(n, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self, active_connections: usize) -> String {
        let mut o = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let single = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            header(o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        };
        header(
            &mut o,
            "pgveil_build_info",
            "gauge",
            "Always 1; the version of this pgveil as a label.",
        );
        let _ = writeln!(
            o,
            "pgveil_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        single(
            &mut o,
            "pgveil_config_last_reload_successful",
            "gauge",
            "1 when the last reload (or the start) loaded the rules and TLS files, 0 when it was refused and older ones stay in force.",
            u64::from(!self.reload_failed.load(Ordering::Relaxed)),
        );
        single(
            &mut o,
            "pgveil_connections_active",
            "gauge",
            "Client sessions past authentication.",
            active_connections as u64,
        );
        single(
            &mut o,
            "pgveil_connections_total",
            "counter",
            "Client sessions past authentication since start.",
            load(&self.connections_total),
        );
        header(
            &mut o,
            "pgveil_statements_total",
            "counter",
            "Statements by kind and decision.",
        );
        for ((kind, decision), n) in sorted(&self.statements) {
            let _ = writeln!(
                o,
                "pgveil_statements_total{{kind=\"{kind}\",decision=\"{decision}\"}} {n}"
            );
        }
        single(
            &mut o,
            "pgveil_rows_masked_total",
            "counter",
            "Rows returned by statements whose results were masked.",
            load(&self.rows_masked),
        );
        header(
            &mut o,
            "pgveil_statement_duration_seconds",
            "histogram",
            "Time from a statement's arrival to its completion.",
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += load(&self.duration_buckets[i]);
            let _ = writeln!(
                o,
                "pgveil_statement_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.duration_count);
        let _ = writeln!(
            o,
            "pgveil_statement_duration_seconds_bucket{{le=\"+Inf\"}} {count}\npgveil_statement_duration_seconds_sum {}\npgveil_statement_duration_seconds_count {count}",
            load(&self.duration_sum_us) as f64 / 1e6
        );
        header(
            &mut o,
            "pgveil_refusals_total",
            "counter",
            "Statements refused, by the rule (file:line) behind the refusal.",
        );
        for (rule, n) in sorted(&self.refusals) {
            let _ = writeln!(o, "pgveil_refusals_total{{rule=\"{}\"}} {n}", escape(&rule));
        }
        header(
            &mut o,
            "pgveil_alerts_total",
            "counter",
            "Alert thresholds crossed, by rule and action.",
        );
        for ((rule, action), n) in sorted(&self.alerts) {
            let _ = writeln!(
                o,
                "pgveil_alerts_total{{rule=\"{}\",action=\"{action}\"}} {n}",
                escape(&rule)
            );
        }
        single(
            &mut o,
            "pgveil_auth_failures_total",
            "counter",
            "Failed authentications.",
            load(&self.auth_failures),
        );
        header(
            &mut o,
            "pgveil_connections_refused_total",
            "counter",
            "Connections refused before authentication, by reason.",
        );
        for (reason, n) in sorted(&self.connections_refused) {
            let _ = writeln!(
                o,
                "pgveil_connections_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        single(
            &mut o,
            "pgveil_audit_records_total",
            "counter",
            "Audit records handed to the writer.",
            load(&self.audit_records),
        );
        o
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A labelled family's samples in a stable order.
fn sorted<K: Clone + Ord + std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>) -> Vec<(K, u64)> {
    let mut rows: Vec<(K, u64)> = map
        .iter()
        .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
        .collect();
    rows.sort();
    rows
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` until the listener task is dropped. Each connection gets one
/// response and is closed; requests are read with a size and time bound.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if request.starts_with("GET ")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                ("200 OK", render())
            } else {
                ("404 Not Found", "see /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters_and_histogram() {
        let m = Metrics::default();
        m.statement("select", "masked", Duration::from_micros(300));
        m.statement("select", "masked", Duration::from_secs(10));
        m.refusal("rules/crm.toml:12");
        let text = m.render(3);
        assert!(text.contains("pgveil_connections_active 3\n"));
        assert!(text.contains("pgveil_statements_total{kind=\"select\",decision=\"masked\"} 2\n"));
        assert!(text.contains("pgveil_statement_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("pgveil_statement_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("pgveil_refusals_total{rule=\"rules/crm.toml:12\"} 1\n"));
    }
}
