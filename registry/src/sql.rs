//! One SQL layer over the two engines metadata lives in: SQLite (embedded, the default)
//! and PostgreSQL (one database shared by many registry replicas).
//!
//! The metadata logic ([`crate::meta`], [`crate::meta::jobs`]) is written once, against [`Sql`],
//! in the subset of SQL both engines share, with `$1`-style placeholders. What differs is
//! handled here and nowhere else:
//!
//! - placeholders: `$N` becomes `?N` on SQLite;
//! - locking: a write transaction on SQLite is `BEGIN IMMEDIATE` (the database file is the
//!   lock, so writers are serialised); on PostgreSQL it is `READ COMMITTED`, and the
//!   statements that decide something (the next version number, a tag's compare-and-swap,
//!   which job a worker gets) lock the rows they read with [`Engine::for_update`] /
//!   [`Engine::skip_locked`], which are empty on SQLite. Deadlocks and serialisation
//!   failures are retried;
//! - migrations: written once in SQLite's types; [`postgres_ddl`] maps them.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use delta_proto::Digest;
use delta_proto::reference::Repository;
use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::error::{Error, Result};

pub(crate) mod postgres;

/// The migrations, in order, in SQLite's dialect (see [`postgres_ddl`]).
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_auth.sql"),
    include_str!("../migrations/0003_lifecycle.sql"),
    include_str!("../migrations/0004_jobs.sql"),
    include_str!("../migrations/0005_isolation.sql"),
    include_str!("../migrations/0006_job_bases.sql"),
    include_str!("../migrations/0007_audit_target.sql"),
];

/// A parameter or column value: the four types the schema uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    /// Sizes, versions and ids are far below 2^63.
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<&Digest> for Value {
    fn from(v: &Digest) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `p![a, b]`: a parameter list.
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*] };
}
pub(crate) use p;

/// One result row.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    fn get(&self, i: usize) -> Result<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| Error::Database(format!("a query returned no column {i}")))
    }

    fn mismatch(&self, i: usize, want: &str) -> Error {
        Error::Database(format!(
            "column {i} holds {:?}, expected {want}",
            self.0.get(i)
        ))
    }

    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| self.mismatch(i, "an integer"))
    }

    /// A non-negative integer (sizes, versions, ids).
    pub(crate) fn uint(&self, i: usize) -> Result<u64> {
        u64::try_from(self.int(i)?).map_err(|_| self.mismatch(i, "a non-negative integer"))
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.get(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.mismatch(i, "text")),
        }
    }

    pub(crate) fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?.ok_or_else(|| self.mismatch(i, "text"))
    }

    pub(crate) fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        match self.get(i)? {
            Value::Bytes(v) => Ok(v.clone()),
            _ => Err(self.mismatch(i, "bytes")),
        }
    }

    pub(crate) fn digest(&self, i: usize) -> Result<Digest> {
        Ok(self.text(i)?.parse()?)
    }

    /// A repository from a namespace column and the name column after it.
    pub(crate) fn repo(&self, i: usize) -> Result<Repository> {
        Ok(Repository::new(&self.text(i)?, &self.text(i + 1)?)?)
    }
}

/// Which engine a statement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// Appended to a `SELECT` whose rows the transaction will change or decide on.
    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Engine::Sqlite => "",
            Engine::Postgres => " FOR UPDATE",
        }
    }

    /// Like [`Engine::for_update`], skipping rows another transaction holds (job leases).
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Engine::Sqlite => "",
            Engine::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// An open connection or transaction.
pub(crate) trait Sql {
    /// Runs a statement; returns the rows it changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
    /// Runs a query; returns every row.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// The engine, for [`Engine::for_update`] and friends.
    fn engine(&self) -> Engine;

    /// The first row, if any.
    fn opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row; a query that must return one (aggregates, `RETURNING`).
    fn one(&mut self, sql: &str, params: &[Value]) -> Result<Row> {
        self.opt(sql, params)?
            .ok_or_else(|| Error::Database(format!("no row from: {sql}")))
    }
}

/// The database: SQLite (one connection writes, a few more read), or a pool of
/// PostgreSQL connections.
#[derive(Debug)]
pub(crate) enum Db {
    Sqlite(Box<Sqlite>),
    Postgres(Box<postgres::Pool>),
}

