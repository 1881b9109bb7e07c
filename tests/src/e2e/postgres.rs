//! The metadata conformance suite on PostgreSQL: the same checks SQLite passes.

use std::sync::Arc;

use delta_proto::jobs::JobKind;
use delta_registry::meta::conformance;
use delta_registry::meta::jobs::JobStore;
use delta_registry::{MetaStore, SqlMeta};

use crate::postgres::{fresh_database, terminate_connections};

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

/// A database restart or failover closes every pooled connection: the next calls,
/// reads and write transactions alike, reconnect instead of failing.
#[test]
fn connections_the_server_closed_are_replaced_without_failing_a_call() {
    let url = fresh_database();
    let m = SqlMeta::connect_postgres(&url).expect("connect");
    m.set_public("team", true).expect("write");
    for pause in [0, 200] {
        terminate_connections(&url);
        std::thread::sleep(std::time::Duration::from_millis(pause));
        assert!(m.is_public("team").expect("a read after the restart"));
        terminate_connections(&url);
        std::thread::sleep(std::time::Duration::from_millis(pause));
        let job = m
            .submit_job(
                JobKind::Train,
                "{}",
                "team/x",
                "team",
                "",
                &[],
                &delta_registry::meta::Actor::local(1),
            )
            .expect("a write transaction after the restart");
        assert!(m.get_job(job.id).expect("read").is_some());
    }
}
