//! The mask functions of spec section 2, applied to one wire value in text or binary
//! format. Every output is a valid value of the column's type (or NULL); NULL input stays
//! NULL and is never passed here. Keys for `hash` and `tokenize` come from the environment.

use std::io::Write;

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;

use super::pgtypes::{self, TypeClass, USECS_PER_DAY};
use crate::config::rules::{MaskFunction, TruncUnit};

#[derive(Debug, Error, PartialEq)]
pub enum MaskError {
    #[error("environment variable {0} (the mask key) is not set")]
    MissingKey(String),
    #[error("environment variable {env} (the mask key) holds {len} bytes; a key must hold at least {MIN_KEY_BYTES} (random bytes, e.g. `openssl rand -base64 32`)")]
    ShortKey { env: String, len: usize },
    #[error("mask {function} cannot apply to a column of type {type_name}")]
    TypeMismatch { function: String, type_name: String },
    #[error("constant {value:?} is not a valid {type_name}")]
    BadConstant { value: String, type_name: String },
    #[error("not a pgveil token")]
    BadToken,
}

const TOKEN_PREFIX: &str = "tok_";
const REDACTED: &str = "****";

/// A mask ready to run: keys loaded, constants pre-encoded for the column's type.
#[derive(Clone)]
pub enum Masker {
    Redact(Vec<u8>),
    Partial {
        keep_first: usize,
        keep_last: usize,
    },
    Email,
    /// HMAC-SHA-256 with its key already absorbed: each value clones it.
    Hash(Box<Hmac<Sha256>>),
    Tokenize(Box<Tokenizer>),
    Null,
    Constant {
        text: Vec<u8>,
        binary: Option<Vec<u8>>,
    },
    DateTrunc(TruncUnit),
    /// The step, and its number of decimals (the output's scale), computed once.
    Round {
        step: f64,
        decimals: usize,
    },
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        let name = match self {
            Masker::Redact(_) => "redact",
            Masker::Partial { .. } => "partial",
            Masker::Email => "email",
            Masker::Hash(_) => "hash",
            Masker::Tokenize(_) => "tokenize",
            Masker::Null => "null",
            Masker::Constant { .. } => "constant",
            Masker::DateTrunc(_) => "date_trunc",
            Masker::Round { .. } => "round",
        };
        write!(f, "Masker({name})")
    }
}

/// The name of a mask function, as written in rules.
pub fn function_name(f: &MaskFunction) -> &'static str {
    match f {
        MaskFunction::Redact { .. } => "redact",
        MaskFunction::Partial { .. } => "partial",
        MaskFunction::Email => "email",
        MaskFunction::Hash { .. } => "hash",
        MaskFunction::Tokenize { .. } => "tokenize",
        MaskFunction::Null => "null",
        MaskFunction::Constant { .. } => "constant",
        MaskFunction::DateTrunc { .. } => "date_trunc",
        MaskFunction::Round { .. } => "round",
        MaskFunction::Deny => "deny",
    }
}

/// Whether `f` can mask a column of class `class` (what `check` enforces).
pub fn fits(f: &MaskFunction, class: TypeClass, type_name: &str) -> Result<(), MaskError> {
    let ok = match f {
        MaskFunction::Redact { .. } | MaskFunction::Null | MaskFunction::Deny => true,
        MaskFunction::Partial { .. }
        | MaskFunction::Email
        | MaskFunction::Hash { .. }
        | MaskFunction::Tokenize { .. } => class.is_text(),
        MaskFunction::DateTrunc { .. } => class.is_temporal(),
        MaskFunction::Round { .. } => class.is_number(),
        MaskFunction::Constant { value } => {
            return encode_constant(value, class, type_name).map(|_| ())
        }
    };
    if ok {
        Ok(())
    } else {
        Err(MaskError::TypeMismatch {
            function: function_name(f).into(),
            type_name: type_name.into(),
        })
    }
}

/// The fewest bytes a keyed mask's secret may hold.
pub const MIN_KEY_BYTES: usize = 32;

/// The key bytes named by `key_env`: at least [`MIN_KEY_BYTES`] of them.
pub fn key_from_env(key_env: &str) -> Result<Vec<u8>, MaskError> {
    match std::env::var(key_env) {
        Ok(v) if v.len() >= MIN_KEY_BYTES => Ok(v.into_bytes()),
        Ok(v) if !v.is_empty() => Err(MaskError::ShortKey {
            env: key_env.into(),
            len: v.len(),
        }),
        _ => Err(MaskError::MissingKey(key_env.into())),
    }
}