/// Read connections an SQLite file gets besides its writer: one per core (tokio runs an
/// async thread per core, and each may be in an inline read) and two for the blocking
/// pool's database trips (`MetaStore::parallelism`). More readers than that would only
/// wait on the cores; fewer would make an async thread wait for another's read.
pub(crate) fn sqlite_readers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 2
}

/// An SQLite database. SQLite runs one write transaction at a time whatever the
/// connections, so one connection writes; reads go to connections of their own, and in
/// WAL mode a read never waits for a writer, not even for its commit's fsync. That makes
/// a read quick and bounded enough to run on an async thread ([`inline`]). An in-memory
/// database has no readers (another connection would open another database): everything
/// runs on the writer.
#[derive(Debug)]
pub(crate) struct Sqlite {
    writer: Mutex<rusqlite::Connection>,
    readers: Vec<Mutex<rusqlite::Connection>>,
    /// Where the next read starts looking for an idle reader.
    next: AtomicUsize,
}

impl Sqlite {
    /// Whether reads have connections of their own.
    pub(crate) fn has_readers(&self) -> bool {
        !self.readers.is_empty()
    }

    /// A connection for a read: an idle reader if there is one, else a busy one to wait
    /// for, else (in memory) the writer.
    fn reader(&self) -> MutexGuard<'_, rusqlite::Connection> {
        let n = self.readers.len();
        if n == 0 {
            return lock(&self.writer);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(c) = self.readers[(start + i) % n].try_lock() {
                return c;
            }
        }
        lock(&self.readers[start])
    }

    /// `f` on each connection in turn, the writer first (`PRAGMA`s).
    pub(crate) fn each<T>(&self, mut f: impl FnMut(&rusqlite::Connection) -> T) -> Vec<T> {
        std::iter::once(&self.writer)
            .chain(&self.readers)
            .map(|c| f(&lock(c)))
            .collect()
    }
}

thread_local! {
    /// Set while [`inline`] runs on this thread.
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, which may only read, on the calling async thread instead of the blocking
/// pool: the service does this where [`Db::reads_inline`] says reads never wait on a
/// writer. A write inside `f` fails (it could hold the thread through a commit's fsync),
/// as does a read that would wait on the network (PostgreSQL).
pub(crate) fn inline<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INLINE.set(self.0);
        }
    }
    let _restore = Restore(INLINE.replace(true));
    f()
}

fn refuse_inline(what: &str) -> Result<()> {
    if INLINE.get() {
        return Err(Error::Database(format!(
            "{what} was started on an async thread (a bug: only SQLite reads run there)"
        )));
    }
    Ok(())
}

impl Db {
    /// Whether reads are quick and never wait on a writer, so they may run [`inline`].
    pub(crate) fn reads_inline(&self) -> bool {
        matches!(self, Db::Sqlite(db) if db.has_readers())
    }

    /// Runs `f` outside any explicit transaction, on a read connection (SQLite's readers
    /// refuse writes: `PRAGMA query_only`). On PostgreSQL it may run twice: once more on
    /// a fresh connection when the server had closed the first before any statement went
    /// through.
    pub(crate) fn read<T>(&self, f: impl FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        let mut f = f;
        match self {
            Db::Sqlite(db) => f(&mut SqliteSql(&db.reader())),
            Db::Postgres(pool) => {
                refuse_inline("a PostgreSQL read")?;
                pool.read(f)
            }
        }
    }

