//! The conformance suite on SQLite, and what only SQLite has (pragmas, files).

use super::*;

#[test]
fn conformance_in_memory() {
    super::conformance::versions_tags_and_search(&SqlMeta::in_memory().unwrap());
}

#[test]
fn conformance_on_file_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    super::conformance::versions_tags_and_search(&SqlMeta::open(&path).unwrap());
    let reopened = SqlMeta::open(&path).unwrap();
    assert_eq!(reopened.list_repositories(None).unwrap().len(), 1);
    assert_eq!(reopened.pragma("integrity_check").unwrap(), "ok");
}

#[test]
fn durability_pragmas_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let m = SqlMeta::open(&dir.path().join("db.sqlite")).unwrap();
    assert_eq!(m.pragma("journal_mode").unwrap(), "wal");
    assert_eq!(m.pragma("synchronous").unwrap(), "2"); // FULL
    assert_eq!(m.pragma("foreign_keys").unwrap(), "1");
    assert_eq!(m.pragma("busy_timeout").unwrap(), "10000");
    assert_eq!(
        m.pragma("user_version").unwrap(),
        crate::sql::MIGRATIONS.len().to_string()
    );
}
