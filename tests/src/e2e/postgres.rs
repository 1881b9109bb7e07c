//! The metadata conformance suite on PostgreSQL: the same checks SQLite passes.

use std::sync::Arc;

use delta_registry::meta::conformance;
use delta_registry::{MetaStore, SqlMeta};

use crate::postgres::fresh_database;

#[test]
fn metadata_conformance_on_postgres() {
    conformance::all(&|| {
        let url = fresh_database();
        Box::new(move || {
            Arc::new(SqlMeta::connect_postgres(&url).expect("connect")) as Arc<dyn MetaStore>
        })
    });
}

#[test]
fn replicas_starting_together_migrate_once() {
    let url = fresh_database();
    let stores: Vec<SqlMeta> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| SqlMeta::connect_postgres(&url).expect("connect")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("migrate"))
            .collect()
    });
    for m in &stores {
        assert_eq!(m.token_count().expect("query"), 0);
    }
}

#[test]
fn a_bad_database_url_is_named_in_the_error() {
    let e = SqlMeta::connect_postgres("postgres://nobody@127.0.0.1:1/none").unwrap_err();
    assert!(e.to_string().contains("database"), "{e}");
    let e = SqlMeta::connect_postgres("postgres://[bad").unwrap_err();
    assert!(e.to_string().contains("database URL"), "{e}");
}
