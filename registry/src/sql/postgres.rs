//! PostgreSQL: a small blocking pool over `tokio-postgres`.
//!
//! The metadata layer is blocking (the service calls it inside `spawn_blocking`), so each
//! call waits for its query on the runtime that drives the connections. Connections keep
//! their prepared statements; a connection that broke is dropped and replaced on demand.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use bytes::BytesMut;
use tokio::runtime::{Handle, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};

use super::{Engine, MIGRATIONS, Row, Sql, Value, postgres_ddl};
use crate::error::{Error, Result};

/// Ties the migration lock to this schema (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x6465_6c74_6168_7562; // "deltahub"

/// Write transactions retried after a deadlock or serialisation failure.
const RETRIES: usize = 8;

/// A bounded pool of connections to one database.
pub(crate) struct Pool {
    config: tokio_postgres::Config,
    /// What the connections run on: the caller's runtime, or `own`'s.
    handle: Handle,
    own: Option<Runtime>,
    state: Mutex<State>,
    freed: Condvar,
    max: usize,
}

struct State {
    idle: Vec<Conn>,
    open: usize,
}

struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("max", &self.max)
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A runtime of our own must not be dropped on an async thread; let it go quietly.
        if let Some(rt) = self.own.take() {
            rt.shutdown_background();
        }
    }
}

impl Pool {
    /// Connects to `url` (`postgres://user:password@host:port/database`), checks the
    /// connection and applies missing migrations. Blocking: call it off the async threads.
    pub(crate) fn connect(url: &str, max: usize) -> Result<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("database URL: {e}")))?;
        let (handle, own) = match Handle::try_current() {
            Ok(h) => (h, None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                (rt.handle().clone(), Some(rt))
            }
        };
        let pool = Self {
            config,
            handle,
            own,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            max: max.max(1),
        };
        pool.migrate()?;
        Ok(pool)
    }

    fn migrate(&self) -> Result<()> {
        self.transaction(&mut |sql| {
            // Replicas starting together take turns; the later ones find the work done.
            sql.exec("SELECT pg_advisory_xact_lock($1)", super::p![MIGRATION_LOCK])?;
            let exists = sql
                .one(
                    "SELECT COUNT(*) FROM information_schema.tables
                     WHERE table_schema = current_schema() AND table_name = 'schema_migrations'",
                    &[],
                )?
                .int(0)?
                > 0;
            if !exists {
                sql.batch(
                    "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
                )?;
            }
            let done = sql
                .one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?
                .uint(0)? as usize;
            if done > MIGRATIONS.len() {
                return Err(Error::FailedPrecondition(format!(
                    "the database is at schema version {done}, newer than this registry's {}; upgrade the registry",
                    MIGRATIONS.len()
                )));
            }
            for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
                sql.batch(&postgres_ddl(migration))?;
                sql.exec(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    super::p![(i + 1) as i64, crate::clock::now()],
                )?;
            }
            Ok(())
        })
    }

    fn checkout(&self) -> Result<Conn> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = state.idle.pop() {
                if !conn.client.is_closed() {
                    return Ok(conn);
                }
                state.open -= 1;
                continue;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return self.open().inspect_err(|_| self.release(None));
            }
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) -> Result<Conn> {
        let (client, connection) = self.handle.block_on(self.config.connect(NoTls))?;
        self.handle.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// Returns a connection (`None`: it broke or was never made).
    fn release(&self, conn: Option<Conn>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match conn {
            Some(c) if !c.client.is_closed() => state.idle.push(c),
            _ => state.open -= 1,
        }
        self.freed.notify_one();
    }

    /// Forgets every idle connection: after one turned out closed by the server (a restart
    /// or failover), the others opened before it are closed too.
    fn discard_idle(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open -= state.idle.len();
        state.idle.clear();
        self.freed.notify_all();
    }

    /// Runs `f` outside a transaction. A connection the server closed while it sat idle
    /// (a database restart or failover) is replaced, with every other idle one, and `f`
    /// runs again, once, provided no statement of it had gone through.
    pub(crate) fn read<T>(&self, mut f: impl FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        let mut retried = false;
        loop {
            let mut conn = self.checkout()?;
            let mut sql = PgSql::new(&mut conn, &self.handle);
            let out = f(&mut sql);
            let untouched = sql.done == 0;
            self.release(Some(conn));
            match out {
                Err(Error::Postgres(e)) if gone(&e) && untouched && !retried => {
                    retried = true;
                    self.discard_idle();
                    tracing::info!(
                        "a PostgreSQL connection was closed by the server; reconnecting"
                    );
                }
                out => return out,
            }
        }
    }

    pub(crate) fn write<T>(&self, f: &mut dyn FnMut(&mut dyn Sql) -> Result<T>) -> Result<T> {
        self.transaction(&mut |sql| f(sql))
    }

    fn transaction<T>(&self, f: &mut dyn FnMut(&mut PgSql<'_>) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let mut conn = self.checkout()?;
            let mut sql = PgSql::new(&mut conn, &self.handle);
            let out = sql
                .batch("BEGIN")
                .and_then(|()| f(&mut sql))
                .and_then(|v| sql.batch("COMMIT").map(|()| v));
            // `BEGIN` is the first statement: a connection closed before it is replaced.
            let untouched = sql.done == 0;
            if out.is_err() {
                // Fails harmlessly if BEGIN failed or the connection broke.
                let _ = sql.batch("ROLLBACK");
            }
            self.release(Some(conn));
            match out {
                Err(Error::Postgres(e))
                    if attempt < RETRIES && (retryable(&e) || (gone(&e) && untouched)) =>
                {
                    attempt += 1;
                    if gone(&e) {
                        self.discard_idle();
                    }
                    tracing::debug!(error = %e, attempt, "retrying a write transaction");
                }
                out => return out,
            }
        }
    }
}

