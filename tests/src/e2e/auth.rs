//! Tokens, scopes, private namespaces and the audit log.

use std::time::Duration;

use delta_client::{Remote, hub};
use delta_proto::Digest;
use delta_registry::admin::{NewToken, create_token};
use delta_registry::auth::Scope;
use delta_registry::{MetaStore, SqlMeta};
use serde_json::json;
use tonic::Code;

use super::{Env, code, hidden};
use crate::fixtures;

fn meta(env: &Env) -> SqlMeta {
    SqlMeta::open(&env.registry.dir.path().join("registry.sqlite")).unwrap()
}

fn token(env: &Env, namespace: &str, scope: Scope, expires_in: Option<Duration>) -> (i64, String) {
    let new = NewToken {
        namespace: namespace.into(),
        scope,
        worker: false,
        expires_in,
        description: String::new(),
    };
    create_token(&meta(env), &new, now()).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn as_token(env: &Env, secret: Option<&str>) -> Remote {
    Remote::connect_with(&env.registry.url(), secret)
        .await
        .unwrap()
}

#[tokio::test]
async fn tokens_scope_every_call_and_reveal_nothing_across_teams() {
    let env = Env::start().await;
    // Open registry: pushes work without a token.
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    let pushed = hub::push(&env.remote, &dir, "team-a/secret", "tiny", &[], &hidden())
        .await
        .unwrap();
    let blob = env
        .remote
        .resolve("team-a/secret")
        .await
        .unwrap()
        .manifest
        .files[0]
        .digest;

    // Once a token exists, the registry is closed.
    let (_, a_write) = token(&env, "team-a", Scope::Write, None);
    let (_, a_read) = token(&env, "team-a", Scope::Read, None);
    let (b_id, b_write) = token(&env, "team-b", Scope::Write, None);
    let anon = as_token(&env, None).await;
    let a = as_token(&env, Some(&a_write)).await;
    let a_ro = as_token(&env, Some(&a_read)).await;
    let b = as_token(&env, Some(&b_write)).await;

    // Anonymous: UNAUTHENTICATED on reads of private namespaces and on every write,
    // streaming ones included.
    assert_eq!(
        code(&anon.resolve("team-a/secret").await.unwrap_err()),
        Code::Unauthenticated
    );
    let e = hub::push(&anon, &dir, "team-a/other", "tiny", &[], &hidden())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated);
    assert_eq!(
        code(&anon.start_upload(Digest::of(b"x"), 1).await.unwrap_err()),
        Code::Unauthenticated
    );
    assert!(anon.list_repositories("").await.unwrap().is_empty());

    // A read token cannot push; a team-b token cannot push to team-a.
    let dir2 = env.path("d2");
    fixtures::write_native_lora(&dir2, 2, 2, json!({}));
    assert_eq!(
        code(
            &hub::push(&a_ro, &dir2, "team-a/secret", "tiny", &[], &hidden())
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            &hub::push(&b, &dir2, "team-a/secret", "tiny", &[], &hidden())
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            &b.set_tag("team-a/secret:v1", "hijack", None)
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );

    // The right tokens work.
    assert_eq!(
        a_ro.resolve("team-a/secret").await.unwrap().digest,
        pushed.digest
    );
    let v2 = hub::push(&a, &dir2, "team-a/secret", "tiny", &[], &hidden())
        .await
        .unwrap();
    assert_eq!(v2.version, 2);

    // Team b learns nothing: an existing and a missing name get the same refusal.
    let same_refusal = |existing: delta_client::Error, missing: delta_client::Error| {
        assert_eq!(
            existing.to_string().replace("secret", "X"),
            missing.to_string().replace("nothing-here", "X")
        );
    };
    same_refusal(
        b.resolve("team-a/secret").await.unwrap_err(),
        b.resolve("team-a/nothing-here").await.unwrap_err(),
    );
    same_refusal(
        b.list_versions("team-a/secret").await.unwrap_err(),
        b.list_versions("team-a/nothing-here").await.unwrap_err(),
    );
    assert!(b.list_repositories("").await.unwrap().is_empty());
    assert!(
        b.search("", None, "", Default::default())
            .await
            .unwrap()
            .is_empty()
    );

    // A blob digest of team a's private delta is as absent as one nobody has.
    let nobody = Digest::of(b"nobody has this");
    let e1 = b
        .download_to(blob, &env.path("stolen"), &hidden())
        .await
        .unwrap_err()
        .to_string();
    let e2 = b
        .download_to(nobody, &env.path("nothing"), &hidden())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        e1.replace(&blob.to_string(), "D"),
        e2.replace(&nobody.to_string(), "D")
    );
    assert_eq!(
        b.missing(&[blob]).await.unwrap(),
        vec![blob],
        "dedup must not reveal team a's blob"
    );
    // Team b can still push the same bytes (it proves it has them) and then sees them.
    let b_push = hub::push(&b, &dir, "team-b/mine", "tiny", &[], &hidden())
        .await
        .unwrap();
    assert!(b_push.bytes_uploaded > 0);
    assert!(b.missing(&[blob]).await.unwrap().is_empty());
    assert_eq!(
        env.stored_blobs(),
        2,
        "the same bytes are still stored once"
    );

    // Public namespaces are readable by anyone.
    meta(&env).set_public("team-b", true).unwrap();
    assert_eq!(
        anon.resolve("team-b/mine").await.unwrap().digest,
        b_push.digest
    );
    anon.download_to(blob, &env.path("public-copy"), &hidden())
        .await
        .unwrap();

    // Revoked, expired and malformed tokens: UNAUTHENTICATED.
    assert!(meta(&env).revoke_token(b_id, now()).unwrap());
    assert_eq!(
        code(
            &b.list_bases()
                .await
                .map(|_| ())
                .and(b.resolve("team-b/mine").await.map(|_| ()))
                .unwrap_err()
        ),
        Code::Unauthenticated
    );
    let (_, expired) = token(&env, "team-a", Scope::Admin, Some(Duration::ZERO));
    let e = as_token(&env, Some(&expired))
        .await
        .resolve("team-a/secret")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated);
    let bogus = format!("dlt_{}", "0".repeat(64));
    for bad in ["garbage", bogus.as_str()] {
        let e = as_token(&env, Some(bad))
            .await
            .resolve("team-a/secret")
            .await
            .unwrap_err();
        assert_eq!(code(&e), Code::Unauthenticated, "{bad}");
    }

    // Every write is in the audit log, with who and which digest.
    let log = meta(&env).list_audit().unwrap();
    assert!(log.iter().any(|e| e.action == "push"
        && e.target == "team-a/secret:v2"
        && e.digest == v2.digest.to_string()
        && e.token.is_some()));
    assert!(
        log.iter().any(|e| e.action == "push" && e.token.is_none()),
        "open-mode push recorded"
    );
    assert!(
        log.iter()
            .any(|e| e.action == "upload" && e.token.is_some())
    );
}

#[tokio::test]
async fn the_cli_sends_saved_or_env_tokens_and_keeps_them_private() {
    let env = Env::start().await;
    let (_, secret) = token(&env, "team-a", Scope::Write, None);
    let dir = env.path("d");
    fixtures::write_native_lora(&dir, 1, 2, json!({}));
    let d = dir.to_str().unwrap();
    let e = env
        .cli(&["push", d, "team-a/x", "--base", "tiny"])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("Unauthenticated"), "{e:#}");
    env.cli(&["--token", &secret, "push", d, "team-a/x", "--base", "tiny"])
        .await
        .unwrap();

    env.cli(&["login", "--token", &secret]).await.unwrap();
    let creds = env.path("credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    env.cli(&["show", "team-a/x"]).await.unwrap();
    env.cli(&["logout"]).await.unwrap();
    assert!(env.cli(&["show", "team-a/x"]).await.is_err());
}
