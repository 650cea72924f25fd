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
SELECT DISTINCT 'k', conrelid::text, confrelid::text, confdeltype::text, confupdtype::text \
 FROM pg_catalog.pg_constraint WHERE contype = 'f'; \
SELECT 't', t.tgrelid::text, t.tgname::text, t.tgenabled::text, t.tgtype::text, \
 (t.tgqual IS NOT NULL)::text, t.tgisinternal::text, (t.tgconstraint <> 0)::text, \
 COALESCE(t.tgoldtable::text, ''), fn.nspname::text, p.proname::text, l.lanname::text, \
 p.prosecdef::text, pg_catalog.array_to_string(p.proconfig, pg_catalog.chr(10)), \
 pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(p.prosrc, \
 pg_catalog.getdatabaseencoding())), 'hex'), pg_catalog.pg_get_userbyid(p.proowner)::text, \
 (SELECT pg_catalog.pg_get_userbyid(b.nspowner)::text FROM pg_catalog.pg_namespace b \
 WHERE b.nspname = 'pgveil_trash') \
 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
 JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace \
 JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
 WHERE t.tgname IN ('pgveil_trash_delete', 'pgveil_trash_truncate')";

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

/// A trigger named like one of the recycle bin's, with what makes it the capture `pgveil
/// trash init` installs or not: the trigger as `pg_trigger` has it and the function it
/// calls as `pg_proc` has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CaptureTrigger {
    /// `tgenabled`: `O` and `A` fire in an ordinary session.
    enabled: char,
    /// `tgtype`: timing, events and level.
    tgtype: i16,
    /// A `WHEN` condition (`tgqual`).
    has_when: bool,
    internal: bool,
    constraint: bool,
    /// `tgoldtable`, empty when none.
    old_table: String,
    function_schema: String,
    function_name: String,
    language: String,
    security_definer: bool,
    /// `proconfig`, one setting a line.
    config: String,
    /// SHA-256 of `prosrc`, lowercase hex.
    body_digest: String,
    owner: String,
    /// The owner of schema `pgveil_trash`.
    bin_owner: String,
}

impl CaptureTrigger {
    /// Why this trigger, `name` on `table`, is not the capture `trash init` installs:
    /// every reason, empty when it is.
    fn problems(&self, name: &str, table: &str) -> Vec<String> {
        use crate::trash;
        let this = format!("trigger {name} on {table}");
        let mut out = Vec::new();
        let (schema, function) = trash::CAPTURE_FUNCTION;
        let calls_capture =
            (self.function_schema.as_str(), self.function_name.as_str()) == (schema, function);
        if !calls_capture {
            out.push(format!(
                "{this} calls {}.{}(), not {schema}.{function}()",
                self.function_schema, self.function_name
            ));
        }
        match self.enabled {
            'O' | 'A' => {}
            'D' => out.push(format!("{this} is disabled")),
            'R' => out.push(format!("{this} is set to fire in replica mode only")),
            c => out.push(format!("{this} is not enabled (tgenabled {c:?})")),
        }
        if self.internal {
            out.push(format!("{this} is an internal trigger"));
        }
        if self.constraint {
            out.push(format!("{this} is a constraint trigger"));
        }
        let expected = if name == trash::DELETE_TRIGGER {
            trash::DELETE_TRIGGER_TYPE
        } else {
            trash::TRUNCATE_TRIGGER_TYPE
        };
        if self.tgtype != expected {
            out.push(format!(
                "{this} fires {}, not {} as pgveil installs it",
                describe_trigger_type(self.tgtype),
                describe_trigger_type(expected)
            ));
        }
        if self.has_when {
            out.push(format!("{this} has a WHEN condition"));
        }
        // The capture reads the deleted rows from this transition table (a TRUNCATE
        // trigger cannot have one).
        if name == trash::DELETE_TRIGGER && self.old_table != trash::TRANSITION_TABLE {
            out.push(format!(
                "{this} does not pass the deleted rows as transition table {}",
                trash::TRANSITION_TABLE
            ));
        }
        if !calls_capture {
            return out;
        }
        let capture = format!("{schema}.{function}()");
        if self.body_digest != trash::capture_body_digest() {
            out.push(format!(
                "{capture} was replaced: its body is not the one pgveil installs"
            ));
        }
        if self.language != trash::CAPTURE_LANGUAGE {
            out.push(format!(
                "{capture} is written in {}, not {}",
                self.language,
                trash::CAPTURE_LANGUAGE
            ));
        }
        if !self.security_definer {
            out.push(format!("{capture} is not SECURITY DEFINER"));
        }
        if self.config != trash::CAPTURE_CONFIG {
            let config = match self.config.as_str() {
                "" => "no settings".to_string(),
                c => format!("settings {:?}", c.replace('\n', "; ")),
            };
            out.push(format!(
                "{capture} runs with {config}, not {:?} as pgveil installs it",
                trash::CAPTURE_CONFIG
            ));
        }
        if self.owner != self.bin_owner {
            out.push(format!(
                "{capture} is owned by {}, not by {}, the owner of schema {schema}",
                self.owner, self.bin_owner
            ));
        }
        out
    }
}

