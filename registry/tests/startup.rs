//! The first start of a registry on a fresh data dir, raced by an admin command: both
//! migrate the same new database, so they must take turns, and the server must not accept
//! calls before its tables exist.

mod common;

use std::process::{Command, Stdio};

use delta_proto as pb;

#[tokio::test]
async fn serve_and_token_create_on_a_fresh_data_dir_never_race() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // The admin command starts first, so it is mid-migration when `serve` opens the
        // database (or the other way round): every interleaving shows up over the rounds.
        let admin = Command::new(env!("CARGO_BIN_EXE_delta-registry"))
            .args([
                "token",
                "create",
                "--namespace",
                "team-a",
                "--scope",
                "write",
            ])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut reg = common::start(&data);
        let out = admin.wait_with_output().unwrap();
        let secret = common::token_secret(&out, &format!("round {round}: token create"));

        // The server is still up, and its tables exist: the token works at once.
        assert!(
            reg.child.try_wait().unwrap().is_none(),
            "round {round}: the registry died"
        );
        let mut c = common::client_with(&reg.url, Some(&secret)).await;
        let repos = c
            .list_repositories(pb::ListRepositoriesRequest {
                namespace: "team-a".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(repos.into_inner().repositories.is_empty());
        reg.child.kill().unwrap();
        reg.child.wait().unwrap();
    }
}
