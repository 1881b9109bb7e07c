//! Databases on the throwaway PostgreSQL cluster that `scripts/test.sh` starts on loopback
//! (`scripts/postgres.sh`, admin URL in `DELTA_TEST_POSTGRES`): one fresh database per
//! test, so tests run in parallel without seeing each other.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The cluster's admin URL.
pub fn admin_url() -> String {
    std::env::var("DELTA_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "DELTA_TEST_POSTGRES is not set: run the suite with ./scripts/test.sh, or start a \
             cluster with `scripts/postgres.sh start DIR` and export the URL it prints"
        )
    })
}

/// Creates an empty database and returns its URL. Blocking; callable from async tests.
pub fn fresh_database() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let admin = admin_url();
    let name = format!(
        "delta_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (base, _) = admin
        .rsplit_once('/')
        .expect("DELTA_TEST_POSTGRES ends in /DATABASE");
    let url = format!("{base}/{name}");
    admin_query(format!("CREATE DATABASE {name}"));
    url
}

/// Runs statements on the cluster's admin database, on a thread and runtime of their own
/// (callers may be on an async runtime's thread). Returns the rows.
fn admin_query(sql: String) -> Vec<tokio_postgres::SimpleQueryRow> {
    let admin = admin_url();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
            tokio::spawn(conn);
            let messages = client.simple_query(&sql).await;
            let messages = messages.unwrap_or_else(|e| panic!("{sql}: {e}"));
            messages
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .expect("admin statement")
}

/// Makes the server close every connection to the database at `url`, as a restart or a
/// failover does.
pub fn terminate_connections(url: &str) {
    // Our own database names (delta_PID_N): nothing to quote.
    let name = url.rsplit('/').next().unwrap_or_default();
    let killed = admin_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ));
    assert!(!killed.is_empty(), "no connection to {name} to terminate");
}
