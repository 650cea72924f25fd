//! Client encodings other than UTF-8 work through pgveil as they do directly. The server
//! converts a statement from the session's client_encoding; pgveil forwards the client's
//! bytes untouched, reads (judges, audits) the text converted as the server converts it,
//! and records it in the audit log as UTF-8, saying which encoding it was converted from.
//! Raw protocol clients in LATIN9, WIN1251, SJIS, BIG5 and GB18030 (simple and extended,
//! unmasked and masked sessions), psql with PGCLIENTENCODING, and psycopg 3.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use common::{raw_session_with, read_message, shared, PgCluster, TestProxy};
use tokio::io::AsyncWriteExt;

const RULES: &str = r#"
[settings]
protected = ["delete", "truncate", "drop"]

[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]
"#;

/// Each encoding with text in its script, chosen with characters whose second byte is a
/// backslash (0x5C) where the encoding has such (SJIS ソ表, BIG5 許功蓋).
const SAMPLES: [(&str, &str); 5] = [
    ("LATIN9", "café €uro"),
    ("WIN1251", "Привет, мир"),
    ("SJIS", "ソフト表示"),
    ("BIG5", "許功蓋"),
    ("GB18030", "中文\u{20000}"),
];

fn cluster() -> &'static PgCluster {
    static SETUP: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let pg = shared();
    SETUP.get_or_init(|| {
        pg.psql_super("crm", "GRANT crm_base TO trust_user");
    });
    pg
}

/// pgveil with these rules, or with the relay's own (no masks, no guard).
async fn proxy(rules: Option<&str>) -> TestProxy {
    match rules {
        Some(rules) => TestProxy::with_rules(cluster(), rules).await,
        None => TestProxy::start(cluster(), |_| {}).await,
    }
}

fn encode(encoding: &str, text: &str) -> Vec<u8> {
    let label = match encoding {
        "LATIN9" => "iso-8859-15",
        "WIN1251" => "windows-1251",
        "SJIS" => "shift_jis",
        "BIG5" => "big5",
        "GB18030" => "gb18030",
        other => panic!("{other}"),
    };
    let (bytes, _, errors) = encoding_rs::Encoding::for_label(label.as_bytes())
        .unwrap()
        .encode(text);
    assert!(!errors, "{text} in {encoding}");
    bytes.into_owned()
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.push(0);
    out
}

/// The rows (each column's bytes) of everything up to ReadyForQuery; panics on an
/// ErrorResponse or a closed connection.
async fn rows_until_ready(s: &mut tokio::net::TcpStream, what: &str) -> Vec<Vec<Vec<u8>>> {
    let mut rows = Vec::new();
    loop {
        let (tag, body) = tokio::time::timeout(Duration::from_secs(15), read_message(s))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap_or_else(|| panic!("{what}: the connection was closed"));
        match tag {
            b'D' => {
                let n = i16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2;
                let mut row = Vec::new();
                for _ in 0..n {
                    let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
                    at += 4;
                    if len < 0 {
                        row.push(b"NULL".to_vec());
                    } else {
                        row.push(body[at..at + len as usize].to_vec());
                        at += len as usize;
                    }
                }
                rows.push(row);
            }
            b'E' => panic!("{what}: {}", String::from_utf8_lossy(&body)),
            b'Z' => return rows,
            _ => {}
        }
    }
}

