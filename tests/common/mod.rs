//! Test harness: a throwaway PostgreSQL cluster (initdb as `postgres` when root, SCRAM
//! auth, free ports, the CRM fixture), TLS material, pgveil in-process, and client helpers.
//! A cluster is stopped and its directory removed when it is dropped and, for the shared
//! one, by a watchdog process when the test process exits, whether tests passed or not.
#![allow(dead_code)]

pub mod keyed;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgveil::config::{Config, ServeSettings, UpstreamTls};
use pgveil::proxy::Proxy;
use pgveil::server;
use tokio::sync::oneshot;

pub const SUPERUSER_PASSWORD: &str = "super_pw";

/// Where the PostgreSQL server binaries are, or a panic that says how to install them.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PGVEIL_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(p) = found.pop() {
        return p;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found. Install them with \
         `apt-get install -y postgresql postgresql-contrib` (Debian/Ubuntu) or set PGVEIL_PG_BIN \
         to the directory holding initdb."
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Certificates for tests: a CA and a server certificate for `localhost` and 127.0.0.1.
pub struct TlsFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn tls_files(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgveil test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let files = TlsFiles {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Turn on `ssl` with a generated certificate.
    pub ssl: bool,
    /// Only the superuser: no CRM database and none of the test roles (for a walk-through
    /// that loads the fixture itself).
    pub bare: bool,
}

/// A throwaway PostgreSQL cluster with the CRM fixture in database `crm`.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    pub tls: Option<TlsFiles>,
    bin: PathBuf,
    as_postgres: bool,
}