/// `pg_trigger.tgtype` as SQL: `AFTER DELETE FOR EACH STATEMENT`.
fn describe_trigger_type(tgtype: i16) -> String {
    let timing = if tgtype & (1 << 6) != 0 {
        "INSTEAD OF"
    } else if tgtype & (1 << 1) != 0 {
        "BEFORE"
    } else {
        "AFTER"
    };
    let events: Vec<&str> = [
        (1 << 2, "INSERT"),
        (1 << 3, "DELETE"),
        (1 << 4, "UPDATE"),
        (1 << 5, "TRUNCATE"),
    ]
    .into_iter()
    .filter(|(bit, _)| tgtype & bit != 0)
    .map(|(_, event)| event)
    .collect();
    let events = if events.is_empty() {
        "no event".to_string()
    } else {
        events.join(" OR ")
    };
    let level = if tgtype & 1 != 0 { "ROW" } else { "STATEMENT" };
    format!("{timing} {events} FOR EACH {level}")
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
    /// Tables whose deleted (and, apart, updated) rows change rows through a foreign key's
    /// ON DELETE (ON UPDATE) CASCADE, SET NULL or SET DEFAULT.
    cascading_deletes: HashSet<u32>,
    cascading_updates: HashSet<u32>,
    /// Triggers named like the recycle bin's, by (table, trigger name).
    trash_triggers: HashMap<(u32, String), CaptureTrigger>,
}

impl Catalog {
    /// Whether deleting rows of table `oid` (`update`: updating them) also changes rows
    /// through a foreign key's action (CASCADE, SET NULL, SET DEFAULT).
    pub fn cascades(&self, oid: u32, update: bool) -> bool {
        match update {
            false => self.cascading_deletes.contains(&oid),
            true => self.cascading_updates.contains(&oid),
        }
    }

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

