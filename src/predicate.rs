//! A row filter's condition (`[[filter]] where`): read once when the rules load, held to
//! what a filter may use (the table's own columns, constants, `current_user`,
//! `session_user`, `current_setting('pgveil.…')`, comparisons, IN, BETWEEN, LIKE, IS NULL,
//! AND, OR, NOT), and written back with every operator spelled `OPERATOR(pg_catalog.…)`,
//! so that a session's search_path cannot change what it means.

use sqlparser::ast::{BinaryOperator, Expr, FunctionArguments, UnaryOperator, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// An identifier as PostgreSQL reads it: folded to lower case unless quoted. It lives
/// here, the lowest module that reads SQL names (`config` reads filters with it, and `sql`,
/// which uses `config`, re-exports it).
pub fn fold(ident: &sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

/// Deeper conditions than this are refused (they are not written by hand).
const MAX_DEPTH: usize = 64;

/// A condition over one table's columns, in the form pgveil writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Predicate {
    Column(String),
    /// A constant, as SQL (a number, a quoted string, TRUE, FALSE, NULL).
    Constant(String),
    CurrentUser,
    SessionUser,
    /// `current_setting('pgveil.<name>')`: NULL when the session has not set it.
    Setting(String),
    /// `a OPERATOR(pg_catalog.<op>) b`.
    Compare(Box<Predicate>, &'static str, Box<Predicate>),
    And(Box<Predicate>, Box<Predicate>),
    Or(Box<Predicate>, Box<Predicate>),
    Not(Box<Predicate>),
    /// `a IS NULL`, `a IS NOT TRUE`, ...
    Is(Box<Predicate>, &'static str),
}

const ALLOWED: &str = "a filter may use the table's columns, constants, current_user, session_user, current_setting('pgveil.…'), comparisons, IN, BETWEEN, LIKE, IS [NOT] NULL, AND, OR and NOT";

impl Predicate {
    /// Reads a filter's `where` text.
    pub fn parse(text: &str) -> Result<Predicate, String> {
        let expr = Parser::new(&PostgreSqlDialect {})
            .with_recursion_limit(MAX_DEPTH)
            .try_with_sql(text)
            .and_then(|mut p| {
                let e = p.parse_expr()?;
                p.expect_token(&sqlparser::tokenizer::Token::EOF)?;
                Ok(e)
            })
            .map_err(|e| format!("cannot read {text:?}: {e}"))?;
        let p = Predicate::of(&expr, 0)?;
        if p.columns().is_empty() {
            return Err(format!("{text:?} reads no column of the table"));
        }
        Ok(p)
    }

    /// The same reading of an expression a statement holds (a value an INSERT or an
    /// UPDATE writes), or `None` when it is not of that form.
    pub fn of_expr(expr: &Expr) -> Option<Predicate> {
        Predicate::of(expr, 0).ok()
    }

    fn of(expr: &Expr, depth: usize) -> Result<Predicate, String> {
        if depth > MAX_DEPTH {
            return Err("the condition is nested too deeply".into());
        }
        let sub = |e: &Expr| Predicate::of(e, depth + 1).map(Box::new);
        let refused = || format!("{expr} is not allowed: {ALLOWED}");
        Ok(match expr {
            Expr::Identifier(i) => Predicate::Column(fold(i)),
            Expr::Nested(e) => return Predicate::of(e, depth + 1),
            Expr::Value(v) => match &v.value {
                Value::Number(..)
                | Value::SingleQuotedString(_)
                | Value::EscapedStringLiteral(_)
                | Value::Boolean(_)
                | Value::Null => Predicate::Constant(v.value.to_string()),
                _ => return Err(refused()),
            },
            // The server folds a minus into the number it precedes: no operator runs.
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr: inner,
            } => match inner.as_ref() {
                Expr::Value(v) if matches!(v.value, Value::Number(..)) => {
                    Predicate::Constant(format!("-{}", v.value))
                }
                _ => return Err(refused()),
            },
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr: inner,
            } => Predicate::Not(sub(inner)?),
            Expr::Function(f)
                if f.name.0.len() == 1
                    && matches!(f.args, FunctionArguments::None)
                    && matches!(f.parameters, FunctionArguments::None) =>
            {
                let ident = f.name.0[0].as_ident().ok_or_else(refused)?;
                if ident.quote_style.is_some() {
                    return Err(refused());
                }
                match ident.value.to_ascii_lowercase().as_str() {
                    "current_user" | "user" => Predicate::CurrentUser,
                    "session_user" => Predicate::SessionUser,
                    _ => return Err(refused()),
                }
            }
            Expr::Function(f) => setting(f).ok_or_else(refused)?,
            Expr::BinaryOp { left, op, right } => {
                let (l, r) = (sub(left)?, sub(right)?);
                match op {
                    BinaryOperator::And => Predicate::And(l, r),
                    BinaryOperator::Or => Predicate::Or(l, r),
                    _ => Predicate::Compare(l, comparison(op).ok_or_else(refused)?, r),
                }
            }
            Expr::IsNull(e) => Predicate::Is(sub(e)?, "IS NULL"),
            Expr::IsNotNull(e) => Predicate::Is(sub(e)?, "IS NOT NULL"),
            Expr::IsTrue(e) => Predicate::Is(sub(e)?, "IS TRUE"),
            Expr::IsNotTrue(e) => Predicate::Is(sub(e)?, "IS NOT TRUE"),
            Expr::IsFalse(e) => Predicate::Is(sub(e)?, "IS FALSE"),
            Expr::IsNotFalse(e) => Predicate::Is(sub(e)?, "IS NOT FALSE"),
            Expr::InList {
                expr: e,
                list,
                negated,
            } => {
                let items = list.iter().map(|i| Predicate::of(i, depth + 1));
                in_list(sub(e)?, items.collect::<Result<_, _>>()?, *negated).ok_or_else(refused)?
            }
            Expr::Between {
                expr: e,
                negated,
                low,
                high,
            } => between(sub(e)?, sub(low)?, sub(high)?, *negated),
            Expr::Like {
                negated,
                any: false,
                expr: e,
                pattern,
                escape_char: None,
            } => like(sub(e)?, "~~", sub(pattern)?, *negated),
            Expr::ILike {
                negated,
                any: false,
                expr: e,
                pattern,
                escape_char: None,
            } => like(sub(e)?, "~~*", sub(pattern)?, *negated),
            _ => return Err(refused()),
        })
    }

    /// Whether the condition reads a `pgveil.` setting (which the client sets).
    pub fn reads_setting(&self) -> bool {
        match self {
            Predicate::Setting(_) => true,
            Predicate::Compare(a, _, b) | Predicate::And(a, b) | Predicate::Or(a, b) => {
                a.reads_setting() || b.reads_setting()
            }
            Predicate::Not(a) | Predicate::Is(a, _) => a.reads_setting(),
            Predicate::Column(_)
            | Predicate::Constant(_)
            | Predicate::CurrentUser
            | Predicate::SessionUser => false,
        }
    }

    /// The columns the condition reads, each once.
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.each_column(&mut |c| {
            if !out.contains(&c) {
                out.push(c)
            }
        });
        out
    }

    fn each_column<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Predicate::Column(c) => f(c),
            Predicate::Compare(a, _, b) | Predicate::And(a, b) | Predicate::Or(a, b) => {
                a.each_column(f);
                b.each_column(f);
            }
            Predicate::Not(a) | Predicate::Is(a, _) => a.each_column(f),
            Predicate::Constant(_)
            | Predicate::CurrentUser
            | Predicate::SessionUser
            | Predicate::Setting(_) => {}
        }
    }

    /// The condition as SQL, its columns qualified by `qualifier` (an identifier, quoted
    /// here).
    pub fn sql(&self, qualifier: &str) -> String {
        let mut out = String::new();
        self.write(&quote(qualifier), &mut out);
        out
    }

    fn write(&self, qualifier: &str, out: &mut String) {
        match self {
            Predicate::Column(c) => {
                out.push_str(qualifier);
                out.push('.');
                out.push_str(&quote(c));
            }
            Predicate::Constant(c) => out.push_str(c),
            Predicate::CurrentUser => out.push_str("CURRENT_USER"),
            Predicate::SessionUser => out.push_str("SESSION_USER"),
            Predicate::Setting(name) => {
                out.push_str("pg_catalog.current_setting('");
                out.push_str(&name.replace('\'', "''"));
                out.push_str("', true)");
            }
            Predicate::Compare(a, op, b) => {
                out.push('(');
                a.write(qualifier, out);
                out.push_str(" OPERATOR(pg_catalog.");
                out.push_str(op);
                out.push_str(") ");
                b.write(qualifier, out);
                out.push(')');
            }
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                out.push('(');
                a.write(qualifier, out);
                out.push_str(if matches!(self, Predicate::And(..)) {
                    " AND "
                } else {
                    " OR "
                });
                b.write(qualifier, out);
                out.push(')');
            }
            Predicate::Not(a) => {
                out.push_str("(NOT ");
                a.write(qualifier, out);
                out.push(')');
            }
            Predicate::Is(a, is) => {
                out.push('(');
                a.write(qualifier, out);
                out.push(' ');
                out.push_str(is);
                out.push(')');
            }
        }
    }

    /// What the condition requires of a new row, when it is only `column = value`
    /// conditions joined by AND (values that read no column): a row holding exactly those
    /// values satisfies it. `None` for any other condition.
    pub fn required_values(&self) -> Option<Vec<(&str, &Predicate)>> {
        match self {
            Predicate::And(a, b) => {
                let mut out = a.required_values()?;
                out.extend(b.required_values()?);
                Some(out)
            }
            Predicate::Compare(a, "=", b) => match (a.as_ref(), b.as_ref()) {
                (Predicate::Column(c), v) | (v, Predicate::Column(c)) if v.is_known_value() => {
                    Some(vec![(c.as_str(), v)])
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// A value that is never NULL and reads no column.
    fn is_known_value(&self) -> bool {
        match self {
            Predicate::Constant(c) => !c.eq_ignore_ascii_case("null"),
            Predicate::CurrentUser | Predicate::SessionUser => true,
            _ => false,
        }
    }
}

/// `e IN (a, b)` is `e = a OR e = b`; `NOT IN` is `e <> a AND e <> b` (NULLs alike).
fn in_list(e: Box<Predicate>, items: Vec<Predicate>, negated: bool) -> Option<Predicate> {
    let op = if negated { "<>" } else { "=" };
    let mut items = items
        .into_iter()
        .map(|item| Predicate::Compare(e.clone(), op, Box::new(item)));
    let first = items.next()?;
    Some(items.fold(first, |acc, item| match negated {
        false => Predicate::Or(Box::new(acc), Box::new(item)),
        true => Predicate::And(Box::new(acc), Box::new(item)),
    }))
}

/// `e BETWEEN low AND high` is `e >= low AND e <= high`.
fn between(
    e: Box<Predicate>,
    low: Box<Predicate>,
    high: Box<Predicate>,
    negated: bool,
) -> Predicate {
    let within = Predicate::And(
        Box::new(Predicate::Compare(e.clone(), ">=", low)),
        Box::new(Predicate::Compare(e, "<=", high)),
    );
    match negated {
        false => within,
        true => Predicate::Not(Box::new(within)),
    }
}

fn like(e: Box<Predicate>, op: &'static str, pattern: Box<Predicate>, negated: bool) -> Predicate {
    let p = Predicate::Compare(e, op, pattern);
    match negated {
        false => p,
        true => Predicate::Not(Box::new(p)),
    }
}

/// The catalog name of a comparison operator (`=`, `<>`, `<`, `<=`, `>`, `>=`).
pub fn comparison(op: &BinaryOperator) -> Option<&'static str> {
    Some(match op {
        BinaryOperator::Eq => "=",
        BinaryOperator::NotEq => "<>",
        BinaryOperator::Lt => "<",
        BinaryOperator::LtEq => "<=",
        BinaryOperator::Gt => ">",
        BinaryOperator::GtEq => ">=",
        _ => return None,
    })
}

/// `current_setting('pgveil.<name>')`, with one string constant naming a `pgveil.` setting.
fn setting(f: &sqlparser::ast::Function) -> Option<Predicate> {
    let name: Vec<String> = f
        .name
        .0
        .iter()
        .map(|p| p.as_ident().map(fold))
        .collect::<Option<_>>()?;
    let is_current_setting = match name.as_slice() {
        [n] | [_, n] if n == "current_setting" => name.len() == 1 || name[0] == "pg_catalog",
        _ => false,
    };
    if !is_current_setting || f.filter.is_some() || f.over.is_some() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let [sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(Expr::Value(v)))] =
        list.args.as_slice()
    else {
        return None;
    };
    match &v.value {
        Value::SingleQuotedString(s) if s.starts_with("pgveil.") && s.len() > 7 => {
            Some(Predicate::Setting(s.clone()))
        }
        _ => None,
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_are_spelled_out_and_columns_qualified() {
        let p = Predicate::parse("owner = current_user").unwrap();
        assert_eq!(
            p.sql("t"),
            "(\"t\".\"owner\" OPERATOR(pg_catalog.=) CURRENT_USER)"
        );
        let p = Predicate::parse("region IN ('north', 'south') AND NOT archived").unwrap();
        assert_eq!(p.columns(), ["region", "archived"]);
        assert!(p.sql("c").contains("OPERATOR(pg_catalog.=) 'south'"));
        let p = Predicate::parse("tier between 1 and -3 or owner like 'a%'").unwrap();
        assert!(
            p.sql("c").contains("OPERATOR(pg_catalog.~~) 'a%'"),
            "{}",
            p.sql("c")
        );
        assert!(p.sql("c").contains("-3"));
        let p = Predicate::parse("team = current_setting('pgveil.team')").unwrap();
        assert!(p
            .sql("c")
            .contains("pg_catalog.current_setting('pgveil.team', true)"));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "owner = lower(current_user)",
            "owner = (SELECT current_user)",
            "EXISTS (SELECT 1)",
            "c.owner = current_user",
            "owner::text = 'x'",
            "id + 1 = 2",
            "owner = current_setting('search_path')",
            "owner = $1",
            "owner = current_user; DROP TABLE t",
            "current_user = 'x'",
            "owner = current_user OR",
        ] {
            assert!(Predicate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn required_values_only_of_plain_equalities() {
        let p = Predicate::parse("owner = current_user AND region = 'north'").unwrap();
        let req = p.required_values().unwrap();
        assert_eq!(req[0], ("owner", &Predicate::CurrentUser));
        assert_eq!(req[1].0, "region");
        assert!(Predicate::parse("owner = current_user OR region = 'north'")
            .unwrap()
            .required_values()
            .is_none());
        assert!(Predicate::parse("owner = NULL")
            .unwrap()
            .required_values()
            .is_none());
    }
}