    /// Runs `f` in a write transaction, committed if it returns `Ok`, rolled back
    /// otherwise. On PostgreSQL a deadlock or serialisation failure runs `f` again.
    pub(crate) fn write<T>(&self, f: impl FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        refuse_inline("a write transaction")?;
        let mut f = f;
        match self {
            Db::Sqlite(db) => {
                let mut conn = lock(&db.writer);
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&mut SqliteSql(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Db::Postgres(pool) => pool.write(&mut f),
        }
    }
}

fn lock(conn: &Mutex<rusqlite::Connection>) -> MutexGuard<'_, rusqlite::Connection> {
    // A poisoned lock means a panic mid-call; SQLite rolled back the transaction, so the
    // connection itself is still consistent.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens and migrates a SQLite database (WAL, `synchronous=FULL`, foreign keys), and
/// read connections to its file (none in memory).
pub(crate) fn open_sqlite(conn: rusqlite::Connection) -> Result<Db> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Switching a fresh file to WAL takes an exclusive lock, and SQLite answers BUSY at
    // once, without waiting in the busy handler, when that upgrade would deadlock with
    // another process's transaction (`token create` migrating while `serve` starts).
    // Both steps are idempotent, so they are retried until the other process is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match init_sqlite(&conn) {
            Err(Error::Db(e)) if is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => {
                other?;
                break;
            }
        }
    }
    let mut readers = Vec::new();
    // The file as SQLite resolved it (absolute); "" in memory (`:memory:`, `mode=memory`),
    // `None` when the path is not UTF-8: then the writer reads too.
    if let Some(file) = conn.path().filter(|f| !f.is_empty()) {
        for _ in 0..sqlite_readers() {
            let r = rusqlite::Connection::open(file)?;
            r.busy_timeout(std::time::Duration::from_secs(10))?;
            // The writer's settings too (RELIABILITY #38: on every connection), though a
            // reader never writes.
            r.execute_batch(CONNECTION_PRAGMAS)?;
            r.execute_batch("PRAGMA query_only = ON;")?;
            readers.push(Mutex::new(r));
        }
    }
    Ok(Db::Sqlite(Box::new(Sqlite {
        writer: Mutex::new(conn),
        readers,
        next: AtomicUsize::new(0),
    })))
}

/// What every SQLite connection sets, the writer and each reader alike.
const CONNECTION_PRAGMAS: &str = "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;";

fn init_sqlite(conn: &rusqlite::Connection) -> Result<()> {
    // journal_mode returns a row, so it is a query, not an execute.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.execute_batch(CONNECTION_PRAGMAS)?;
    migrate_sqlite(conn)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Applies missing migrations, one write transaction each. The version is read *inside*
/// the transaction (`BEGIN IMMEDIATE` takes the database's write lock), so two processes
/// opening a fresh database together (`serve` and `token create`, two replicas on one
/// file) take turns: the second finds the migration done and skips it.
fn migrate_sqlite(conn: &rusqlite::Connection) -> Result<()> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = conn
            .query_row("PRAGMA user_version", [], |r| r.get::<_, usize>(0))
            .map_err(Error::from)
            .and_then(|version| match MIGRATIONS.get(version) {
                None => Ok(false),
                Some(sql) => {
                    conn.execute_batch(&format!("{sql}; PRAGMA user_version = {};", version + 1))?;
                    Ok(true)
                }
            });
        match applied {
            Ok(more) => {
                conn.execute_batch("COMMIT")?;
                if !more {
                    return Ok(());
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

/// A migration in PostgreSQL's types and names: 64-bit integers, generated ids, `BYTEA`,
/// and `strpos` for SQLite's `instr` (same arguments, same answer).
pub(crate) fn postgres_ddl(sqlite: &str) -> String {
    sqlite
        .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace("instr(", "strpos(")
}

/// `$N` placeholders as SQLite's `?N`.
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) struct SqliteSql<'a>(pub(crate) &'a rusqlite::Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Bytes(v) => ValueRef::Blob(v),
        }))
    }
}

impl Sql for SqliteSql<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let mut stmt = self.0.prepare_cached(&sqlite_placeholders(sql))?;
        Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let mut stmt = self.0.prepare_cached(&sqlite_placeholders(sql))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(columns);
            for i in 0..columns {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Text(v) => Value::Text(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(v) => Value::Bytes(v.to_vec()),
                    ValueRef::Real(v) => {
                        return Err(Error::Database(format!(
                            "column {i} holds the real number {v}; the schema has none"
                        )));
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn engine(&self) -> Engine {
        Engine::Sqlite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_ddl_translate() {
        assert_eq!(
            sqlite_placeholders("SELECT $1, $12 FROM t WHERE a = '$'"),
            "SELECT ?1, ?12 FROM t WHERE a = '$'"
        );
        let ddl = postgres_ddl(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, b BLOB);\n\
             CREATE TABLE u (id INTEGER PRIMARY KEY AUTOINCREMENT);\n\
             UPDATE t SET b = substr(b, 1, instr(b, '/') - 1);",
        );
        assert_eq!(
            ddl,
            "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL, b BYTEA);\n\
             CREATE TABLE u (id BIGSERIAL PRIMARY KEY);\n\
             UPDATE t SET b = substr(b, 1, strpos(b, '/') - 1);"
        );
    }
}