/// HKDF-SHA-256 (RFC 5869): `out.len()` bytes of key for one use (`info`), from `secret`.
fn hkdf(salt: &[u8], secret: &[u8], info: &[u8], out: &mut [u8]) {
    let hmac = |key: &[u8]| <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    let mut extract = hmac(salt);
    extract.update(secret);
    let prk = extract.finalize().into_bytes();
    let mut block: Vec<u8> = Vec::new();
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut expand = hmac(&prk);
        expand.update(&block);
        expand.update(info);
        expand.update(&[i as u8 + 1]);
        block = expand.finalize().into_bytes().to_vec();
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// Every keyed mask's salt: keys derived here are pgveil's alone.
const KEY_SALT: &[u8] = b"pgveil mask keys";

/// The AES-SIV-256 key of `tokenize`, derived from the secret with HKDF.
fn tokenize_key(secret: &[u8]) -> Box<[u8; 64]> {
    let mut key = Box::new([0u8; 64]);
    hkdf(KEY_SALT, secret, b"tokenize", key.as_mut_slice());
    key
}

/// The HMAC key of `hash`, derived from the secret with HKDF.
fn hash_key(secret: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    hkdf(KEY_SALT, secret, b"hash", &mut key);
    key
}

/// The key of tokens made before keys were derived with HKDF (pgveil 0.1), which
/// `pgveil token decode` still reads.
fn legacy_tokenize_key(secret: &[u8]) -> Box<[u8; 64]> {
    let mut h = Sha512::new();
    h.update(b"pgveil-tokenize\0");
    h.update(secret);
    Box::new(h.finalize().into())
}

impl Masker {
    /// Prepares `f` for a column of class `class`; `None` for `deny`, which never runs.
    pub fn new(
        f: &MaskFunction,
        class: TypeClass,
        type_name: &str,
    ) -> Result<Option<Masker>, MaskError> {
        fits(f, class, type_name)?;
        Ok(Some(match f {
            MaskFunction::Redact { replacement } => Masker::Redact(
                replacement
                    .as_deref()
                    .unwrap_or(REDACTED)
                    .as_bytes()
                    .to_vec(),
            ),
            MaskFunction::Partial {
                keep_first,
                keep_last,
            } => Masker::Partial {
                keep_first: *keep_first,
                keep_last: *keep_last,
            },
            MaskFunction::Email => Masker::Email,
            MaskFunction::Hash { key_env } => Masker::Hash(Box::new(
                <Hmac<Sha256> as Mac>::new_from_slice(&hash_key(&key_from_env(key_env)?))
                    .expect("HMAC takes any key"),
            )),
            MaskFunction::Tokenize { key_env } => Masker::Tokenize(Box::new(Tokenizer::new(
                &tokenize_key(&key_from_env(key_env)?),
            ))),
            MaskFunction::Null => Masker::Null,
            MaskFunction::Constant { value } => {
                let binary = encode_constant(value, class, type_name)?;
                Masker::Constant {
                    text: value.as_bytes().to_vec(),
                    binary,
                }
            }
            MaskFunction::DateTrunc { unit } => Masker::DateTrunc(*unit),
            MaskFunction::Round { step } => Masker::Round {
                step: *step,
                decimals: decimals_of(*step),
            },
            MaskFunction::Deny => return Ok(None),
        }))
    }

    /// Masks one non-NULL value. Appends the masked bytes to `out` and returns true, or
    /// returns false for SQL NULL (nothing appended).
    pub fn apply(&self, class: TypeClass, binary: bool, value: &[u8], out: &mut Vec<u8>) -> bool {
        match self {
            Masker::Null => false,
            Masker::Redact(replacement) => {
                if class.is_text() {
                    out.extend_from_slice(replacement);
                    true
                } else {
                    false
                }
            }
            Masker::Constant { text, binary: b } => match (binary, b) {
                (false, _) => {
                    out.extend_from_slice(text);
                    true
                }
                (true, Some(b)) => {
                    out.extend_from_slice(b);
                    true
                }
                (true, None) => false,
            },
            Masker::Partial {
                keep_first,
                keep_last,
            } => text_mask(value, out, |s, o| partial(s, *keep_first, *keep_last, o)),
            Masker::Email => text_mask(value, out, email),
            Masker::Hash(keyed) => {
                let mut mac = (**keyed).clone();
                mac.update(value);
                let digest = mac.finalize().into_bytes();
                const HEX: &[u8; 16] = b"0123456789abcdef";
                for b in &digest[..16] {
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 0xf) as usize]);
                }
                true
            }
            Masker::Tokenize(tokenizer) => tokenize(tokenizer, value, out),
            Masker::DateTrunc(unit) => date_trunc(class, binary, value, *unit, out),
            Masker::Round { step, decimals } => round(class, binary, value, *step, *decimals, out),
        }
    }
}

