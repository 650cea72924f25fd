//! libpq's password file for the admin commands: `PGPASSFILE` or `~/.pgpass`, lines of
//! `host:port:database:user:password` where `*` matches anything and `\` escapes `:` and
//! `\`. As libpq does, a file that others can read is ignored (with a warning), and the
//! first matching line wins.

use std::path::{Path, PathBuf};

/// Who is connecting where, as the password file is matched.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

/// The password for `target` from the user's password file, if one matches.
pub fn lookup(target: &Target<'_>) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = read_private(&path)?;
    find(&text, target)
}

fn read_private(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "pgveil: warning: password file {} has group or world access; permissions should be u=rw (0600) or less",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

fn find(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, port.as_str(), target.database, target.user];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = fields(line)?;
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, value)| field == "*" || field == value);
            matches.then(|| fields[4].clone())
        })
}

/// The five fields of a line, unescaped; `None` for a line with fewer.
fn fields(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            // As in libpq, the password ends at an unescaped colon.
            ':' => break,
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.internal:5432:crm:postgres:first\n\
                    *:5432:*:postgres:pa\\:ss:with colon\n\
                    *:*:*:*:fallback\n";
        let target = |host, port, database, user| Target {
            host,
            port,
            database,
            user,
        };
        let t = target("db.internal", 5432, "crm", "postgres");
        assert_eq!(find(text, &t).as_deref(), Some("first"));
        let t = target("other", 5432, "sales", "postgres");
        assert_eq!(find(text, &t).as_deref(), Some("pa:ss"));
        let t = target("other", 6543, "crm", "alice");
        assert_eq!(find(text, &t).as_deref(), Some("fallback"));
        assert_eq!(find("a:1:b:c\n", &t), None);
        assert_eq!(find("", &t), None);
    }
}
