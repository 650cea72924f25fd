//! What pgveil knows of a database's schema: relations with their columns and types,
//! which tables each view reads (transitively), and the functions that are not built in.
//! Read from the catalog on a session's own upstream connection, cached per database.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One multi-statement query, one round trip; each row starts with its kind.
pub const CATALOG_QUERY: &str = "\
SELECT 'search_path', pg_catalog.set_config('search_path', 'pg_catalog', true); \
SELECT 'c', n.nspname::text, c.relname::text, c.oid::text, c.relkind::text, a.attname::text, \
 a.attnum::text, a.atttypid::text, t.typname::text \
 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
 JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f') \
 AND n.nspname <> 'information_schema' \
 AND (n.nspname !~ '^pg_(toast|temp)' OR n.oid = pg_catalog.pg_my_temp_schema()) \
 AND (n.nspname <> 'pg_catalog' OR c.relname IN ('pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs', 'pg_statistic')); \
SELECT DISTINCT 'v', r.ev_class::text, d.refobjid::text \
 FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d ON d.objid = r.oid \
 AND d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass \
 WHERE d.refobjid <> r.ev_class; \
SELECT DISTINCT 'f', n.nspname::text, p.proname::text FROM pg_catalog.pg_proc p \
 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'); \
SELECT DISTINCT 'b', n.nspname::text, p.proname::text FROM pg_catalog.pg_proc p \
 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
 WHERE n.nspname IN ('pg_catalog', 'information_schema') AND p.proowner = 10; \
SELECT 's', n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
 WHERE n.nspname IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'v'); \
SELECT 'i', inhrelid::text, inhparent::text FROM pg_catalog.pg_inherits; \
SELECT 'w', c.oid::text, pg_catalog.pg_get_viewdef(c.oid) FROM pg_catalog.pg_class c \
 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema'); \
SELECT DISTINCT 'k', conrelid::text, confrelid::text FROM pg_catalog.pg_constraint WHERE contype = 'f'; \
SELECT 't', tgrelid::text, tgname::text FROM pg_catalog.pg_trigger \
 WHERE tgname IN ('pgveil_trash_delete', 'pgveil_trash_truncate') AND tgenabled IN ('O', 'A')";

/// The savepoint [`catalog_query_in_block`] reads the catalog under.
const SAVEPOINT: &str = "pgveil_catalog_read";

/// [`CATALOG_QUERY`] for a session inside a transaction block: in a savepoint rolled back
/// at the end, so that its search_path (set for the transaction) does not outlive it and
/// the block goes on as it was. It sees what the block itself created or changed.
pub fn catalog_query_in_block() -> String {
    format!(
        "SAVEPOINT {SAVEPOINT}; {CATALOG_QUERY}; ROLLBACK TO SAVEPOINT {SAVEPOINT}; \
         RELEASE SAVEPOINT {SAVEPOINT}"
    )
}

/// After [`catalog_query_in_block`] failed (the block is then aborted): puts the block
/// back as it was before the savepoint.
pub const CATALOG_RECOVERY: &str =
    "ROLLBACK TO SAVEPOINT pgveil_catalog_read; RELEASE SAVEPOINT pgveil_catalog_read";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub attnum: i16,
    pub type_oid: u32,
    pub type_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `r` table, `v` view, `m` materialized view, `p` partitioned table, `f` foreign table.
    pub kind: char,
    pub columns: Vec<Column>,
    /// For views and materialized views: every relation they read, directly or through
    /// other views.
    pub reads: Vec<u32>,
    /// For views: the defining query, every name in it schema-qualified.
    pub definition: Option<String>,
}

