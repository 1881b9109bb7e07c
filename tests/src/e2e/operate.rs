//! Operating a registry: Prometheus metrics, request ids on errors, `delta doctor`.

use std::io::{Read, Write};

use delta_registry::RegistryConfig;

use crate::TestRegistry;

fn scrape(addr: std::net::SocketAddr) -> String {
    // The registry binds its ports in a task the test does not wait for.
    let start = std::time::Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if start.elapsed() < std::time::Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("metrics endpoint {addr}: {e}"),
        }
    };
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, port) = TestRegistry::start_with_metrics(dir, RegistryConfig::for_test).await;
    let remote = registry.remote().await;
    let before = scrape(port);
    let series = "delta_rpc_requests_total{method=\"Resolve\",code=\"NOT_FOUND\"}";
    let err = remote.resolve("team/missing:v1").await.unwrap_err();
    assert!(matches!(err, delta_client::Error::NotFound(_)), "{err}");
    let id = delta_client::error::last_request_id().expect("a request id came back");
    assert_eq!(id.len(), 32, "{id}");
    // Upload some bytes so the byte counters move.
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("blob.bin");
    std::fs::write(&f, vec![7u8; 100_000]).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    remote.upload_blob_file(&f, &bar).await.unwrap();
    let after = scrape(port);
    assert_eq!(
        value(&after, series),
        value(&before, series) + 1.0,
        "{after}"
    );
    assert!(
        value(&after, "delta_blob_bytes_received_total")
            >= value(&before, "delta_blob_bytes_received_total") + 100_000.0
    );
    assert!(value(&after, "delta_blobs_stored") >= 1.0, "{after}");
    assert!(after.contains("delta_rpc_duration_seconds_bucket{method=\"Resolve\",le=\"+Inf\"}"));
    assert!(after.contains("# TYPE delta_worker_leases gauge"));
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_registry_cache_and_bases() {
    let env = super::Env::start().await;
    let base = env.base.to_str().unwrap().to_owned();
    env.cli(&["doctor", "--base", &base]).await.unwrap();
    // An unregistered base fails the check and the command.
    let other = env.path("other.safetensors");
    crate::fixtures::write_base(&other, 99);
    let err = env
        .cli(&["doctor", "--base", other.to_str().unwrap()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1 check(s) failed"), "{err}");
    // A corrupt cached blob is found.
    let cached = env.path("cache").join("blobs/blake3/ab");
    std::fs::create_dir_all(&cached).unwrap();
    let fake = format!("ab{}", "0".repeat(62));
    std::fs::write(cached.join(&fake), b"not those bytes").unwrap();
    let err = env.cli(&["doctor"]).await.unwrap_err();
    assert!(err.to_string().contains("check(s) failed"), "{err}");
}