impl PgCluster {
    pub fn start(opts: ClusterOptions) -> PgCluster {
        let bin = pg_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("pgveil-test-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        let tls = opts.ssl.then(|| tls_files(&dir.join("tls")));
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let cluster = PgCluster {
            port: 0,
            dir,
            tls,
            bin,
            as_postgres,
        };
        run(cluster
            .pg_command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display())));
        cluster.write_config();
        spawn_watchdog(&cluster);
        let mut cluster = cluster;
        cluster.port = cluster.start_server();
        if opts.bare {
            return cluster;
        }
        cluster.create_crm_db("crm");
        cluster.psql_super(
            "postgres",
            "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5_pw' IN ROLE crm_support; \
             CREATE ROLE clear_user LOGIN PASSWORD 'clear_pw'; CREATE ROLE trust_user LOGIN",
        );
        cluster.psql_super(
            "postgres",
            "CREATE ROLE repl_user LOGIN REPLICATION PASSWORD 'repl_pw'; \
             CREATE ROLE tls_only_user LOGIN PASSWORD 'tls_pw'",
        );
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_command(&self, prog: &str) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(prog));
            c
        } else {
            Command::new(self.bin.join(prog))
        }
    }

    fn write_config(&self) {
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1'\nmax_connections = 620\nshared_buffers = 64MB\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             log_min_messages = warning\n",
        );
        conf += &format!("unix_socket_directories = '{}'\n", self.dir.display());
        if let Some(tls) = &self.tls {
            // The server's key must be private to the server's user.
            let key = self.data().join("server.key");
            let cert = self.data().join("server.crt");
            std::fs::copy(&tls.key, &key).unwrap();
            std::fs::copy(&tls.cert, &cert).unwrap();
            run(Command::new("chmod").arg("600").arg(&key));
            if self.as_postgres {
                run(Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&key)
                    .arg(&cert));
            }
            conf += "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n";
        }
        let path = self.data().join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap_or_default();
        existing += &conf;
        std::fs::write(&path, existing).unwrap();
        // alice over the Unix socket gives a password (pgveil's unix: upstream test).
        let hba = "local all alice scram-sha-256\n\
                   local all all trust\n\
                   host all md5_user 127.0.0.1/32 md5\n\
                   host all clear_user 127.0.0.1/32 password\n\
                   host all trust_user 127.0.0.1/32 trust\n\
                   hostnossl all tls_only_user 127.0.0.1/32 reject\n\
                   host replication all 127.0.0.1/32 scram-sha-256\n\
                   host all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(self.data().join("pg_hba.conf"), hba).unwrap();
    }

    /// `pg_ctl start` on `port`; whether the server came up.
    fn pg_ctl_start(&self, port: u16) -> bool {
        self.pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {port}"))
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Starts the server on a free port (retrying if another process takes it first).
    fn start_server(&self) -> u16 {
        for _ in 0..5 {
            let port = free_port();
            if self.pg_ctl_start(port) {
                return port;
            }
        }
        panic!(
            "PostgreSQL did not start; see {}",
            self.dir.join("server.log").display()
        );
    }

    /// Stops the server at once (as a crash would look to clients).
    pub fn kill(&self) {
        let _ = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Starts the server again on its old port.
    pub fn restart(&self) {
        assert!(self.pg_ctl_start(self.port), "restart failed");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs SQL as the superuser through a direct connection; panics on failure.
    pub fn psql_super(&self, db: &str, sql: &str) -> String {
        let out = psql_cmd(&self.addr(), "postgres", SUPERUSER_PASSWORD, db)
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql failed on {sql}: {}",
            stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates database `name` with the CRM fixture (roles are shared by the cluster).
    pub fn create_crm_db(&self, name: &str) {
        self.psql_super("postgres", &format!("CREATE DATABASE {name}"));
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crm.sql");
        let out = self.psql_super_file(name, &fixture);
        assert!(
            out.status.success(),
            "loading the CRM fixture failed: {}",
            stderr(&out)
        );
    }

    fn psql_super_file(&self, db: &str, file: &Path) -> Output {
        psql_cmd(&self.addr(), "postgres", SUPERUSER_PASSWORD, db)
            .arg("-f")
            .arg(file)
            .output()
            .unwrap()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the cluster and removes its directory once this test process has exited.
// The watchdog must outlive this process, so it is deliberately never waited for.
#[allow(clippy::zombie_processes)]
fn spawn_watchdog(cluster: &PgCluster) {
    let stop = if cluster.as_postgres {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            cluster.bin.join("pg_ctl").display(),
            cluster.data().display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            cluster.bin.join("pg_ctl").display(),
            cluster.data().display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = cluster.dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the cluster watchdog");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cluster every test of one test binary shares (with `ssl = on`).
pub fn shared() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        PgCluster::start(ClusterOptions {
            ssl: true,
            ..Default::default()
        })
    })
}

/// A psql command for `addr` ("host:port") with quiet, unaligned output.
pub fn psql_cmd(addr: &str, user: &str, password: &str, db: &str) -> Command {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut c = Command::new("psql");
    c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", host, "-p", port, "-U", user, "-d", db])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::null());
    c
}

/// pgveil running in this process on a free port.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _rules: tempfile::TempDir,
    /// The rules directory of [`TestProxy::with_rules`].
    rules_dir: Option<tempfile::TempDir>,
}

impl TestProxy {
    /// Starts pgveil in front of `cluster` with `rules` (as `rules.toml` in a directory of
    /// their own).
    pub async fn with_rules(cluster: &PgCluster, rules: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
        let path = dir.path().to_path_buf();
        let mut p = TestProxy::start(cluster, move |s| s.rules = Some(path)).await;
        p.rules_dir = Some(dir);
        p
    }

    /// Starts pgveil in front of `cluster`, with empty rules unless `tweak` says otherwise.
    pub async fn start(cluster: &PgCluster, tweak: impl FnOnce(&mut ServeSettings)) -> TestProxy {
        TestProxy::start_upstream(&cluster.addr(), tweak).await
    }

    pub async fn start_upstream(
        upstream: &str,
        tweak: impl FnOnce(&mut ServeSettings),
    ) -> TestProxy {
        let rules = tempfile::tempdir().unwrap();
        // No guard: these tests are about the relay; guard tests write their own rules.
        std::fs::write(
            rules.path().join("relay.toml"),
            "[settings]\nprotected = []\n",
        )
        .unwrap();
        let mut settings = ServeSettings {
            upstream: Some(upstream.to_string()),
            rules: Some(rules.path().to_path_buf()),
            audit_log: Some(rules.path().join("audit.jsonl").display().to_string()),
            upstream_tls: Some(UpstreamTls::Prefer),
            ..Default::default()
        };
        tweak(&mut settings);
        let config = Config::from_settings(settings).unwrap();
        let proxy = Arc::new(Proxy::new(config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, proxy.clone(), async {
            let _ = stopped.await;
        }));
        TestProxy {
            addr,
            proxy,
            stop: Some(stop),
            task: Some(task),
            _rules: rules,
            rules_dir: None,
        }
    }

    /// The audit log this proxy writes (in its scratch directory unless a test set one).
    pub fn audit_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(&self.proxy.config.audit_log)
    }

    /// The audit records written so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
            .collect()
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn conn_str(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password='{password}' dbname={db} connect_timeout=10",
            self.addr.port()
        )
    }

    /// A tokio-postgres client through pgveil.
    pub async fn connect(&self, user: &str, password: &str) -> tokio_postgres::Client {
        connect(&self.conn_str(user, password, "crm")).await
    }

    /// Stops accepting and waits for the accept loop to finish its shutdown.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Connects with tokio-postgres and drives the connection on a task.
pub async fn connect(conn_str: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conn_str}: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Runs a command to completion without blocking the runtime.
pub async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// A raw protocol client: startup as a `trust` user (no password), then ready for queries.
pub async fn raw_session(addr: &str, user: &str, db: &str) -> tokio::net::TcpStream {
    raw_session_with(addr, &[("user", user), ("database", db)]).await
}

/// A raw protocol client with the given startup parameters.
pub async fn raw_session_with(addr: &str, params: &[(&str, &str)]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let startup = pgveil::protocol::startup::StartupMessage::new(params);
    s.write_all(startup.raw()).await.unwrap();
    loop {
        let (tag, body) = read_message(&mut s).await.expect("startup reply");
        match tag {
            b'Z' => return s,
            b'E' => panic!("startup failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

/// Reads one typed message; `None` at end of stream.
pub async fn read_message(s: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let tag = s.read_u8().await.ok()?;
    let len = s.read_i32().await.ok()?;
    let mut body = vec![0u8; (len - 4) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some((tag, body))
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
pub fn sqlstate_of(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

/// Reads until an ErrorResponse or the end of the stream; returns the error's body.
pub async fn expect_error(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some((tag, body)) = read_message(s).await {
            if tag == b'E' {
                return Some(body);
            }
        }
        None
    })
    .await
    .expect("an error or a close must come promptly")
}

/// Whether the server has closed the stream (within a few seconds).
pub async fn is_closed(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Runs the pgveil binary under test (from the repository root, where `rules/` is).
pub fn pgveil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// A command's stdout followed by its stderr.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

/// The rows of a simple query, each field followed by `|` (NULL as `NULL`), a line per row.
pub async fn simple_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let msgs = client.simple_query(sql).await?;
    let mut out = String::new();
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            for i in 0..r.len() {
                out.push_str(r.get(i).unwrap_or("NULL"));
                out.push('|');
            }
            out.push('\n');
        }
    }
    Ok(out)
}