impl Relation {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A database's schema as pgveil needs it.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    by_name: HashMap<(String, String), Arc<Relation>>,
    by_oid: HashMap<u32, Arc<Relation>>,
    /// Functions outside pg_catalog, by bare name and by `schema.name`.
    user_functions: HashSet<String>,
    /// Function names in pg_catalog.
    builtin_functions: HashSet<String>,
    /// Tables and views of pg_catalog and information_schema, by bare and qualified name.
    system_relations: HashSet<String>,
    /// Inheritance children and partitions, by parent.
    children: HashMap<u32, Vec<u32>>,
    /// Tables with a foreign key to a table, by the referenced table.
    referencing: HashMap<u32, Vec<u32>>,
    /// Enabled recycle-bin triggers: (table, trigger name).
    trash_triggers: HashSet<(u32, String)>,
}

impl Catalog {
    pub fn relation(&self, schema: &str, name: &str) -> Option<&Arc<Relation>> {
        self.by_name.get(&(schema.to_string(), name.to_string()))
    }

    pub fn by_oid(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.by_oid.get(&oid)
    }

    /// Every relation with this bare name, in any schema.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Arc<Relation>> + 'a {
        self.by_oid.values().filter(move |r| r.name == name)
    }

    /// Resolves an unqualified name along `search_path` (schema names, in order).
    pub fn resolve(&self, search_path: &[String], name: &str) -> Option<&Arc<Relation>> {
        search_path.iter().find_map(|s| self.relation(s, name))
    }

    /// Whether a function name (bare or `schema.name`) is defined outside pg_catalog.
    pub fn is_user_function(&self, name: &str) -> bool {
        self.user_functions.contains(name)
    }

    /// Whether a function name (bare, `pg_catalog.name` or `information_schema.name`) is
    /// one PostgreSQL ships.
    pub fn is_builtin_function(&self, name: &str) -> bool {
        self.builtin_functions.contains(name)
    }

    /// Whether a (folded, possibly qualified) name is a pg_catalog or information_schema
    /// relation.
    pub fn is_system_relation(&self, parts: &[String]) -> bool {
        match parts {
            [name] => self.system_relations.contains(name),
            [schema, name] | [_, schema, name] => {
                self.system_relations.contains(&format!("{schema}.{name}"))
            }
            _ => false,
        }
    }

    /// Every table that inherits from `oid` (children, partitions, their descendants).
    pub fn descendants(&self, oid: u32) -> Vec<u32> {
        transitive_reads(oid, &self.children)
    }

    pub fn relations(&self) -> impl Iterator<Item = &Arc<Relation>> {
        self.by_oid.values()
    }

    /// Every table a `TRUNCATE ... CASCADE` of `oid` also empties (foreign keys to it,
    /// transitively).
    pub fn referencing(&self, oid: u32) -> Vec<u32> {
        transitive_reads(oid, &self.referencing)
    }

    /// Whether `pgveil trash init` installed the recycle-bin trigger `name` on `oid` and it
    /// is enabled.
    pub fn has_trash_trigger(&self, oid: u32, name: &str) -> bool {
        self.trash_triggers.contains(&(oid, name.to_string()))
    }

    /// Whether table `schema.name` exists with both recycle-bin triggers enabled.
    pub fn recycle_bin_ready(&self, schema: &str, name: &str) -> bool {
        self.relation(schema, name).is_some_and(|rel| {
            self.has_trash_trigger(rel.oid, crate::trash::DELETE_TRIGGER)
                && self.has_trash_trigger(rel.oid, crate::trash::TRUNCATE_TRIGGER)
        })
    }
}

/// Builds a [`Catalog`] from the text rows of [`CATALOG_QUERY`].
#[derive(Default)]
pub struct CatalogRows {
    relations: HashMap<u32, Relation>,
    depends: Vec<(u32, u32)>,
    definitions: HashMap<u32, String>,
    inherits: Vec<(u32, u32)>,
    functions: HashSet<String>,
    builtins: HashSet<String>,
    system: HashSet<String>,
    references: Vec<(u32, u32)>,
    trash_triggers: HashSet<(u32, String)>,
}