/// The server closed the connection (or is closing it: a restart, a failover, an
/// administrator terminating backends), or the socket broke.
fn gone(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW
        )
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

struct PgSql<'a> {
    conn: &'a mut Conn,
    handle: &'a Handle,
    /// Statements that went through (a closed connection is retried only before any).
    done: usize,
}

impl<'a> PgSql<'a> {
    fn new(conn: &'a mut Conn, handle: &'a Handle) -> Self {
        Self {
            conn,
            handle,
            done: 0,
        }
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.handle.block_on(self.conn.client.batch_execute(sql))?;
        self.done += 1;
        Ok(())
    }

    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.conn.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.handle.block_on(self.conn.client.prepare(sql))?;
        self.conn.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Sql for PgSql<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let stmt = self.statement(sql)?;
        let n = self
            .handle
            .block_on(self.conn.client.execute(&stmt, &refs(params)))?;
        self.done += 1;
        Ok(n)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let stmt = self.statement(sql)?;
        let rows = self
            .handle
            .block_on(self.conn.client.query(&stmt, &refs(params)))?;
        self.done += 1;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| column(r, i))
                    .collect::<Result<_>>()
                    .map(Row)
            })
            .collect()
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }
}

fn column(row: &tokio_postgres::Row, i: usize) -> Result<Value> {
    let ty = row.columns()[i].type_();
    let int = |v: Option<i64>| v.map_or(Value::Null, Value::Int);
    Ok(match *ty {
        Type::INT8 => int(row.try_get::<_, Option<i64>>(i)?),
        Type::INT4 => int(row.try_get::<_, Option<i32>>(i)?.map(i64::from)),
        Type::INT2 => int(row.try_get::<_, Option<i16>>(i)?.map(i64::from)),
        Type::BOOL => int(row.try_get::<_, Option<bool>>(i)?.map(i64::from)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)?
            .map_or(Value::Null, Value::Bytes),
        _ => {
            return Err(Error::Database(format!(
                "column {} has type {ty}, which the metadata layer does not read",
                row.columns()[i].name()
            )));
        }
    })
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("an integer parameter where {ty} is expected").into()),
            },
            Value::Text(v) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    v.as_str().to_sql(ty, out)
                }
                _ => Err(format!("a text parameter where {ty} is expected").into()),
            },
            Value::Bytes(v) => match *ty {
                Type::BYTEA => v.as_slice().to_sql(ty, out),
                _ => Err(format!("a bytes parameter where {ty} is expected").into()),
            },
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
                | Type::BYTEA
                | Type::UNKNOWN
        )
    }

    to_sql_checked!();
}
