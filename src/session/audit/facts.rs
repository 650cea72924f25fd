//! What a session's audit records say about a statement: its kind, the tables it names
//! (resolved along the session's search_path), and which sensitive columns it reads, masked
//! or in clear. Facts are cached per session by literal-free statement shape; cursors and
//! SQL prepared statements carry their query's facts to FETCH and EXECUTE.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::rules::Rules;
use crate::identity::SessionIdentity;
use crate::sql::analysis::{Analysed, Analysis, FactsCache};
use crate::sql::audit::{PartFacts, UNREADABLE};
use crate::sql::lex::{Lexed, Token};

/// Facts kept per session; past this the cache starts over.
const CACHE: usize = 1024;

/// Sensitive columns (those any mask rule names), by `schema.table`, with whether this
/// session reads each in clear.
#[derive(Debug, Default)]
pub struct Sensitive {
    by_table: HashMap<String, Vec<(String, String, bool)>>,
    /// Views, by `schema.table`, and the tables they read.
    views: HashMap<String, Vec<String>>,
}

impl Sensitive {
    pub fn build(
        rules: &Rules,
        identity: &SessionIdentity,
        catalog: Option<&Catalog>,
    ) -> Sensitive {
        let mut s = Sensitive::default();
        for rule in &rules.masks {
            let c = &rule.column;
            let table = format!("{}.{}", c.schema, c.table);
            let clear = !crate::policy::masks::applies(rule, identity);
            let cols = s.by_table.entry(table.clone()).or_default();
            match cols.iter_mut().find(|(name, _, _)| *name == c.column) {
                // Masked if any rule masks it for this session.
                Some(existing) => existing.2 &= clear,
                None => cols.push((c.column.clone(), format!("{table}.{}", c.column), clear)),
            }
        }
        if let Some(catalog) = catalog {
            for rel in catalog.relations().filter(|r| !r.reads.is_empty()) {
                let reads: Vec<String> = rel
                    .reads
                    .iter()
                    .filter_map(|oid| catalog.by_oid(*oid))
                    .map(|r| r.qualified())
                    .filter(|q| s.by_table.contains_key(q))
                    .collect();
                if !reads.is_empty() {
                    s.views.insert(rel.qualified(), reads);
                }
            }
        }
        s
    }

    fn is_empty(&self) -> bool {
        self.by_table.is_empty()
    }
}

/// A statement's facts as this session's records state them.
#[derive(Debug, Default)]
pub struct Facts {
    pub kind: &'static str,
    pub tables: Vec<String>,
    pub masked: Vec<String>,
    pub clear: Vec<String>,
    /// Reads a table with sensitive columns.
    pub sensitive_table: bool,
    pub unanalysed: bool,
    defines: Option<String>,
    uses: Option<String>,
}

impl Facts {
    /// Whether the statement may read a masked table: it does, or the audit could not read
    /// it (fail closed). Such statements count toward alerts and are refused while blocked.
    pub fn may_read_sensitive(&self) -> bool {
        self.sensitive_table || self.unanalysed
    }
}

impl Facts {
    /// What a statement of `kind` that runs this one (a FETCH of its cursor, an EXECUTE
    /// of its prepared statement) reads.
    fn inherited(&self, kind: &'static str) -> Facts {
        Facts {
            kind,
            tables: self.tables.clone(),
            masked: self.masked.clone(),
            clear: self.clear.clone(),
            sensitive_table: self.sensitive_table,
            unanalysed: self.unanalysed,
            defines: None,
            uses: None,
        }
    }

    /// For what cannot be analysed at all (a fast-path call, an unknown portal).
    pub fn opaque(kind: &'static str) -> Facts {
        Facts {
            kind,
            unanalysed: true,
            ..Default::default()
        }
    }
}

/// The session's resolution of statement facts (names along its search_path, sensitive
/// columns as its rules see them), kept by shape, with what resolving them needs.
pub struct Resolutions {
    redact: bool,
    catalog: Option<Arc<Catalog>>,
    search_path: Vec<String>,
    pub sensitive: Sensitive,
    cache: HashMap<Box<str>, Arc<Facts>>,
    /// Cursors and SQL prepared statements, by name, with the text that defined them.
    named: HashMap<String, (Arc<str>, Arc<Facts>)>,
}

impl Resolutions {
    pub fn new(
        redact: bool,
        catalog: Option<Arc<Catalog>>,
        search_path: Vec<String>,
        sensitive: Sensitive,
    ) -> Resolutions {
        Resolutions {
            redact,
            catalog,
            search_path,
            sensitive,
            cache: HashMap::new(),
            named: HashMap::new(),
        }
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_deref()
    }

    /// After pgveil read the catalog again: names resolve in it, and cached facts go.
    pub fn replace_catalog(&mut self, catalog: Arc<Catalog>, sensitive: Sensitive) {
        self.catalog = Some(catalog);
        self.replace_sensitive(sensitive);
    }

    /// After a rules reload: other sensitive columns, so cached facts go.
    pub fn replace_sensitive(&mut self, sensitive: Sensitive) {
        self.sensitive = sensitive;
        self.cache.clear();
    }

    /// Whether `table` (`schema.table`) has sensitive columns or is a view over one.
    pub fn is_sensitive(&self, table: &str) -> bool {
        self.sensitive.by_table.contains_key(table) || self.sensitive.views.contains_key(table)
    }