/// A statement in `encoding` over the simple and the extended protocol, as `user`: the
/// server's answer comes back in the same encoding, and the session goes on.
async fn round_trips(p: &TestProxy, user: &str, masked: bool) {
    for (encoding, text) in SAMPLES {
        let mut s = raw_session_with(
            &p.addr_string(),
            &[
                ("user", user),
                ("database", "crm"),
                ("client_encoding", encoding),
            ],
        )
        .await;
        let bytes = encode(encoding, text);
        let mut sql = b"SELECT '".to_vec();
        sql.extend_from_slice(&bytes);
        sql.extend_from_slice(b"' AS t, phone FROM customers WHERE id = 1");
        // Simple protocol; extended: a statement and a portal named in the encoding,
        // described, bound, run and closed.
        let simple = frame(b'Q', &cstr(&sql));
        let statement = [b"s_".as_slice(), &bytes].concat();
        let portal = [b"p_".as_slice(), &bytes].concat();
        let mut extended = frame(b'P', &[cstr(&statement), cstr(&sql), vec![0, 0]].concat());
        extended.extend(frame(
            b'B',
            &[cstr(&portal), cstr(&statement), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        extended.extend(frame(b'D', &[vec![b'P'], cstr(&portal)].concat()));
        extended.extend(frame(b'E', &[cstr(&portal), vec![0, 0, 0, 0]].concat()));
        extended.extend(frame(b'C', &[vec![b'P'], cstr(&portal)].concat()));
        extended.extend(frame(b'C', &[vec![b'S'], cstr(&statement)].concat()));
        extended.extend(frame(b'S', &[]));
        for (protocol, batch) in [("simple", simple), ("extended", extended)] {
            s.write_all(&batch).await.unwrap();
            let rows = rows_until_ready(&mut s, &format!("{encoding} {protocol}")).await;
            assert_eq!(rows.len(), 1, "{encoding} {protocol}");
            assert_eq!(
                rows[0][0], bytes,
                "{encoding} {protocol}: the literal came back changed"
            );
            let phone = String::from_utf8_lossy(&rows[0][1]).to_string();
            assert_eq!(
                phone.contains("****"),
                masked,
                "{encoding} {protocol}: {phone}"
            );
        }
        s.write_all(&frame(b'X', &[])).await.unwrap();
    }
}

/// Records of statements whose text holds `needle`.
fn records_with(p: &TestProxy, needle: &str) -> Vec<serde_json::Value> {
    p.audit_records()
        .into_iter()
        .filter(|r| r["statement"].as_str().is_some_and(|s| s.contains(needle)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_sessions_pass_every_encoding_through() {
    let p = proxy(None).await;
    round_trips(&p, "trust_user", false).await;
    // The audit log holds each statement as UTF-8 and says what it was converted from.
    for (encoding, text) in SAMPLES {
        let records = records_with(&p, text);
        assert!(records.len() >= 2, "{encoding}: {records:?}");
        for r in records {
            assert_eq!(r["converted_from"], encoding, "{r}");
        }
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_sessions_read_every_encoding_as_the_server_does() {
    let p = proxy(Some(RULES)).await;
    round_trips(&p, "trust_user", true).await;
    for (encoding, text) in SAMPLES {
        let records = records_with(&p, text);
        assert!(records.len() >= 2, "{encoding}: {records:?}");
        assert!(
            records.iter().all(|r| r["decision"] == "masked"),
            "{encoding}: {records:?}"
        );
    }
    p.shutdown().await;
}

/// Bytes that are not text in the session's encoding are the server's to refuse: the
/// client gets the server's error and the session goes on; the audit says the text could
/// not be converted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_text_get_the_servers_error_not_a_fatal_one() {
    let p = proxy(None).await;
    let mut s = raw_session_with(
        &p.addr_string(),
        &[("user", "trust_user"), ("database", "crm")],
    )
    .await;
    s.write_all(&frame(b'Q', &cstr(b"SELECT 'caf\xe9'")))
        .await
        .unwrap();
    let err = common::expect_error(&mut s)
        .await
        .expect("the server's error");
    assert_eq!(
        common::sqlstate_of(&err),
        "22021",
        "{}",
        String::from_utf8_lossy(&err)
    );
    // ReadyForQuery, then the session works.
    while let Some((tag, _)) = read_message(&mut s).await {
        if tag == b'Z' {
            break;
        }
    }
    s.write_all(&frame(b'Q', &cstr(b"SELECT 1"))).await.unwrap();
    assert_eq!(rows_until_ready(&mut s, "after").await.len(), 1);
    let records = records_with(&p, "SELECT 'caf");
    assert!(
        records.iter().any(|r| r["converted_from"]
            .as_str()
            .is_some_and(|c| c.contains("U+FFFD"))),
        "{records:?}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_pgclientencoding() {
    let p = proxy(Some(RULES)).await;
    for (user, password, masked) in [
        ("crm_admin", "admin_pw", false),
        ("alice", "alice_pw", true),
    ] {
        let mut sql = b"SELECT '".to_vec();
        sql.extend_from_slice(&encode("LATIN9", "café €uro"));
        sql.extend_from_slice(b"' AS t, phone FROM customers WHERE id = 1");
        let out = common::psql_cmd(&p.addr_string(), user, password, "crm")
            .env("PGCLIENTENCODING", "LATIN9")
            .arg("-c")
            .arg(std::ffi::OsStr::from_bytes(&sql))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
        let expected = encode("LATIN9", "café €uro");
        assert!(
            out.stdout.windows(expected.len()).any(|w| w == expected),
            "{:?}",
            out.stdout
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).contains("****"),
            masked,
            "{user}"
        );
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_in_latin9_and_win1251() {
    // The first Python that has psycopg 3 (the system's, where a version manager's
    // shim comes first on PATH).
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|py| {
            std::process::Command::new(py)
                .args(["-c", "import psycopg"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("psycopg 3 is missing: run scripts/install-deps.sh");
    let p = proxy(Some(RULES)).await;
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], client_encoding=sys.argv[2])
text = sys.argv[3]
row = conn.execute("SELECT '" + text + "', %s::text, phone FROM customers WHERE id = 1", [text]).fetchone()
assert row[0] == text and row[1] == text, row
print("phone", row[2])
cur = conn.cursor()
cur.execute("SELECT '" + text + "' AS t", prepare=True)
assert cur.fetchone()[0] == text
print("ok")
"#;
    for (encoding, text) in [("LATIN9", "café €uro"), ("WIN1251", "Привет")] {
        for (user, password, masked) in [
            ("crm_admin", "admin_pw", false),
            ("alice", "alice_pw", true),
        ] {
            let out = std::process::Command::new(python)
                .args([
                    "-c",
                    script,
                    &p.conn_str(user, password, "crm"),
                    encoding,
                    text,
                ])
                .output()
                .unwrap();
            let stdout = common::stdout(&out);
            assert!(
                out.status.success() && stdout.contains("ok"),
                "{encoding} {user}: {stdout}{}",
                common::stderr(&out)
            );
            assert_eq!(
                stdout.contains("****"),
                masked,
                "{encoding} {user}: {stdout}"
            );
        }
    }
    p.shutdown().await;
}

/// An application_name in the startup's client_encoding is recorded converted to UTF-8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_names_are_recorded_as_utf8() {
    let p = proxy(None).await;
    let name = encode("LATIN9", "café €uro");
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [
        (&b"user"[..], &b"trust_user"[..]),
        (b"database", b"crm"),
        (b"client_encoding", b"LATIN9"),
        (b"application_name", &name),
    ] {
        body.extend_from_slice(&cstr(k));
        body.extend_from_slice(&cstr(v));
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    let mut s = tokio::net::TcpStream::connect(p.addr_string())
        .await
        .unwrap();
    s.write_all(&startup).await.unwrap();
    rows_until_ready(&mut s, "startup").await;
    s.write_all(&frame(b'Q', &cstr(b"SELECT 1"))).await.unwrap();
    rows_until_ready(&mut s, "query").await;
    s.write_all(&frame(b'X', &[])).await.unwrap();
    let records = records_with(&p, "SELECT 1");
    assert!(
        records.iter().any(|r| r["application_name"] == "café €uro"),
        "{records:?}"
    );
    p.shutdown().await;
}
