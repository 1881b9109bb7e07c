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
    assert_eq!(reopened.list_repositories(None, "*").unwrap().len(), 1);
    assert_eq!(reopened.pragma("integrity_check").unwrap(), "ok");
}

/// On every connection: the writer and the readers (RELIABILITY #38).
#[test]
fn durability_pragmas_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let m = SqlMeta::open(&dir.path().join("db.sqlite")).unwrap();
    assert_eq!(m.pragma("journal_mode").unwrap(), "wal");
    assert_eq!(m.pragma("synchronous").unwrap(), "2"); // FULL
    assert_eq!(m.pragma("foreign_keys").unwrap(), "1");
    assert_eq!(m.pragma("busy_timeout").unwrap(), "10000");
    assert_eq!(
        m.pragma("query_only").unwrap(),
        "0 / 1",
        "only the writer writes"
    );
    assert_eq!(
        m.pragma("user_version").unwrap(),
        crate::sql::MIGRATIONS.len().to_string()
    );
}

/// Reads on a SQLite file go to connections of their own, which see every commit, refuse
/// writes, and never wait for the writer: a read answers while a write transaction is
/// open (it sees the state before it), which is what lets the service run reads on its
/// async threads (`sql::inline`).
#[test]
fn reads_have_their_own_connections_and_never_wait_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let m = std::sync::Arc::new(SqlMeta::open(&dir.path().join("db.sqlite")).unwrap());
    assert!(m.reads_inline());
    assert!(!SqlMeta::in_memory().unwrap().reads_inline());

    m.set_public("ns", true).unwrap();
    assert!(m.is_public("ns").unwrap(), "a reader sees the commit");
    let write = m.db.read(|c| c.exec("DELETE FROM public_namespaces", &[]));
    assert!(write.is_err(), "a reader refused a write");
    assert!(m.is_public("ns").unwrap());

    // A write transaction held open (it made `other` public, uncommitted) until the
    // read below has answered: were reads waiting on the writer, the writer would give
    // up after 30 s and the read would fail.
    let (read_done, wait_for_read) = std::sync::mpsc::channel::<()>();
    let (in_tx, wait_for_tx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let m = m.clone();
        std::thread::spawn(move || {
            m.db.write(|c| {
                c.exec(
                    "INSERT INTO public_namespaces (namespace) VALUES ($1)",
                    p!["other"],
                )?;
                in_tx.send(()).unwrap();
                wait_for_read
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .map_err(|_| Error::Database("the read never answered".into()))
            })
        })
    };
    wait_for_tx.recv().unwrap();
    let seen = crate::sql::inline(|| m.is_public("other"));
    read_done.send(()).unwrap();
    assert!(
        !seen.unwrap(),
        "the read saw the state before the open write"
    );
    writer.join().unwrap().unwrap();
    assert!(m.is_public("other").unwrap(), "and sees it once committed");
}

/// Inline (on an async thread), a write fails instead of holding the thread through its
/// commit, and nothing is written; outside, the same write works.
#[test]
fn an_inline_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = SqlMeta::open(&dir.path().join("db.sqlite")).unwrap();
    let err = crate::sql::inline(|| m.set_public("ns", true)).unwrap_err();
    assert!(err.to_string().contains("async thread"), "{err}");
    assert!(!m.is_public("ns").unwrap());
    assert!(crate::sql::inline(|| m.is_public("ns")).is_ok());
    m.set_public("ns", true).unwrap();
    assert!(m.is_public("ns").unwrap());
}

/// A database SQLite keeps in memory, however it was named, has no read connections
/// (each would open an empty database of its own): its reads go to the one connection.
#[test]
fn a_database_in_memory_reads_on_its_one_connection() {
    for m in [
        SqlMeta::in_memory().unwrap(),
        SqlMeta::open(Path::new(":memory:")).unwrap(),
        SqlMeta::open(Path::new("file:x?mode=memory")).unwrap(),
    ] {
        assert!(!m.reads_inline());
        m.set_public("ns", true).unwrap();
        assert!(m.is_public("ns").unwrap());
    }
}

/// The write-ahead log stays bounded while reads never stop. A checkpoint cannot copy
/// log frames newer than the oldest open read, and the log starts over only when no
/// reader is on it; reads running back to back on every read connection must still leave
/// it room, or the `-wal` file would grow with every commit for as long as the load lasts.
#[test]
fn the_write_ahead_log_stays_bounded_under_constant_reads() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let m = std::sync::Arc::new(SqlMeta::open(&path).unwrap());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let reads = std::sync::Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..crate::sql::sqlite_readers())
        .map(|_| {
            let (m, stop, reads) = (m.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    crate::sql::inline(|| m.is_public("ns0")).unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let wal = dir.path().join("db.sqlite-wal");
    let mut largest = 0;
    for i in 0..1500 {
        m.set_public(&format!("ns{i}"), true).unwrap();
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |f| f.len()));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!(
        "largest log {largest} bytes, {} reads",
        reads.load(Ordering::Relaxed)
    );
    assert!(reads.load(Ordering::Relaxed) > 1500, "the readers ran");
    // SQLite checkpoints at 1000 pages (4 MB); 1500 commits unchecked made 27 MB (checked
    // with `PRAGMA wal_autocheckpoint = 0`).
    assert!(largest < 8 << 20, "the log grew to {largest} bytes");
}
