//! `pgveil trash init|list|restore|purge`: the recycle bin, from the command line.

use std::process::ExitCode;

use super::{TrashCommand, TrashSelection};
use crate::trash::{self, Selection, TrashError};

impl From<TrashSelection> for Selection {
    fn from(s: TrashSelection) -> Selection {
        Selection {
            table: s.table,
            since: s.since,
            until: s.until,
            ids: s.ids,
        }
    }
}

/// Runs one trash command: exit 0 done, 1 refused (nothing changed), 2 failed.
pub fn run(command: TrashCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgveil trash: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(execute(command)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(TrashError::Refused(m)) => {
            eprintln!("pgveil trash: {m}");
            ExitCode::from(1)
        }
        Err(TrashError::Database(m)) => {
            eprintln!("pgveil trash: {m}");
            ExitCode::from(2)
        }
    }
}

async fn execute(command: TrashCommand) -> Result<String, TrashError> {
    let connect = |url: String| async move {
        super::inspect::connect(&url)
            .await
            .map_err(TrashError::Database)
    };
    match command {
        TrashCommand::Init {
            upstream_url,
            rules,
        } => {
            let rules = super::inspect::load_rules(&rules)
                .map_err(|_| TrashError::Refused("the rules are invalid".into()))?;
            let mut client = connect(upstream_url).await?;
            trash::init(&mut client, &rules).await
        }
        TrashCommand::List {
            upstream_url,
            selection,
            json,
            limit,
        } => {
            let client = connect(upstream_url).await?;
            let rows = trash::list(&client, &selection.into(), limit).await?;
            Ok(if json {
                rows.iter()
                    .map(|r| serde_json::to_string(r).unwrap_or_default() + "\n")
                    .collect()
            } else {
                table(&rows)
            })
        }
        TrashCommand::Restore {
            upstream_url,
            selection,
            skip_conflicts,
        } => {
            let mut client = connect(upstream_url).await?;
            let done = trash::restore(&mut client, &selection.into(), skip_conflicts).await?;
            let mut out = String::new();
            let total: usize = done.by_table.values().sum();
            out.push_str(&format!("restored {total} rows\n"));
            for (t, n) in &done.by_table {
                out.push_str(&format!("  {t}: {n}\n"));
            }
            for s in &done.skipped {
                out.push_str(&format!("skipped: {s}\n"));
            }
            Ok(out)
        }
        TrashCommand::Purge {
            upstream_url,
            older_than_days,
        } => {
            let client = connect(upstream_url).await?;
            let n = trash::purge(&client, older_than_days).await?;
            Ok(format!("purged {n} kept rows\n"))
        }
    }
}

/// Kept rows as an aligned table; each row's data shortened to stay on one line.
fn table(rows: &[trash::Kept]) -> String {
    let mut out = format!(
        "{:>8}  {:27}  {:24}  {:8}  {:12}  row\n",
        "id", "deleted_at", "table", "op", "deleted_by"
    );
    for r in rows {
        let mut data = r.row.to_string();
        if data.chars().count() > 80 {
            data = data.chars().take(77).collect::<String>() + "...";
        }
        out.push_str(&format!(
            "{:>8}  {:27}  {:24}  {:8}  {:12}  {data}\n",
            r.id, r.deleted_at, r.table, r.operation, r.deleted_by
        ));
    }
    out.push_str(&format!("({} rows)\n", rows.len()));
    out
}