    /// Why the recycle-bin trigger `name` (`DELETE_TRIGGER` or `TRUNCATE_TRIGGER`) on table
    /// `oid` would not keep the rows it should, every reason `; `-separated; `None` when
    /// it is the capture `pgveil trash init` installs, intact: enabled (`O` or `A`), not
    /// internal nor a constraint trigger, with init's timing, events and level, no `WHEN`
    /// condition and its transition table, calling `pgveil_trash.capture()` whose body is
    /// the one pgveil installs (by digest), in plpgsql, `SECURITY DEFINER` with init's
    /// settings and owned by the owner of schema `pgveil_trash`.
    pub fn trash_trigger_problem(&self, oid: u32, name: &str) -> Option<String> {
        let problems = self.trash_trigger_problems(oid, name);
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    fn trash_trigger_problems(&self, oid: u32, name: &str) -> Vec<String> {
        let table = self
            .by_oid(oid)
            .map_or_else(|| format!("table {oid}"), |r| r.qualified());
        match self.trash_triggers.get(&(oid, name.to_string())) {
            None => vec![format!("trigger {name} on {table} is missing")],
            Some(trigger) => trigger.problems(name, &table),
        }
    }

    /// Why table `schema.name`'s recycle bin would not keep deleted or truncated rows (the
    /// table is missing, or [`Catalog::trash_trigger_problem`] of either trigger), every
    /// reason once, `; `-separated; `None` when its capture is intact.
    pub fn recycle_bin_problem(&self, schema: &str, name: &str) -> Option<String> {
        let Some(rel) = self.relation(schema, name) else {
            return Some(format!("table {schema}.{name} does not exist"));
        };
        let mut problems: Vec<String> = Vec::new();
        for trigger in [crate::trash::DELETE_TRIGGER, crate::trash::TRUNCATE_TRIGGER] {
            for p in self.trash_trigger_problems(rel.oid, trigger) {
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// Whether table `schema.name` exists with both recycle-bin triggers intact (see
    /// [`Catalog::recycle_bin_problem`]).
    pub fn recycle_bin_ready(&self, schema: &str, name: &str) -> bool {
        self.recycle_bin_problem(schema, name).is_none()
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
    cascading_deletes: HashSet<u32>,
    cascading_updates: HashSet<u32>,
    trash_triggers: HashMap<(u32, String), CaptureTrigger>,
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
                    // An action that is not NO ACTION or RESTRICT changes other rows (an
                    // unknown one counts as changing).
                    let changes = |action: String| !matches!(action.as_str(), "a" | "r");
                    if changes(col(3)) {
                        self.cascading_deletes.insert(to);
                    }
                    if changes(col(4)) {
                        self.cascading_updates.insert(to);
                    }
                }
            }
            // A value that cannot be read counts against the trigger.
            "t" => {
                if let Ok(oid) = col(1).parse() {
                    let trigger = CaptureTrigger {
                        enabled: col(3).chars().next().unwrap_or('?'),
                        tgtype: col(4).parse().unwrap_or(-1),
                        has_when: col(5) != "false",
                        internal: col(6) != "false",
                        constraint: col(7) != "false",
                        old_table: col(8),
                        function_schema: col(9),
                        function_name: col(10),
                        language: col(11),
                        security_definer: col(12) == "true",
                        config: col(13),
                        body_digest: col(14),
                        owner: col(15),
                        bin_owner: col(16),
                    };
                    self.trash_triggers.insert((oid, col(2)), trigger);
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
            cascading_deletes: self.cascading_deletes,
            cascading_updates: self.cascading_updates,
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

    /// A `t` row of [`CATALOG_QUERY`] for trigger `name` on table 100 as `trash init`
    /// installs it, with `change` applied to its columns.
    fn capture_row(name: &str, change: impl FnOnce(&mut Vec<String>)) -> Vec<String> {
        let tgtype = if name == crate::trash::DELETE_TRIGGER {
            crate::trash::DELETE_TRIGGER_TYPE
        } else {
            crate::trash::TRUNCATE_TRIGGER_TYPE
        };
        let old_table = if name == crate::trash::DELETE_TRIGGER {
            crate::trash::TRANSITION_TABLE
        } else {
            ""
        };
        let mut row: Vec<String> = [
            "t",
            "100",
            name,
            "O",
            &tgtype.to_string(),
            "false",
            "false",
            "false",
            old_table,
            "pgveil_trash",
            "capture",
            "plpgsql",
            "true",
            crate::trash::CAPTURE_CONFIG,
            crate::trash::capture_body_digest(),
            "crm_owner",
            "crm_owner",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        change(&mut row);
        row
    }

    /// Catalog rows of a customers table with one column, to add triggers to.
    fn customers_rows() -> CatalogRows {
        let mut rows = CatalogRows::default();
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
        rows
    }

    /// The customers table with both capture triggers, `change` applied to the DELETE one.
    fn bin_problem(change: impl FnOnce(&mut Vec<String>)) -> Option<String> {
        let mut rows = customers_rows();
        for r in [
            capture_row(crate::trash::DELETE_TRIGGER, change),
            capture_row(crate::trash::TRUNCATE_TRIGGER, |_| {}),
        ] {
            let r: Vec<&str> = r.iter().map(String::as_str).collect();
            rows.push(&row(&r));
        }
        let cat = rows.finish();
        assert_eq!(
            cat.recycle_bin_ready("public", "customers"),
            cat.recycle_bin_problem("public", "customers").is_none()
        );
        cat.recycle_bin_problem("public", "customers")
    }

    #[test]
    fn the_recycle_bin_is_ready_only_with_the_capture_init_installs() {
        assert_eq!(bin_problem(|_| {}), None);
        let this = "trigger pgveil_trash_delete on public.customers";
        type Change = Box<dyn FnOnce(&mut Vec<String>)>;
        let cases: Vec<(Change, String)> = vec![
            (Box::new(|r| r[3] = "D".into()), format!("{this} is disabled")),
            (
                Box::new(|r| r[3] = "R".into()),
                format!("{this} is set to fire in replica mode only"),
            ),
            (Box::new(|r| r[3] = "A".into()), String::new()),
            (
                Box::new(|r| r[4] = "4".into()),
                format!("{this} fires AFTER INSERT FOR EACH STATEMENT, not AFTER DELETE FOR EACH STATEMENT as pgveil installs it"),
            ),
            (
                Box::new(|r| r[4] = "10".into()),
                format!("{this} fires BEFORE DELETE FOR EACH STATEMENT, not AFTER DELETE"),
            ),
            (Box::new(|r| r[4] = "9".into()), "AFTER DELETE FOR EACH ROW, not".into()),
            (Box::new(|r| r[4] = "x".into()), format!("{this} fires ")),
            (
                Box::new(|r| r[5] = "true".into()),
                format!("{this} has a WHEN condition"),
            ),
            (
                Box::new(|r| r[6] = "true".into()),
                format!("{this} is an internal trigger"),
            ),
            (
                Box::new(|r| r[7] = "true".into()),
                format!("{this} is a constraint trigger"),
            ),
            (
                Box::new(|r| r[8] = "other".into()),
                format!("{this} does not pass the deleted rows as transition table pgveil_trash_old"),
            ),
            (
                Box::new(|r| {
                    r[9] = "public".into();
                    r[10] = "noop".into();
                    r[14] = "0".into();
                }),
                format!("{this} calls public.noop(), not pgveil_trash.capture()"),
            ),
            (
                Box::new(|r| r[11] = "plpython3u".into()),
                "pgveil_trash.capture() is written in plpython3u, not plpgsql".into(),
            ),
            (
                Box::new(|r| r[12] = "false".into()),
                "pgveil_trash.capture() is not SECURITY DEFINER".into(),
            ),
            (
                Box::new(|r| r[13] = String::new()),
                "pgveil_trash.capture() runs with no settings, not \"search_path=pg_catalog, pg_temp\"".into(),
            ),
            (
                Box::new(|r| r[14] = "0".repeat(64)),
                "pgveil_trash.capture() was replaced: its body is not the one pgveil installs".into(),
            ),
            (
                Box::new(|r| r[15] = "mallory".into()),
                "pgveil_trash.capture() is owned by mallory, not by crm_owner, the owner of schema pgveil_trash".into(),
            ),
        ];
        for (change, expected) in cases {
            let problem = bin_problem(change);
            if expected.is_empty() {
                assert_eq!(problem, None);
            } else {
                let problem = problem.unwrap_or_default();
                assert!(problem.contains(&expected), "{problem} lacks {expected}");
            }
        }
        // A function problem is named once for both triggers.
        let mut rows = customers_rows();
        for name in [crate::trash::DELETE_TRIGGER, crate::trash::TRUNCATE_TRIGGER] {
            let r = capture_row(name, |r| r[12] = "false".into());
            let r: Vec<&str> = r.iter().map(String::as_str).collect();
            rows.push(&row(&r));
        }
        let cat = rows.finish();
        assert_eq!(
            cat.recycle_bin_problem("public", "customers").as_deref(),
            Some("pgveil_trash.capture() is not SECURITY DEFINER")
        );
        assert_eq!(
            cat.trash_trigger_problem(100, crate::trash::TRUNCATE_TRIGGER)
                .as_deref(),
            Some("pgveil_trash.capture() is not SECURITY DEFINER")
        );
        // Missing triggers, a missing table.
        assert_eq!(
            CatalogRows::default()
                .finish()
                .recycle_bin_problem("public", "customers"),
            Some("table public.customers does not exist".into())
        );
        let cat = crate::catalog::testing::crm_catalog();
        assert_eq!(
            cat.recycle_bin_problem("public", "deals").as_deref(),
            Some("trigger pgveil_trash_delete on public.deals is missing; trigger pgveil_trash_truncate on public.deals is missing")
        );
    }
}
