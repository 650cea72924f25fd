//! One analysis per statement, for every decision and the audit. A query string, as the
//! server reads it (see [`lex`](super::lex)), is split where the server splits it; each
//! statement is parsed at most once, and its literal-free facts (what the guard and the
//! audit read: kind, relations and columns, accesses, effects, functions called, why it
//! cannot be analysed) are kept per session by statement shape in one [`FactsCache`].
//! Masking takes the parsed statements themselves, since its rewrite changes them.
//!
//! Where sqlparser's reading disagrees with the server's split (one statement to the
//! server, none or several to sqlparser), the statement is unanalysable.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use sqlparser::ast::Statement;

use super::audit::{analyse_statement as audit_facts, PartFacts};
use super::guard::{analyse_statement as statement_guard_facts, StatementFacts};
use super::lex::{LexError, Lexed};

/// Statement facts kept per session; past this the cache starts over.
const CACHE: usize = 1024;

/// What one statement is and does, whatever its literals' values.
#[derive(Debug, Clone)]
pub struct Facts {
    /// What its audit record says (before names are resolved).
    pub audit: PartFacts,
    /// What the guard judges.
    pub guard: StatementFacts,
}

impl Facts {
    fn of(stmt: Option<&Statement>, tokens: &[super::lex::Token<'_>]) -> Facts {
        Facts {
            audit: audit_facts(stmt, tokens),
            guard: statement_guard_facts(stmt),
        }
    }

    /// Whether every statement of the same shape has these facts: not when they hold a
    /// value read from a literal (`SET search_path = 'a, b'`).
    fn shape_independent(&self) -> bool {
        self.guard.shape_independent()
    }
}

/// A session's statement facts, by shape.
#[derive(Debug, Default)]
pub struct FactsCache {
    by_shape: HashMap<Box<str>, Arc<Facts>>,
}

impl FactsCache {
    /// Forgets every statement (facts do not depend on the session, but a cache that
    /// outgrew its use should not be kept).
    pub fn clear(&mut self) {
        self.by_shape = HashMap::new();
    }
}

/// The guard's facts of a whole query string read under `strings`, analysed on its own
/// (a session goes through its [`FactsCache`]; this is for `explain` and tests).
pub fn guard_facts(sql: &str, strings: super::lex::Strings) -> StatementFacts {
    match super::lex::lex(sql, strings) {
        Ok(lexed) => Analysis::new(&lexed).guard_facts(&mut FactsCache::default()),
        Err(e) => StatementFacts {
            unanalysable: Some(format!("pgveil cannot read it as the server does: {e}")),
            ..Default::default()
        },
    }
}

/// A query string's analysis, or why pgveil cannot read it as the server does.
pub type Analysed<'l> = Result<Analysis<'l>, &'l LexError>;

/// A query string as the server reads it, parsed once, on first need.
pub struct Analysis<'l> {
    lexed: &'l Lexed<'l>,
    parts: OnceCell<Vec<Range<usize>>>,
    /// Each statement, parsed (`None` where sqlparser cannot read it as one statement),
    /// until masking takes them.
    parsed: RefCell<Option<Vec<Option<Statement>>>>,
    /// Each statement's shape (see `Lexed::shape_of`), one after the other.
    shapes: OnceCell<(String, Vec<Range<usize>>)>,
    facts: OnceCell<Vec<Arc<Facts>>>,
}