impl CatalogRows {
    pub fn push(&mut self, row: &[Option<&[u8]>]) {
        let col = |i: usize| {
            row.get(i)
                .copied()
                .flatten()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        match col(0).as_str() {
            "c" => {
                let oid: u32 = col(3).parse().unwrap_or(0);
                let rel = self.relations.entry(oid).or_insert_with(|| Relation {
                    oid,
                    schema: col(1),
                    name: col(2),
                    kind: col(4).chars().next().unwrap_or('r'),
                    columns: Vec::new(),
                    reads: Vec::new(),
                    definition: None,
                });
                rel.columns.push(Column {
                    name: col(5),
                    attnum: col(6).parse().unwrap_or(0),
                    type_oid: col(7).parse().unwrap_or(0),
                    type_name: col(8),
                });
            }
            "v" => {
                if let (Ok(view), Ok(table)) = (col(1).parse(), col(2).parse()) {
                    self.depends.push((view, table));
                }
            }
            "f" => {
                self.functions.insert(col(2));
                self.functions.insert(format!("{}.{}", col(1), col(2)));
            }
            // Functions PostgreSQL ships: in pg_catalog or information_schema, owned by
            // the bootstrap superuser. information_schema's are named qualified only.
            "b" => {
                if col(1) == "pg_catalog" {
                    self.builtins.insert(col(2));
                }
                self.builtins.insert(format!("{}.{}", col(1), col(2)));
            }
            "i" => {
                if let (Ok(child), Ok(parent)) = (col(1).parse(), col(2).parse()) {
                    self.inherits.push((child, parent));
                }
            }
            "w" => {
                if let Ok(oid) = col(1).parse() {
                    let def = col(2);
                    self.definitions
                        .insert(oid, def.trim().trim_end_matches(';').to_string());
                }
            }
            "k" => {
                if let (Ok(from), Ok(to)) = (col(1).parse(), col(2).parse()) {
                    self.references.push((from, to));
                }
            }
            "t" => {
                if let Ok(oid) = col(1).parse() {
                    self.trash_triggers.insert((oid, col(2)));
                }
            }
            "s" => {
                // Only pg_catalog is searched implicitly; information_schema needs its name.
                if col(1) == "pg_catalog" {
                    self.system.insert(col(2));
                }
                self.system.insert(format!("{}.{}", col(1), col(2)));
            }
            _ => {}
        }
    }

    pub fn finish(mut self) -> Catalog {
        let mut direct: HashMap<u32, Vec<u32>> = HashMap::new();
        for (view, table) in &self.depends {
            direct.entry(*view).or_default().push(*table);
        }
        let mut by_oid = HashMap::new();
        let mut by_name = HashMap::new();
        for (oid, mut rel) in self.relations {
            rel.columns.sort_by_key(|c| c.attnum);
            rel.reads = transitive_reads(oid, &direct);
            rel.definition = self.definitions.remove(&oid);
            let rel = Arc::new(rel);
            by_name.insert((rel.schema.clone(), rel.name.clone()), rel.clone());
            by_oid.insert(oid, rel);
        }
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (child, parent) in &self.inherits {
            children.entry(*parent).or_default().push(*child);
        }
        let mut referencing: HashMap<u32, Vec<u32>> = HashMap::new();
        for (from, to) in &self.references {
            if from != to {
                referencing.entry(*to).or_default().push(*from);
            }
        }
        Catalog {
            children,
            referencing,
            trash_triggers: self.trash_triggers,
            by_name,
            by_oid,
            user_functions: self.functions,
            builtin_functions: self.builtins,
            system_relations: self.system,
        }
    }
}

fn transitive_reads(start: u32, direct: &HashMap<u32, Vec<u32>>) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut stack = direct.get(&start).cloned().unwrap_or_default();
    while let Some(next) = stack.pop() {
        if seen.insert(next) {
            if let Some(more) = direct.get(&next) {
                stack.extend(more);
            }
        }
    }
    let mut out: Vec<u32> = seen.into_iter().collect();
    out.sort();
    out
}

