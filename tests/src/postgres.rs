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
    // Its own thread and runtime: callers may be on an async runtime's thread.
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
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create a test database");
        });
    })
    .join()
    .expect("creating a test database");
    url
}

/// Makes the server close every connection to the database at `url`, as a restart or a
/// failover does.
pub fn terminate_connections(url: &str) {
    let admin = admin_url();
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
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
            let killed = client
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&name],
                )
                .await
                .expect("terminate backends");
            assert!(!killed.is_empty(), "no connection to {name} to terminate");
        });
    })
    .join()
    .expect("terminating connections");
}