    /// A Parse's statement text and facts (the whole string: the server refuses a
    /// prepared statement with more than one command). `analysed` is the text read as the
    /// server reads it, `None` when pgveil cannot tell; its facts come from `cache`.
    pub fn whole(
        &mut self,
        sql: &str,
        analysed: Option<&Analysed<'_>>,
        cache: &mut FactsCache,
    ) -> (Arc<str>, Arc<Facts>) {
        match analysed {
            Some(Ok(analysis)) if analysis.parts().len() == 1 => {
                let lexed = analysis.lexed();
                let facts = self.facts_of(analysis, 0, cache);
                let text = self.text_of(sql, sql.trim(), lexed.statement_tokens());
                self.remember(&text, &facts);
                (text, facts)
            }
            Some(Ok(analysis)) => {
                let facts = Arc::new(self.resolve(&analysis.whole(cache).audit));
                let text = self.text_of(sql, sql.trim(), analysis.lexed().statement_tokens());
                (text, facts)
            }
            _ => self.unread(sql.trim()),
        }
    }

    /// The statements of a query string, each with its text and facts.
    pub fn parts(
        &mut self,
        sql: &str,
        analysed: Option<&Analysed<'_>>,
        cache: &mut FactsCache,
    ) -> Vec<(Arc<str>, Arc<Facts>)> {
        let Some(Ok(analysis)) = analysed else {
            let sql = sql.trim();
            return if sql.is_empty() {
                Vec::new()
            } else {
                vec![self.unread(sql)]
            };
        };
        let lexed = analysis.lexed();
        analysis
            .parts()
            .iter()
            .enumerate()
            .map(|(i, range)| {
                let facts = self.facts_of(analysis, i, cache);
                let text = self.text_of(sql, &sql[range.clone()], lexed.within(range));
                self.remember(&text, &facts);
                (text, facts)
            })
            .collect()
    }

    /// Cursors and SQL prepared statements carry their query's facts (and the text that
    /// defined them) to FETCH, EXECUTE and the protocol Execute of a cursor.
    fn remember(&mut self, text: &Arc<str>, facts: &Arc<Facts>) {
        if let Some(name) = &facts.defines {
            self.named
                .insert(name.clone(), (text.clone(), facts.clone()));
        }
    }

    /// What a protocol Execute of `portal` reads when no Bind made it: the SQL cursor of
    /// that name (`DECLARE`), as the record of a `fetch` with the cursor's tables and
    /// columns, and its text said to come from the cursor's declaration.
    pub fn cursor(&self, portal: &str) -> Option<(Arc<str>, Arc<Facts>)> {
        let (text, declared) = self.named.get(portal)?;
        let text = format!("/* protocol Execute of cursor \"{portal}\" */ {text}");
        Some((Arc::from(text), Arc::new(declared.inherited("fetch"))))
    }

    /// A statement pgveil cannot read as the server does: recorded unanalysed.
    fn unread(&mut self, sql: &str) -> (Arc<str>, Arc<Facts>) {
        let facts = Arc::new(self.resolve(&PartFacts::unanalysed()));
        let text = if self.redact {
            Arc::from(UNREADABLE)
        } else {
            Arc::from(sql)
        };
        (text, facts)
    }

    /// The audit text of `part` of the query string `sql`, whose tokens are `tokens`.
    fn text_of(&self, sql: &str, part: &str, tokens: &[Token<'_>]) -> Arc<str> {
        if self.redact {
            Arc::from(Lexed::redacted(sql, tokens))
        } else {
            Arc::from(part)
        }
    }

    /// The facts of statement `i` of `analysis`, as this session's records state them
    /// (resolved once per shape).
    fn facts_of(
        &mut self,
        analysis: &Analysis<'_>,
        i: usize,
        cache: &mut FactsCache,
    ) -> Arc<Facts> {
        let shape = analysis.shape(i);
        let facts = match self.cache.get(shape) {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(self.resolve(&analysis.facts(cache)[i].audit));
                if self.cache.len() >= CACHE {
                    self.cache.clear();
                }
                self.cache.insert(Box::from(shape), f.clone());
                f
            }
        };
        if let Some((_, used)) = facts.uses.as_ref().and_then(|n| self.named.get(n)) {
            let mut inherited = used.inherited(facts.kind);
            inherited.unanalysed |= facts.unanalysed;
            return Arc::new(inherited);
        }
        facts
    }

    /// Names resolved to `schema.table`, and the sensitive columns the statement reads.
    fn resolve(&self, part: &PartFacts) -> Facts {
        let tables: BTreeSet<String> = part
            .relations
            .iter()
            .map(|parts| self.qualify(parts))
            .collect();
        let mut masked = BTreeSet::new();
        let mut clear = BTreeSet::new();
        let mut sensitive_table = false;
        if !self.sensitive.is_empty() {
            let mut read: Vec<&String> = tables.iter().collect();
            for t in &tables {
                if let Some(bases) = self.sensitive.views.get(t) {
                    read.extend(bases);
                }
            }
            for t in read {
                let Some(cols) = self.sensitive.by_table.get(t) else {
                    continue;
                };
                sensitive_table = true;
                for (name, qualified, is_clear) in cols {
                    if part.all_columns || part.columns.contains(name) {
                        if *is_clear {
                            clear.insert(qualified.clone());
                        } else {
                            masked.insert(qualified.clone());
                        }
                    }
                }
            }
        }
        Facts {
            kind: part.kind,
            tables: tables.into_iter().collect(),
            masked: masked.into_iter().collect(),
            clear: clear.into_iter().collect(),
            sensitive_table,
            unanalysed: part.unanalysed,
            defines: part.defines.clone(),
            uses: part.uses.clone(),
        }
    }

    fn qualify(&self, parts: &[String]) -> String {
        match parts {
            [name] => self
                .catalog
                .as_ref()
                .and_then(|c| c.resolve(&self.search_path, name))
                .map(|r| r.qualified())
                .unwrap_or_else(|| name.clone()),
            [.., schema, name] => format!("{schema}.{name}"),
            [] => String::new(),
        }
    }
}