/// `tokenize`'s AES-SIV (RFC 5297: S2V over AES-CMAC-256, then AES-256-CTR), as the
/// `aes-siv` crate computes it with the one header `pgveil`, with all that depends on the
/// key alone done once: both keys expanded, and S2V's state after the zero block and the
/// header. The `aes-siv` crate decodes what this encodes (`decode_token`); a test checks
/// that both give the same ciphertext for random keys and values.
#[derive(Clone)]
pub struct Tokenizer {
    mac: cmac::Cmac<aes::Aes256>,
    ctr: aes::Aes256,
    /// dbl(CMAC(0^128)) xor CMAC("pgveil").
    header_state: [u8; 16],
}

/// Doubling in GF(2^128), as S2V does it.
fn dbl(block: [u8; 16]) -> [u8; 16] {
    let v = u128::from_be_bytes(block);
    ((v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 }).to_be_bytes()
}

impl Tokenizer {
    fn new(key: &[u8; 64]) -> Tokenizer {
        use aes::cipher::KeyInit;
        let mac = <cmac::Cmac<aes::Aes256> as KeyInit>::new_from_slice(&key[..32])
            .expect("a 32-byte key");
        let ctr = aes::Aes256::new_from_slice(&key[32..]).expect("a 32-byte key");
        let cmac = |data: &[u8]| -> [u8; 16] {
            let mut m = mac.clone();
            cmac::Mac::update(&mut m, data);
            cmac::Mac::finalize(m).into_bytes().into()
        };
        let zero = cmac(&[0u8; 16]);
        let header = cmac(b"pgveil");
        let mut header_state = dbl(zero);
        header_state
            .iter_mut()
            .zip(header)
            .for_each(|(s, h)| *s ^= h);
        Tokenizer {
            mac,
            ctr,
            header_state,
        }
    }

    /// Encrypts `value` in place; returns its synthetic IV (the tag written before it).
    fn seal(&self, value: &mut [u8]) -> [u8; 16] {
        use aes::cipher::BlockEncrypt;
        let mut m = self.mac.clone();
        let mut last = if value.len() >= 16 {
            let n = value.len() - 16;
            cmac::Mac::update(&mut m, &value[..n]);
            let mut last = self.header_state;
            last.iter_mut().zip(&value[n..]).for_each(|(s, v)| *s ^= v);
            last
        } else {
            let mut last = dbl(self.header_state);
            last.iter_mut().zip(value.iter()).for_each(|(s, v)| *s ^= v);
            last[value.len()] ^= 0x80;
            last
        };
        cmac::Mac::update(&mut m, &last);
        let tag: [u8; 16] = cmac::Mac::finalize(m).into_bytes().into();
        // CTR from the tag with the top bits of its last two 32-bit words cleared, a
        // 128-bit big-endian counter.
        let mut counter = u128::from_be_bytes(tag) & !(1u128 << 63) & !(1u128 << 31);
        for chunk in value.chunks_mut(16) {
            last = counter.to_be_bytes();
            self.ctr.encrypt_block((&mut last).into());
            chunk.iter_mut().zip(last).for_each(|(c, k)| *c ^= k);
            counter = counter.wrapping_add(1);
        }
        tag
    }
}

