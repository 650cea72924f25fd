//! What the tests of keyed masks share: the rules (tokenize and hash beside two keyless
//! masks on customers), their key, and COPY helpers.

/// The environment variable the keyed rules name, and a key of the length pgveil asks for.
pub const TEST_KEY_ENV: &str = "PGVEIL_TEST_TOKEN_KEY";
pub const TEST_KEY: &str = "a test token key of thirty-two bytes or more";

/// customers.card_number `tokenize`, email `hash`, phone `partial`, national_id `redact`;
/// crm_admin exempt.
pub const KEYED_RULES: &str = r#"
[[mask]]
column = "customers.card_number"
function = "tokenize"
key_env = "PGVEIL_TEST_TOKEN_KEY"
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.email"
function = "hash"
key_env = "PGVEIL_TEST_TOKEN_KEY"
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.national_id"
function = "redact"
unmasked_for = ["crm_admin"]
"#;

/// Puts the test key where the keyed rules look for it.
pub fn set_test_key() {
    std::env::set_var(TEST_KEY_ENV, TEST_KEY);
}

/// The bytes of a `COPY ... TO STDOUT` over the extended protocol (tokio-postgres).
pub async fn copy_bytes(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<u8>, tokio_postgres::Error> {
    use futures_util::StreamExt;
    let stream = client.copy_out(sql).await?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Every field of a binary COPY, as text (lossy), row by row.
pub fn binary_copy_fields(data: &[u8]) -> Vec<Vec<String>> {
    assert!(data.starts_with(b"PGCOPY\n\xff\r\n\0"), "binary signature");
    let ext = u32::from_be_bytes(data[15..19].try_into().unwrap()) as usize;
    let mut at = 19 + ext;
    let mut rows = Vec::new();
    loop {
        let n = i16::from_be_bytes(data[at..at + 2].try_into().unwrap());
        at += 2;
        if n == -1 {
            assert_eq!(at, data.len(), "nothing after the trailer");
            return rows;
        }
        let mut row = Vec::new();
        for _ in 0..n {
            let len = i32::from_be_bytes(data[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                row.push("NULL".to_string());
            } else {
                row.push(String::from_utf8_lossy(&data[at..at + len as usize]).into_owned());
                at += len as usize;
            }
        }
        rows.push(row);
    }
}
