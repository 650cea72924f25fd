//! Wire encodings of the PostgreSQL types masks compute on, in text and binary format:
//! integers, floats, numeric (base-10000 digits), date and timestamp (days and
//! microseconds since 2000-01-01). Reference: the types' `*send`/`*recv` functions.

/// How a column's values are encoded and what a mask may do with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeClass {
    Text,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Date,
    Timestamp,
    TimestampTz,
    /// Anything else: only masks that produce NULL apply.
    Other,
}

impl TypeClass {
    /// From the type's OID, or its name for types without a fixed OID (extensions).
    pub fn of(type_oid: u32, type_name: &str) -> TypeClass {
        match type_oid {
            25 | 1042 | 1043 | 19 => TypeClass::Text,
            21 => TypeClass::Int2,
            23 => TypeClass::Int4,
            20 => TypeClass::Int8,
            700 => TypeClass::Float4,
            701 => TypeClass::Float8,
            1700 => TypeClass::Numeric,
            1082 => TypeClass::Date,
            1114 => TypeClass::Timestamp,
            1184 => TypeClass::TimestampTz,
            _ if type_name == "citext" => TypeClass::Text,
            _ => TypeClass::Other,
        }
    }

    pub fn is_text(self) -> bool {
        self == TypeClass::Text
    }

    pub fn is_number(self) -> bool {
        matches!(
            self,
            TypeClass::Int2
                | TypeClass::Int4
                | TypeClass::Int8
                | TypeClass::Float4
                | TypeClass::Float8
                | TypeClass::Numeric
        )
    }

    pub fn is_temporal(self) -> bool {
        matches!(
            self,
            TypeClass::Date | TypeClass::Timestamp | TypeClass::TimestampTz
        )
    }
}

/// Days from 0000-03-01-based civil calendar arithmetic (Howard Hinnant's algorithm),
/// shifted so that 2000-01-01 is day 0, as PostgreSQL counts.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468 - 10957
}

/// The civil date of a PostgreSQL day number (0 = 2000-01-01).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 10957 + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub const USECS_PER_DAY: i64 = 86_400_000_000;

/// Decodes a binary `numeric` into its decimal text form (`None` if malformed).
pub fn numeric_from_binary(b: &[u8]) -> Option<String> {
    if b.len() < 8 {
        return None;
    }
    let ndigits = i16::from_be_bytes([b[0], b[1]]) as usize;
    let weight = i16::from_be_bytes([b[2], b[3]]) as i32;
    let sign = u16::from_be_bytes([b[4], b[5]]);
    let dscale = i16::from_be_bytes([b[6], b[7]]).max(0) as usize;
    if b.len() != 8 + 2 * ndigits {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| u16::from_be_bytes([b[8 + 2 * i], b[9 + 2 * i]]))
        .collect();
    let mut int_part = String::new();
    for w in 0..=weight.max(-1) {
        let d = digits.get(w as usize).copied().unwrap_or(0);
        if int_part.is_empty() {
            if d != 0 {
                int_part = d.to_string();
            }
        } else {
            int_part.push_str(&format!("{d:04}"));
        }
    }
    if int_part.is_empty() {
        int_part.push('0');
    }
    let mut frac = String::new();
    let mut i = weight + 1;
    while frac.len() < dscale {
        let d = if i >= 0 {
            digits.get(i as usize).copied().unwrap_or(0)
        } else {
            0
        };
        frac.push_str(&format!("{d:04}"));
        i += 1;
    }
    frac.truncate(dscale);
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    out.push_str(&int_part);
    if dscale > 0 {
        out.push('.');
        out.push_str(&frac);
    }
    Some(out)
}

/// Encodes a finite decimal text (`-123.45`) as binary `numeric`.
pub fn numeric_to_binary(text: &str) -> Option<Vec<u8>> {
    let (neg, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int_s, frac_s) = body.split_once('.').unwrap_or((body, ""));
    if int_s.is_empty() && frac_s.is_empty()
        || !int_s.bytes().all(|c| c.is_ascii_digit())
        || !frac_s.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let dscale = frac_s.len();
    // Pad both parts to whole base-10000 groups.
    let int_pad = (4 - int_s.len() % 4) % 4;
    let int_digits: String = "0".repeat(int_pad) + int_s;
    let frac_digits: String = frac_s.to_string() + &"0".repeat((4 - frac_s.len() % 4) % 4);
    let mut groups: Vec<u16> = Vec::new();
    for c in int_digits
        .as_bytes()
        .chunks(4)
        .chain(frac_digits.as_bytes().chunks(4))
    {
        groups.push(std::str::from_utf8(c).ok()?.parse().ok()?);
    }
    let int_groups = int_digits.len() / 4;
    let mut weight = int_groups as i32 - 1;
    // Strip leading and trailing zero groups, as the server does.
    let mut start = 0;
    while start < groups.len() && groups[start] == 0 {
        start += 1;
        weight -= 1;
    }
    let mut end = groups.len();
    while end > start && groups[end - 1] == 0 {
        end -= 1;
    }
    let digits = &groups[start..end];
    if digits.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + 2 * digits.len());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    let sign: u16 = if neg && !digits.is_empty() { 0x4000 } else { 0 };
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(dscale as i16).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn calendar_matches_postgres_epoch() {
        assert_eq!(days_from_civil(2000, 1, 1), 0);
        assert_eq!(days_from_civil(1999, 12, 31), -1);
        assert_eq!(days_from_civil(1984, 7, 19), -5644);
        assert_eq!(civil_from_days(-5644), (1984, 7, 19));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn numeric_known_encodings() {
        // 1234.56 -> digits [1234, 5600], weight 0, dscale 2
        let b = numeric_to_binary("1234.56").unwrap();
        assert_eq!(b, vec![0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xD2, 0x15, 0xE0]);
        assert_eq!(numeric_from_binary(&b).unwrap(), "1234.56");
        assert_eq!(
            numeric_from_binary(&numeric_to_binary("0").unwrap()).unwrap(),
            "0"
        );
        assert_eq!(
            numeric_from_binary(&numeric_to_binary("-0.0050").unwrap()).unwrap(),
            "-0.0050"
        );
        assert_eq!(
            numeric_from_binary(&numeric_to_binary("100000000").unwrap()).unwrap(),
            "100000000"
        );
        assert!(numeric_to_binary("1e5").is_none());
    }

    proptest! {
        #[test]
        fn numeric_round_trips(int in 0u64..10_000_000_000_000, frac in "[0-9]{0,6}", neg: bool) {
            let text = format!("{}{}{}{}", if neg && (int > 0 || frac.bytes().any(|c| c != b'0')) { "-" } else { "" },
                int, if frac.is_empty() { "" } else { "." }, frac);
            let b = numeric_to_binary(&text).unwrap();
            prop_assert_eq!(numeric_from_binary(&b).unwrap(), text);
        }

        #[test]
        fn calendar_round_trips(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