/// Splits a `search_path` setting into schema names, as the server resolves them for the
/// session (`"$user"` becomes the session user; `pg_catalog` comes first unless listed).
pub fn search_path_schemas(setting: &str, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in setting.split(',') {
        let p = part.trim();
        let name = if let Some(q) = p.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            q.replace("\"\"", "\"")
        } else {
            p.to_lowercase()
        };
        let name = if name == "$user" {
            user.to_string()
        } else {
            name
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    if !out.iter().any(|s| s == "pg_catalog") {
        out.insert(0, "pg_catalog".into());
    }
    out
}

/// A small CRM catalog, for tests, benchmarks and the fuzz target of the analyses (no
/// database needed).
pub mod testing {
    use super::{Catalog, CatalogRows};

    /// (column name, attribute number, type OID).
    type ColumnSpec<'a> = (&'a str, &'a str, &'a str);
    /// (table name, OID, columns).
    type TableSpec<'a> = (&'a str, u32, &'a [ColumnSpec<'a>]);

    /// `customers(id, name, phone, email, card)` and `deals(id, customer_id, amount)` in
    /// public, and a few pg_catalog functions.
    pub fn crm_catalog() -> Catalog {
        let mut rows = CatalogRows::default();
        let cols: [TableSpec<'_>; 2] = [
            (
                "customers",
                100,
                &[
                    ("id", "1", "20"),
                    ("name", "2", "25"),
                    ("phone", "3", "25"),
                    ("email", "4", "25"),
                    ("card", "5", "25"),
                ],
            ),
            (
                "deals",
                200,
                &[
                    ("id", "1", "20"),
                    ("customer_id", "2", "20"),
                    ("amount", "3", "1700"),
                ],
            ),
        ];
        for (table, oid, columns) in cols {
            for (name, attnum, ty) in columns {
                let type_name = match *ty {
                    "20" => "int8",
                    "1700" => "numeric",
                    _ => "text",
                };
                let oid = oid.to_string();
                let row: Vec<&str> =
                    vec!["c", "public", table, &oid, "r", name, attnum, ty, type_name];
                rows.push(&row.iter().map(|s| Some(s.as_bytes())).collect::<Vec<_>>());
            }
        }
        for b in [
            "upper",
            "lower",
            "substr",
            "length",
            "count",
            "sum",
            "string_agg",
            "row_to_json",
            "concat",
            "now",
        ] {
            rows.push(&[
                Some(b"b".as_slice()),
                Some(b"pg_catalog".as_slice()),
                Some(b.as_bytes()),
            ]);
        }
        rows.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(v: &'a [&'a str]) -> Vec<Option<&'a [u8]>> {
        v.iter().map(|s| Some(s.as_bytes())).collect()
    }

    #[test]
    fn builds_relations_views_and_functions() {
        let mut rows = CatalogRows::default();
        rows.push(&row(&[
            "c",
            "public",
            "customers",
            "100",
            "r",
            "phone",
            "3",
            "25",
            "text",
        ]));
        rows.push(&row(&[
            "c",
            "public",
            "customers",
            "100",
            "r",
            "id",
            "1",
            "20",
            "int8",
        ]));
        rows.push(&row(&[
            "c", "public", "v1", "200", "v", "phone", "1", "25", "text",
        ]));
        rows.push(&row(&[
            "c", "public", "v2", "300", "v", "phone", "1", "25", "text",
        ]));
        rows.push(&row(&["v", "200", "100"]));
        rows.push(&row(&["v", "300", "200"]));
        rows.push(&row(&["f", "public", "leak"]));
        let cat = rows.finish();
        let c = cat.relation("public", "customers").unwrap();
        assert_eq!(c.columns[0].name, "id");
        assert_eq!(cat.by_oid(300).unwrap().reads, vec![100, 200]);
        assert!(cat.is_user_function("leak") && cat.is_user_function("public.leak"));
        assert!(!cat.is_user_function("upper"));
        let path = search_path_schemas("\"$user\", public", "alice");
        assert_eq!(path, vec!["pg_catalog", "alice", "public"]);
        assert_eq!(cat.resolve(&path, "customers").unwrap().oid, 100);
    }
}