/// `tok_` and the URL-safe base64 of AES-SIV(`key`, `value`) (tag, then ciphertext),
/// written straight into `out`.
fn tokenize(tokenizer: &Tokenizer, value: &[u8], out: &mut Vec<u8>) -> bool {
    const STACK: usize = 240;
    let mut stack = [0u8; STACK + 16];
    let mut heap = Vec::new();
    let buffer: &mut [u8] = if value.len() <= STACK {
        &mut stack[..value.len() + 16]
    } else {
        heap.resize(value.len() + 16, 0);
        &mut heap
    };
    buffer[16..].copy_from_slice(value);
    let tag = tokenizer.seal(&mut buffer[16..]);
    buffer[..16].copy_from_slice(&tag);
    out.extend_from_slice(TOKEN_PREFIX.as_bytes());
    let start = out.len();
    let len = base64::encoded_len(buffer.len(), false).unwrap_or(0);
    out.resize(start + len, 0);
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match engine.encode_slice(&*buffer, &mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            true
        }
        Err(_) => {
            out.truncate(start - TOKEN_PREFIX.len());
            false
        }
    }
}

/// Reverses `tokenize` for someone who holds the key.
pub fn decode_token(secret: &[u8], token: &str) -> Result<Vec<u8>, MaskError> {
    let body = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(MaskError::BadToken)?;
    let ct = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| MaskError::BadToken)?;
    // Tokens of earlier versions were made under another derivation of the same secret.
    [tokenize_key(secret), legacy_tokenize_key(secret)]
        .iter()
        .find_map(|key| {
            Aes256Siv::new(key.as_slice().into())
                .decrypt([b"pgveil"], &ct)
                .ok()
        })
        .ok_or(MaskError::BadToken)
}

fn text_mask(value: &[u8], out: &mut Vec<u8>, f: impl FnOnce(&str, &mut Vec<u8>)) -> bool {
    match std::str::from_utf8(value) {
        Ok(s) => f(s, out),
        // Not UTF-8 (a client_encoding other than UTF8): hide it whole.
        Err(_) => out.extend_from_slice(REDACTED.as_bytes()),
    }
    true
}

fn partial(s: &str, keep_first: usize, keep_last: usize, out: &mut Vec<u8>) {
    let n = s.chars().count();
    if n <= keep_first + keep_last {
        out.extend(std::iter::repeat_n(b'*', n.max(1)));
        return;
    }
    let mut buf = [0u8; 4];
    for (i, c) in s.chars().enumerate() {
        if i < keep_first || i >= n - keep_last {
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        } else {
            out.push(b'*');
        }
    }
}

fn email(s: &str, out: &mut Vec<u8>) {
    match s.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() => {
            let first = local.chars().next().unwrap_or('*');
            let mut buf = [0u8; 4];
            out.extend_from_slice(first.encode_utf8(&mut buf).as_bytes());
            out.extend_from_slice(b"***@");
            out.extend_from_slice(domain.as_bytes());
        }
        _ => out.extend_from_slice(REDACTED.as_bytes()),
    }
}

fn parse_ymd(s: &str) -> Option<(i64, u32, u32)> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    Some((
        s[0..4].parse().ok()?,
        s[5..7].parse().ok()?,
        s[8..10].parse().ok()?,
    ))
}

fn date_trunc(
    class: TypeClass,
    binary: bool,
    value: &[u8],
    unit: TruncUnit,
    out: &mut Vec<u8>,
) -> bool {
    let trunc = |y: i64, m: u32| match unit {
        TruncUnit::Year => (y, 1, 1),
        TruncUnit::Month => (y, m, 1),
    };
    if binary {
        match class {
            TypeClass::Date => {
                let Ok(raw) = <[u8; 4]>::try_from(value) else {
                    return false;
                };
                let days = i32::from_be_bytes(raw);
                if days == i32::MAX || days == i32::MIN {
                    out.extend_from_slice(value);
                    return true;
                }
                let (y, m, _) = pgtypes::civil_from_days(days.into());
                let (y, m, d) = trunc(y, m);
                out.extend_from_slice(&(pgtypes::days_from_civil(y, m, d) as i32).to_be_bytes());
                true
            }
            TypeClass::Timestamp | TypeClass::TimestampTz => {
                let Ok(raw) = <[u8; 8]>::try_from(value) else {
                    return false;
                };
                let us = i64::from_be_bytes(raw);
                if us == i64::MAX || us == i64::MIN {
                    out.extend_from_slice(value);
                    return true;
                }
                let (y, m, _) = pgtypes::civil_from_days(us.div_euclid(USECS_PER_DAY));
                let (y, m, d) = trunc(y, m);
                out.extend_from_slice(
                    &(pgtypes::days_from_civil(y, m, d) * USECS_PER_DAY).to_be_bytes(),
                );
                true
            }
            _ => false,
        }
    } else {
        let Ok(s) = std::str::from_utf8(value) else {
            return false;
        };
        if s.ends_with("infinity") {
            out.extend_from_slice(value);
            return true;
        }
        // ISO DateStyle only; anything else becomes NULL rather than leak.
        let Some((y, m, _)) = parse_ymd(s) else {
            return false;
        };
        let (y, m, d) = trunc(y, m);
        let _ = write!(out, "{y:04}-{m:02}-{d:02}");
        if class != TypeClass::Date {
            out.extend_from_slice(b" 00:00:00");
            if class == TypeClass::TimestampTz {
                // Keep the zone offset the server printed: "+08", "-03:30".
                if let Some(pos) = s[10..].rfind(['+', '-']) {
                    out.extend_from_slice(&s.as_bytes()[10 + pos..]);
                }
            }
        }
        true
    }
}

