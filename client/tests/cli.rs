//! The `delta` binary as a user runs it: a real process against a real registry.

use std::process::{Command, Output};

use delta_registry::RegistryConfig;
use tokio::net::TcpListener;

fn delta(registry: &str, cache: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_delta"))
        .args(["--registry", registry])
        .arg("--cache")
        .arg(cache)
        .env("DELTA_CREDENTIALS", cache.join("credentials.json"))
        .env_remove("DELTA_TOKEN")
        .args(args)
        .output()
        .unwrap()
}

fn write_f32(path: &std::path::Path, tensors: &[(&str, Vec<usize>)]) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s)| {
            (0..s.iter().product::<usize>())
                .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = RegistryConfig::for_test(&dir.path().join("data"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(delta_registry::run(config, listener, async {
        rx.await.ok();
    }));
    let cache = dir.path().join("cache");

    let base = dir.path().join("base.safetensors");
    write_f32(
        &base,
        &[("layer.q.weight", vec![4, 6]), ("layer.q.bias", vec![4])],
    );
    let delta_dir = dir.path().join("my-delta");
    std::fs::create_dir(&delta_dir).unwrap();
    write_f32(
        &delta_dir.join("delta.safetensors"),
        &[
            ("layer.q.lora_A", vec![2, 6]),
            ("layer.q.lora_B", vec![4, 2]),
        ],
    );
    std::fs::write(
        delta_dir.join("delta.json"),
        r#"{"method":"lora","config":{"lora":{"r":2,"lora_alpha":4}}}"#,
    )
    .unwrap();

    let (url, cache) = (url.as_str(), cache.as_path());
    let fp = delta(url, cache, &["fingerprint", base.to_str().unwrap()]);
    assert!(fp.status.success());
    let fp = String::from_utf8(fp.stdout).unwrap();
    assert!(
        fp.trim().starts_with("blake3:") && fp.trim().len() == 71,
        "{fp}"
    );

    let add = delta(url, cache, &["base", "add", "tiny", base.to_str().unwrap()]);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    assert!(String::from_utf8_lossy(&add.stdout).contains(fp.trim()));

    let push = delta(
        url,
        cache,
        &[
            "push",
            delta_dir.to_str().unwrap(),
            "team/demo:stable",
            "--base",
            "tiny",
        ],
    );
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    assert!(String::from_utf8_lossy(&push.stdout).starts_with("team/demo:v1 blake3:"));

    let out = dir.path().join("pulled");
    let pull = delta(
        url,
        cache,
        &[
            "--json",
            "pull",
            "team/demo:stable",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&pull.stdout).unwrap();
    assert_eq!(report["version"], 1);
    assert!(report["bytes_downloaded"].as_u64().unwrap() > 0);
    assert_eq!(
        std::fs::read(out.join("delta.safetensors")).unwrap(),
        std::fs::read(delta_dir.join("delta.safetensors")).unwrap()
    );

    // --no-cache: the same folder, written once; the cache is neither read nor filled,
    // and nothing temporary is left beside the folder.
    let no_cache_dir = dir.path().join("no-cache");
    let out = no_cache_dir.join("pulled");
    let fresh_cache = dir.path().join("fresh-cache");
    let pull = delta(
        url,
        &fresh_cache,
        &[
            "--json",
            "pull",
            "--no-cache",
            "team/demo:stable",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&pull.stdout).unwrap();
    assert!(report["bytes_downloaded"].as_u64().unwrap() > 0);
    for f in ["delta.safetensors", "delta.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(dir.path().join("pulled").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(delta_client::Cache::new(&fresh_cache).blobs().is_empty());
    let beside: Vec<_> = std::fs::read_dir(&no_cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["pulled"]);

    let ls = delta(url, cache, &["ls"]);
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(listed.contains("team/demo"));
    // Times read as times.
    assert!(
        listed.contains("updated 20") && listed.contains("Z"),
        "{listed}"
    );
    let show = delta(url, cache, &["show", "team/demo"]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("pushed:   20"), "{shown}");
    assert!(shown.contains("Z by open registry"), "{shown}");

    // `--annotation` on push is what `ls --annotation` finds.
    let tagged = delta(
        url,
        cache,
        &[
            "push",
            delta_dir.to_str().unwrap(),
            "team/annotated",
            "--base",
            "tiny",
            "--annotation",
            "task=sentiment",
            "--annotation",
            "license=mit",
        ],
    );
    assert!(
        tagged.status.success(),
        "{}",
        String::from_utf8_lossy(&tagged.stderr)
    );
    let found = delta(url, cache, &["ls", "--annotation", "task=sentiment"]);
    let text = String::from_utf8_lossy(&found.stdout);
    assert!(
        text.contains("team/annotated") && !text.contains("team/demo"),
        "{text}"
    );
    let bad = delta(
        url,
        cache,
        &[
            "push",
            delta_dir.to_str().unwrap(),
            "team/x",
            "--base",
            "tiny",
            "--annotation",
            "oops",
        ],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not KEY=VALUE"));

    // gc speaks the server's `--grace` (a duration; `--grace-seconds` still parses) and
    // says what the grace period kept.
    let gc = delta(url, cache, &["gc", "--dry-run", "--grace", "2h"]);
    let text = String::from_utf8_lossy(&gc.stdout);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(text.contains("would free 0 B in 0 blobs"), "{text}");
    assert!(
        text.contains("within the grace period, 2h, are kept"),
        "{text}"
    );
    let old = delta(url, cache, &["gc", "--dry-run", "--grace-seconds", "30"]);
    assert!(String::from_utf8_lossy(&old.stdout).contains("grace period, 30s"));
    let bad = delta(url, cache, &["gc", "--grace", "soon"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a duration"));

    // Errors: a clear message on stderr and exit code 1.
    let bad = delta(
        url,
        cache,
        &[
            "push",
            delta_dir.to_str().unwrap(),
            "team/demo",
            "--base",
            "unknown",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("base unknown is not registered"),
        "{stderr}"
    );
    let nothing = delta("http://127.0.0.1:1", cache, &["ls"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nothing.stderr)
            .contains("cannot connect to the registry at http://127.0.0.1:1")
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn shell_completions_and_request_ids_on_errors() {
    let cache = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_delta()"),
        ("zsh", "#compdef delta"),
        ("fish", "complete -c delta"),
    ] {
        let out = delta("http://127.0.0.1:1", cache.path(), &["completions", shell]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
        assert!(text.contains("train") && text.contains("doctor"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_print_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(delta_registry::run(
        RegistryConfig::for_test(dir.path()),
        listener,
        async {
            rx.await.ok();
        },
    ));
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_owned();
    let out =
        tokio::task::spawn_blocking(move || delta(&url, &cache_path, &["show", "team/none:v1"]))
            .await
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request id: "), "{err}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// `delta … | head -1`: the reader goes away; the command ends quietly (killed by
/// SIGPIPE, as any Unix tool), never with a "Broken pipe" panic.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    delta_tests::assert_closed_pipe_is_quiet(
        Command::new(env!("CARGO_BIN_EXE_delta")).args(["completions", "bash"]),
    );
}
