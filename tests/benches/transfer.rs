//! Push/pull throughput over loopback, next to the machine's own limits measured in the
//! same run: single-core blake3, fsync'd sequential disk writes, loopback TCP.
//!
//! `cargo bench -p delta-tests --bench transfer` (sizes: `DELTA_BENCH_SIZES=16,256,1024` MiB).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use delta_client::delta::Format;
use delta_client::{Cache, hub};
use delta_proto::fingerprint::FingerprintEntry;
use delta_tests::TestRegistry;
use indicatif::ProgressBar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

fn rate(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn blake3_single_core(buf: &[u8]) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut h = blake3::Hasher::new();
        h.update(buf);
        std::hint::black_box(h.finalize());
        best = best.min(t.elapsed());
    }
    rate(buf.len(), best)
}

fn fsync_write(dir: &Path, buf: &[u8]) -> f64 {
    let path = dir.join("disk-probe");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create probe");
    for chunk in buf.chunks(8 * MIB) {
        f.write_all(chunk).expect("write probe");
    }
    f.sync_all().expect("fsync probe");
    let r = rate(buf.len(), t.elapsed());
    let _ = std::fs::remove_file(path);
    r
}

async fn loopback_tcp(total: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; MIB];
        let mut n = 0;
        while n < total {
            let r = s.read(&mut buf).await.expect("read");
            if r == 0 {
                break;
            }
            n += r;
        }
        n
    });
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let buf = vec![1u8; MIB];
    for _ in 0..total / MIB {
        s.write_all(&buf).await.expect("write");
    }
    s.shutdown().await.expect("shutdown");
    let n = reader.await.expect("reader");
    rate(n, t.elapsed())
}

/// A delta of `size` bytes: one dense diff on a base tensor `w.weight`.
fn write_delta(dir: &Path, size: usize) -> (Vec<FingerprintEntry>, usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let floats = (size - 1024) / 4;
    // Pseudo-random bytes, with each float's top byte kept below the all-ones exponent:
    // finite values (a push refuses NaN and Inf).
    let data: Vec<u8> = (0..floats * 4)
        .map(|i| {
            let b = (i.wrapping_mul(2654435761) >> 13) as u8;
            if i % 4 == 3 { b & 0x3f } else { b }
        })
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![floats], &data)
        .expect("view");
    safetensors::serialize_to_file(
        [("w.weight.diff", view)],
        None,
        &dir.join("delta.safetensors"),
    )
    .expect("write");
    std::fs::write(dir.join("delta.json"), r#"{"method":"diff"}"#).expect("write");
    // The base itself is never read: its record needs only the tensor's digest.
    let table = vec![FingerprintEntry {
        info: delta_proto::manifest::TensorInfo {
            name: "w.weight".into(),
            dtype: "F32".into(),
            shape: vec![floats as u64],
        },
        digest: delta_proto::Digest::of(dir.as_os_str().as_encoded_bytes()),
    }];
    (
        table,
        std::fs::metadata(dir.join("delta.safetensors"))
            .expect("stat")
            .len() as usize,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = std::env::var("DELTA_BENCH_SIZES")
        .unwrap_or_else(|_| "16,256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let work =
        tempfile::tempdir_in(std::env::var("DELTA_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("tempdir");
    let probe: Vec<u8> = (0..256 * MIB).map(|i| (i * 31) as u8).collect();
    let b3 = blake3_single_core(&probe);
    let disk = fsync_write(work.path(), &probe);
    let tcp = loopback_tcp(1024 * MIB).await;
    drop(probe);
    println!("machine limits (same run):");
    println!("  blake3, one core:           {b3:8.0} MiB/s");
    println!("  fsync'd sequential write:   {disk:8.0} MiB/s");
    println!("  loopback TCP:               {tcp:8.0} MiB/s");
    println!();
    println!(
        "| delta | push MiB/s | push / fsync'd disk | pull MiB/s (verified): first / second | second pull / blake3 1-core | second pull / fsync'd disk | round trip (push + first pull) |"
    );
    println!("|---|---|---|---|---|---|---|");

    let registry = TestRegistry::start_in(
        tempfile::tempdir_in(work.path()).expect("tempdir"),
        delta_registry::RegistryConfig::for_test,
    )
    .await;
    let remote = registry.remote().await;
    let bar = ProgressBar::hidden();
    for (i, mib) in sizes.iter().enumerate() {
        let dir = work.path().join(format!("delta{i}"));
        let (table, bytes) = write_delta(&dir, mib * MIB);
        let base = format!("bench-{i}");
        remote.add_base(&base, &table).await.expect("add base");

        let t = Instant::now();
        let pushed = hub::push(&remote, &dir, &format!("bench/d{i}"), &base, &[], &bar)
            .await
            .expect("push");
        let push_time = t.elapsed();
        assert_eq!(pushed.bytes_uploaded as usize, bytes);

        // Twice, each into an empty cache and folder: the first pull after a push writes
        // to pages this process never touched, which this VM makes several times dearer
        // than reused ones (scripts/bench-oci.sh measures the same), so both are shown.
        let mut pulls = Vec::new();
        for _ in 0..2 {
            let (cache_dir, out) = (
                work.path().join(format!("cache{i}")),
                work.path().join(format!("out{i}")),
            );
            let cache = Cache::new(&cache_dir);
            let t = Instant::now();
            let pulled = hub::pull(
                &remote,
                &cache,
                &format!("bench/d{i}"),
                &out,
                Format::Native,
                &bar,
            )
            .await
            .expect("pull");
            pulls.push(t.elapsed());
            assert_eq!(pulled.bytes_downloaded as usize, bytes);
            let _ = std::fs::remove_dir_all(&cache_dir);
            let _ = std::fs::remove_dir_all(&out);
        }
        let best = pulls.iter().min().copied().unwrap_or(pulls[0]);
        let (push, first, pull) = (
            rate(bytes, push_time),
            rate(bytes, pulls[0]),
            rate(bytes, best),
        );
        println!(
            "| {mib} MiB | {push:.0} | {:.0}% | {first:.0} / {pull:.0} | {:.0}% | {:.0}% | {:.2} s |",
            100.0 * push / disk,
            100.0 * pull / b3,
            100.0 * pull / disk,
            (push_time + pulls[0]).as_secs_f64()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    registry.stop().await;
}