impl<'l> Analysis<'l> {
    /// The analysis of a text lexed as the server reads it.
    pub fn of(lexed: &'l Result<Lexed<'l>, LexError>) -> Analysed<'l> {
        lexed.as_ref().map(Analysis::new)
    }

    pub fn new(lexed: &'l Lexed<'l>) -> Analysis<'l> {
        Analysis {
            lexed,
            parts: OnceCell::new(),
            parsed: RefCell::new(None),
            shapes: OnceCell::new(),
            facts: OnceCell::new(),
        }
    }

    pub fn lexed(&self) -> &'l Lexed<'l> {
        self.lexed
    }

    /// The byte range of each statement in the text.
    pub fn parts(&self) -> &[Range<usize>] {
        self.parts.get_or_init(|| self.lexed.statements())
    }

    /// The facts of statement `i`, from its parse (made here if not yet).
    fn facts_of(&self, i: usize) -> Facts {
        let mut parsed = self.parsed.borrow_mut();
        let parsed =
            parsed.get_or_insert_with(|| self.parts().iter().map(|r| self.parse(r)).collect());
        Facts::of(parsed[i].as_ref(), self.lexed.within(&self.parts()[i]))
    }

    /// The statements of the string, to be judged and rewritten (owned: a rewrite
    /// changes them); `None` when one of them cannot be parsed as the server reads it.
    /// The facts' parse is handed over if there was one; else they are parsed here.
    pub fn statements(&self) -> Option<Vec<Statement>> {
        match self.parsed.borrow_mut().take() {
            Some(parsed) => parsed.into_iter().collect(),
            None => self.parts().iter().map(|r| self.parse(r)).collect(),
        }
    }

    fn parse(&self, range: &Range<usize>) -> Option<Statement> {
        match super::parse_tokens(self.lexed.within(range)) {
            Ok(mut s) if s.len() == 1 => s.pop(),
            _ => None,
        }
    }

    /// The shape of statement `i`: what the server reads of it but for literal values,
    /// the key under which its facts, and decisions on them, are kept.
    pub fn shape(&self, i: usize) -> &str {
        let parts = self.parts();
        if parts.len() == 1 {
            // The usual string of one statement: the shape the lexer keeps.
            let tokens = self.lexed.within(&parts[0]);
            let whole = self.lexed.statement_tokens();
            if std::ptr::eq(tokens.as_ptr(), whole.as_ptr()) && tokens.len() == whole.len() {
                return self.lexed.statement_shape();
            }
        }
        let (text, ranges) = self.shapes.get_or_init(|| {
            let mut text = String::new();
            let mut scratch = String::new();
            let ranges = parts
                .iter()
                .map(|part| {
                    let shape = self.lexed.shape_of(self.lexed.within(part), &mut scratch);
                    let start = text.len();
                    text.push_str(shape);
                    start..text.len()
                })
                .collect();
            (text, ranges)
        });
        &text[ranges[i].clone()]
    }

    /// The facts of each statement, in order: from `cache` by shape, or from this
    /// string's one parse.
    pub fn facts(&self, cache: &mut FactsCache) -> &[Arc<Facts>] {
        self.facts.get_or_init(|| {
            let parts = self.parts();
            (0..parts.len())
                .map(|i| {
                    let shape = self.shape(i);
                    if let Some(f) = cache.by_shape.get(shape) {
                        return f.clone();
                    }
                    let f = Arc::new(self.facts_of(i));
                    if f.shape_independent() {
                        if cache.by_shape.len() >= CACHE {
                            cache.by_shape.clear();
                        }
                        cache.by_shape.insert(Box::from(shape), f.clone());
                    }
                    f
                })
                .collect()
        })
    }

    /// The guard's facts of the whole string: each statement's, in order.
    pub fn guard_facts(&self, cache: &mut FactsCache) -> StatementFacts {
        StatementFacts::merge(self.facts(cache).iter().map(|f| &f.guard))
    }

    /// The audit facts of the string taken as one statement (a Parse: the server
    /// refuses to prepare more than one), unanalysed unless it is exactly one.
    pub fn whole(&self, cache: &mut FactsCache) -> Arc<Facts> {
        match self.facts(cache) {
            [one] => one.clone(),
            _ => Arc::new(Facts::of(None, &[])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::lex::{lex, Strings};

    #[test]
    fn one_parse_serves_every_statement_of_a_string() {
        let sql = "SELECT 1; DELETE FROM tasks WHERE id = 2;; UPDATE deals SET stage = 'x'";
        let lexed = lex(sql, Strings::Standard).unwrap();
        let analysis = Analysis::new(&lexed);
        let mut cache = FactsCache::default();
        let kinds: Vec<_> = analysis
            .facts(&mut cache)
            .iter()
            .map(|f| f.audit.kind)
            .collect();
        assert_eq!(kinds, ["select", "delete", "update"]);
        assert_eq!(
            analysis.guard_facts(&mut cache).kinds,
            ["select", "delete", "update"]
        );
        assert_eq!(analysis.statements().unwrap().len(), 3);
        // A statement of the same shape reads its facts from the cache.
        let other = lex("DELETE FROM tasks WHERE id = 99", Strings::Standard).unwrap();
        let analysis = Analysis::new(&other);
        let cached = analysis.facts(&mut cache)[0].clone();
        let lexed = lex(sql, Strings::Standard).unwrap();
        let first = Analysis::new(&lexed).facts(&mut cache)[1].clone();
        assert!(Arc::ptr_eq(&cached, &first));
    }

    #[test]
    fn facts_read_from_a_literal_are_not_shared_by_shape() {
        let mut cache = FactsCache::default();
        let path = |sql: &str, cache: &mut FactsCache| {
            let lexed = lex(sql, Strings::Standard).unwrap();
            Analysis::new(&lexed).guard_facts(cache).effects
        };
        let a = path("SET search_path = 'a'", &mut cache);
        let b = path("SET search_path = 'b'", &mut cache);
        assert_ne!(a, b);
    }

    #[test]
    fn a_statement_sqlparser_reads_otherwise_is_unanalysable() {
        let lexed = lex("SELECT 1 SELECT 2", Strings::Standard).unwrap();
        let analysis = Analysis::new(&lexed);
        let mut cache = FactsCache::default();
        assert!(analysis.statements().is_none());
        assert!(analysis.guard_facts(&mut cache).unanalysable.is_some());
        assert!(analysis.whole(&mut cache).audit.unanalysed);
    }
}
