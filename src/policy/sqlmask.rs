//! Keyless masks as SQL expressions, for uses of a masked column that in-flight masking
//! cannot reach (expressions, predicates, subqueries, RETURNING, COPY ...): the server then
//! computes on the masked value. Each expression returns what the in-flight masker would,
//! keeps NULL as NULL, and is cast back to the column's type. Keyed masks (`hash`,
//! `tokenize`) have no SQL form: their key must never appear in SQL.
//!
//! Every function that receives the clear value is qualified with `pg_catalog`, and no
//! operator is applied to it, so that a function or operator of the same name created
//! earlier in the session's `search_path` cannot see the clear value. The operators on
//! what is derived from it (its length, the position of `@`) are spelled
//! `OPERATOR(pg_catalog.<=)` too: a shadowing `<=` that is always false would otherwise
//! pick the branch that keeps both ends of a short value, all of it.

use crate::config::rules::{MaskFunction, TruncUnit};

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn type_name(t: &str) -> String {
    format!("\"{}\"", t.replace('"', "\"\""))
}

/// The SQL expression masking `col` (already rendered SQL) of type `ty`; `None` for masks
/// that have no SQL form.
pub fn mask_sql(f: &MaskFunction, col: &str, ty: &str, is_text: bool) -> Option<String> {
    let t = type_name(ty);
    let c = format!("({col})");
    Some(match f {
        MaskFunction::Partial { keep_first, keep_last } => {
            let (kf, kl) = (keep_first, keep_last);
            format!(
                "(CASE WHEN {c} IS NULL THEN NULL WHEN pg_catalog.char_length({c}) OPERATOR(pg_catalog.<=) {sum} \
                 THEN pg_catalog.repeat('*', GREATEST(pg_catalog.char_length({c}), 1)) \
                 ELSE pg_catalog.concat(pg_catalog.left({c}, {kf}), \
                 pg_catalog.repeat('*', pg_catalog.char_length({c}) OPERATOR(pg_catalog.-) {sum}), pg_catalog.right({c}, {kl})) END)::{t}",
                sum = kf + kl
            )
        }
        MaskFunction::Email => format!(
            "(CASE WHEN {c} IS NULL THEN NULL \
             WHEN pg_catalog.strpos({c}, '@') OPERATOR(pg_catalog.>) 1 THEN pg_catalog.concat(pg_catalog.left({c}, 1), '***@', \
             pg_catalog.split_part({c}, '@', -1)) ELSE '****' END)::{t}"
        ),
        MaskFunction::Redact { replacement } if is_text => {
            let r = literal(replacement.as_deref().unwrap_or("****"));
            format!("(CASE WHEN {c} IS NULL THEN NULL ELSE {r} END)::{t}")
        }
        MaskFunction::Redact { .. } | MaskFunction::Null => format!("NULL::{t}"),
        MaskFunction::Constant { value } => {
            format!("(CASE WHEN {c} IS NULL THEN NULL ELSE {} END)::{t}", literal(value))
        }
        MaskFunction::DateTrunc { unit } => {
            let u = match unit {
                TruncUnit::Year => "year",
                TruncUnit::Month => "month",
            };
            format!("pg_catalog.date_trunc('{u}', {c})::{t}")
        }
        MaskFunction::Round { step } => {
            format!("(pg_catalog.round(pg_catalog.numeric_div(({c})::pg_catalog.numeric, {step})) OPERATOR(pg_catalog.*) {step})::{t}")
        }
        MaskFunction::Hash { .. } | MaskFunction::Tokenize { .. } | MaskFunction::Deny => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_deny_have_no_sql_form() {
        assert!(mask_sql(
            &MaskFunction::Hash {
                key_env: "K".into()
            },
            "c",
            "text",
            true
        )
        .is_none());
        assert!(mask_sql(&MaskFunction::Deny, "c", "text", true).is_none());
    }

    #[test]
    fn expressions_parse() {
        for f in [
            MaskFunction::Partial {
                keep_first: 3,
                keep_last: 4,
            },
            MaskFunction::Email,
            MaskFunction::Redact {
                replacement: Some("it's hidden".into()),
            },
            MaskFunction::Null,
            MaskFunction::Constant { value: "x".into() },
            MaskFunction::DateTrunc {
                unit: TruncUnit::Year,
            },
            MaskFunction::Round { step: 1000.0 },
        ] {
            let sql = format!("SELECT {}", mask_sql(&f, "c.phone", "text", true).unwrap());
            crate::sql::parse(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