fn round_to(v: f64, step: f64) -> f64 {
    (v / step).round() * step
}

fn decimals_of(step: f64) -> usize {
    let s = format!("{step}");
    s.split_once('.').map(|(_, f)| f.len()).unwrap_or(0)
}

fn round(
    class: TypeClass,
    binary: bool,
    value: &[u8],
    step: f64,
    decimals: usize,
    out: &mut Vec<u8>,
) -> bool {
    let int_step = step.round().max(1.0);
    match (class, binary) {
        (TypeClass::Int2 | TypeClass::Int4 | TypeClass::Int8, true) => {
            let v: i64 = match value.len() {
                2 => i16::from_be_bytes([value[0], value[1]]).into(),
                4 => i32::from_be_bytes([value[0], value[1], value[2], value[3]]).into(),
                8 => i64::from_be_bytes(value.try_into().unwrap_or([0; 8])),
                _ => return false,
            };
            let r = round_to(v as f64, int_step);
            match class {
                TypeClass::Int2 => out.extend_from_slice(
                    &(r.clamp(i16::MIN.into(), i16::MAX.into()) as i16).to_be_bytes(),
                ),
                TypeClass::Int4 => out.extend_from_slice(
                    &(r.clamp(i32::MIN.into(), i32::MAX.into()) as i32).to_be_bytes(),
                ),
                _ => out.extend_from_slice(&(r as i64).to_be_bytes()),
            }
            true
        }
        (TypeClass::Int2 | TypeClass::Int4 | TypeClass::Int8, false) => {
            let Some(v) = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            else {
                return false;
            };
            let (lo, hi) = match class {
                TypeClass::Int2 => (i16::MIN as f64, i16::MAX as f64),
                TypeClass::Int4 => (i32::MIN as f64, i32::MAX as f64),
                _ => (i64::MIN as f64, i64::MAX as f64),
            };
            let _ = write!(out, "{}", round_to(v as f64, int_step).clamp(lo, hi) as i64);
            true
        }
        (TypeClass::Float4, true) => {
            let Ok(raw) = <[u8; 4]>::try_from(value) else {
                return false;
            };
            let v = f32::from_be_bytes(raw) as f64;
            out.extend_from_slice(&(finite_round(v, step) as f32).to_be_bytes());
            true
        }
        (TypeClass::Float8, true) => {
            let Ok(raw) = <[u8; 8]>::try_from(value) else {
                return false;
            };
            out.extend_from_slice(&finite_round(f64::from_be_bytes(raw), step).to_be_bytes());
            true
        }
        (TypeClass::Float4 | TypeClass::Float8, false) => {
            let Some(v) = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
            else {
                return false;
            };
            let _ = write!(out, "{}", finite_round(v, step));
            true
        }
        (TypeClass::Numeric, _) => {
            let decoded;
            let text = if binary {
                decoded = match pgtypes::numeric_from_binary(value) {
                    Some(t) => t,
                    None => return false,
                };
                decoded.as_str()
            } else {
                match std::str::from_utf8(value) {
                    Ok(t) => t,
                    Err(_) => return false,
                }
            };
            let Ok(v) = text.parse::<f64>() else {
                return false;
            };
            if !v.is_finite() {
                // NaN and ±Infinity carry no customer data.
                out.extend_from_slice(value);
                return true;
            }
            let rounded = round_to(v, step);
            // -0.4 rounds to "-0": print zero without its sign.
            let rounded = if rounded == 0.0 { 0.0 } else { rounded };
            let start = out.len();
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{:.*}", decimals, rounded);
            if binary {
                let Some(encoded) = std::str::from_utf8(&out[start..])
                    .ok()
                    .and_then(pgtypes::numeric_to_binary)
                else {
                    out.truncate(start);
                    return false;
                };
                out.truncate(start);
                out.extend_from_slice(&encoded);
            }
            true
        }
        _ => false,
    }
}

fn finite_round(v: f64, step: f64) -> f64 {
    if v.is_finite() {
        round_to(v, step)
    } else {
        v
    }
}

/// The binary encoding of a constant for a column of `class`, checking it parses.
fn encode_constant(
    value: &str,
    class: TypeClass,
    type_name: &str,
) -> Result<Option<Vec<u8>>, MaskError> {
    let bad = || MaskError::BadConstant {
        value: value.into(),
        type_name: type_name.into(),
    };
    Ok(Some(match class {
        TypeClass::Text => value.as_bytes().to_vec(),
        TypeClass::Int2 => value
            .parse::<i16>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        TypeClass::Int4 => value
            .parse::<i32>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        TypeClass::Int8 => value
            .parse::<i64>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        TypeClass::Float4 => value
            .parse::<f32>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        TypeClass::Float8 => value
            .parse::<f64>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        TypeClass::Numeric => pgtypes::numeric_to_binary(value).ok_or_else(bad)?,
        TypeClass::Date => {
            let (y, m, d) = parse_ymd(value)
                .filter(|_| value.len() == 10)
                .ok_or_else(bad)?;
            (pgtypes::days_from_civil(y, m, d) as i32)
                .to_be_bytes()
                .to_vec()
        }
        TypeClass::Timestamp | TypeClass::TimestampTz => {
            let (y, m, d) = parse_ymd(value)
                .filter(|_| value.len() == 10)
                .ok_or_else(bad)?;
            (pgtypes::days_from_civil(y, m, d) * USECS_PER_DAY)
                .to_be_bytes()
                .to_vec()
        }
        TypeClass::Other => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(f: MaskFunction, class: TypeClass, binary: bool, value: &[u8]) -> Option<Vec<u8>> {
        let m = Masker::new(&f, class, "t").unwrap().unwrap();
        let mut out = Vec::new();
        m.apply(class, binary, value, &mut out).then_some(out)
    }

    fn text(f: MaskFunction, class: TypeClass, value: &str) -> Option<String> {
        run(f, class, false, value.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn text_masks() {
        let partial = MaskFunction::Partial {
            keep_first: 3,
            keep_last: 4,
        };
        assert_eq!(
            text(partial.clone(), TypeClass::Text, "13912345678").as_deref(),
            Some("139****5678")
        );
        assert_eq!(
            text(partial, TypeClass::Text, "1234").as_deref(),
            Some("****")
        );
        assert_eq!(
            text(MaskFunction::Email, TypeClass::Text, "john.doe@example.com").as_deref(),
            Some("j***@example.com")
        );
        assert_eq!(
            text(MaskFunction::Email, TypeClass::Text, "nope").as_deref(),
            Some("****")
        );
        assert_eq!(
            text(
                MaskFunction::Redact { replacement: None },
                TypeClass::Text,
                "ID123"
            )
            .as_deref(),
            Some("****")
        );
        assert_eq!(
            text(
                MaskFunction::Redact {
                    replacement: Some("[hidden]".into())
                },
                TypeClass::Text,
                "x"
            )
            .as_deref(),
            Some("[hidden]")
        );
        assert_eq!(
            text(
                MaskFunction::Redact { replacement: None },
                TypeClass::Int4,
                "5"
            ),
            None
        );
        assert_eq!(text(MaskFunction::Null, TypeClass::Text, "x"), None);
        assert_eq!(
            text(
                MaskFunction::Constant {
                    value: "n/a".into()
                },
                TypeClass::Text,
                "x"
            )
            .as_deref(),
            Some("n/a")
        );
    }

    #[test]
    fn dates_and_numbers() {
        let year = MaskFunction::DateTrunc {
            unit: TruncUnit::Year,
        };
        let month = MaskFunction::DateTrunc {
            unit: TruncUnit::Month,
        };
        assert_eq!(
            text(year.clone(), TypeClass::Date, "1984-07-19").as_deref(),
            Some("1984-01-01")
        );
        assert_eq!(
            text(month, TypeClass::Timestamp, "1984-07-19 10:11:12.5").as_deref(),
            Some("1984-07-01 00:00:00")
        );
        assert_eq!(
            text(
                year.clone(),
                TypeClass::TimestampTz,
                "1984-07-19 10:11:12+08"
            )
            .as_deref(),
            Some("1984-01-01 00:00:00+08")
        );
        assert_eq!(
            text(year.clone(), TypeClass::Date, "infinity").as_deref(),
            Some("infinity")
        );
        assert_eq!(
            text(year.clone(), TypeClass::Date, "19.07.1984"),
            None,
            "non-ISO DateStyle hides the value"
        );
        let d = (pgtypes::days_from_civil(1984, 7, 19) as i32).to_be_bytes();
        let got = run(year, TypeClass::Date, true, &d).unwrap();
        assert_eq!(
            i32::from_be_bytes(got.try_into().unwrap()) as i64,
            pgtypes::days_from_civil(1984, 1, 1)
        );

        let r = MaskFunction::Round { step: 1000.0 };
        assert_eq!(
            text(r.clone(), TypeClass::Numeric, "1234.56").as_deref(),
            Some("1000")
        );
        assert_eq!(
            text(r.clone(), TypeClass::Int4, "2600").as_deref(),
            Some("3000")
        );
        assert_eq!(
            text(r.clone(), TypeClass::Float8, "-1499.9").as_deref(),
            Some("-1000")
        );
        assert_eq!(
            text(r.clone(), TypeClass::Numeric, "NaN").as_deref(),
            Some("NaN")
        );
        let got = run(
            r.clone(),
            TypeClass::Numeric,
            true,
            &pgtypes::numeric_to_binary("98765.43").unwrap(),
        )
        .unwrap();
        assert_eq!(pgtypes::numeric_from_binary(&got).unwrap(), "99000");
        let got = run(r, TypeClass::Int8, true, &123_456i64.to_be_bytes()).unwrap();
        assert_eq!(i64::from_be_bytes(got.try_into().unwrap()), 123_000);
        let cents = MaskFunction::Round { step: 0.5 };
        assert_eq!(
            text(cents, TypeClass::Numeric, "10.26").as_deref(),
            Some("10.5")
        );
    }

    #[test]
    fn type_fit_is_checked() {
        assert!(fits(&MaskFunction::Email, TypeClass::Int4, "integer").is_err());
        assert!(fits(&MaskFunction::Round { step: 1.0 }, TypeClass::Text, "text").is_err());
        assert!(fits(
            &MaskFunction::DateTrunc {
                unit: TruncUnit::Year
            },
            TypeClass::Numeric,
            "numeric"
        )
        .is_err());
        assert!(fits(
            &MaskFunction::Constant {
                value: "abc".into()
            },
            TypeClass::Int4,
            "integer"
        )
        .is_err());
        assert!(fits(
            &MaskFunction::Constant { value: "42".into() },
            TypeClass::Int4,
            "integer"
        )
        .is_ok());
        assert!(fits(&MaskFunction::Null, TypeClass::Other, "jsonb").is_ok());
    }

    #[test]
    fn keyed_masks_need_their_key_and_tokens_decode() {
        const SECRET: &[u8] = b"s3cret s3cret s3cret s3cret s3cret";
        std::env::set_var("PGVEIL_TEST_KEY_A", std::str::from_utf8(SECRET).unwrap());
        let f = MaskFunction::Tokenize {
            key_env: "PGVEIL_TEST_KEY_A".into(),
        };
        let a = text(f.clone(), TypeClass::Text, "4111000015485863").unwrap();
        let b = text(f, TypeClass::Text, "4111000015485863").unwrap();
        assert_eq!(a, b, "deterministic");
        assert!(a.starts_with("tok_") && !a.contains("4111"));
        assert_eq!(decode_token(SECRET, &a).unwrap(), b"4111000015485863");
        assert_eq!(decode_token(b"other", &a), Err(MaskError::BadToken));
        let h = MaskFunction::Hash {
            key_env: "PGVEIL_TEST_KEY_A".into(),
        };
        let x = text(h.clone(), TypeClass::Text, "user1@example.com").unwrap();
        assert_eq!(x.len(), 32);
        assert_eq!(x, text(h, TypeClass::Text, "user1@example.com").unwrap());
        let missing = MaskFunction::Hash {
            key_env: "PGVEIL_TEST_KEY_UNSET".into(),
        };
        assert!(matches!(
            Masker::new(&missing, TypeClass::Text, "text"),
            Err(MaskError::MissingKey(_))
        ));
        std::env::set_var("PGVEIL_TEST_KEY_SHORT", "s3cret");
        let short = MaskFunction::Tokenize {
            key_env: "PGVEIL_TEST_KEY_SHORT".into(),
        };
        assert!(matches!(
            Masker::new(&short, TypeClass::Text, "text"),
            Err(MaskError::ShortKey { len: 6, .. })
        ));
    }

    #[test]
    fn keys_are_derived_with_hkdf() {
        // RFC 5869, test case 1.
        let mut okm = [0u8; 42];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        hkdf(&salt, &[0x0b; 22], &info, &mut okm);
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
        // Each mask gets its own key, and neither is the secret.
        let secret = [7u8; 32];
        assert_ne!(&tokenize_key(&secret)[..32], &hash_key(&secret)[..]);
        assert_ne!(&hash_key(&secret)[..], &secret[..]);
    }

    proptest! {
        #[test]
        fn tokenizer_agrees_with_the_aes_siv_crate(
            key in proptest::collection::vec(any::<u8>(), 64),
            value in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let key: [u8; 64] = key.try_into().unwrap();
            let mut sealed = value.clone();
            let tag = Tokenizer::new(&key).seal(&mut sealed);
            let mut want = Aes256Siv::new(key.as_slice().into())
                .encrypt([b"pgveil"], &value)
                .unwrap();
            let body = want.split_off(16);
            prop_assert_eq!(&tag[..], &want[..]);
            prop_assert_eq!(sealed, body);
        }
    }

    #[test]
    fn tokens_of_the_earlier_key_derivation_still_decode() {
        let secret = b"an old secret from before HKDF keys";
        let mut cipher = Aes256Siv::new(legacy_tokenize_key(secret).as_slice().into());
        let ct = cipher.encrypt([b"pgveil"], b"4111000015485863").unwrap();
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ct)
        );
        assert_eq!(decode_token(secret, &token).unwrap(), b"4111000015485863");
    }

    proptest! {
        #[test]
        fn partial_keeps_ends_and_length(s in "\\PC{0,30}", kf in 0usize..5, kl in 0usize..5) {
            let out = text(MaskFunction::Partial { keep_first: kf, keep_last: kl }, TypeClass::Text, &s).unwrap();
            let n = s.chars().count();
            prop_assert_eq!(out.chars().count(), n.max(1).max(if n <= kf + kl { 1 } else { n }));
            if n > kf + kl {
                prop_assert!(out.chars().skip(kf).take(n - kf - kl).all(|c| c == '*'));
            } else {
                prop_assert!(out.chars().all(|c| c == '*'));
            }
        }

        #[test]
        fn email_never_shows_more_than_first_char(local in "[a-z0-9.]{2,20}", domain in "[a-z]{1,10}\\.com") {
            let out = text(MaskFunction::Email, TypeClass::Text, &format!("{local}@{domain}")).unwrap();
            let expected = format!("{}***@{domain}", &local[..1]);
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn round_text_and_binary_agree(v in -1_000_000i32..1_000_000) {
            let r = MaskFunction::Round { step: 100.0 };
            let t = text(r.clone(), TypeClass::Int4, &v.to_string()).unwrap();
            let b = run(r, TypeClass::Int4, true, &v.to_be_bytes()).unwrap();
            prop_assert_eq!(t.parse::<i32>().unwrap(), i32::from_be_bytes(b.try_into().unwrap()));
            prop_assert_eq!(t.parse::<i32>().unwrap() % 100, 0);
        }

        #[test]
        fn date_trunc_is_a_valid_date_in_both_formats(days in -200_000i32..200_000) {
            let f = MaskFunction::DateTrunc { unit: TruncUnit::Month };
            let (y, m, d) = pgtypes::civil_from_days(days.into());
            let t = text(f.clone(), TypeClass::Date, &format!("{y:04}-{m:02}-{d:02}"));
            let b = run(f, TypeClass::Date, true, &days.to_be_bytes()).unwrap();
            let (by, bm, bd) = pgtypes::civil_from_days(i32::from_be_bytes(b.try_into().unwrap()).into());
            prop_assert_eq!((by, bm, bd), (y, m, 1));
            if y >= 1000 {
                prop_assert_eq!(t.unwrap(), format!("{y:04}-{m:02}-01"));
            }
        }
    }
}
