//! A bounded loopback load test against one registry, reporting error rate and p50/p99
//! latency, after measuring how often the idle machine takes a core away for 2 ms or more
//! (the floor under any p99 here): 10 000 resolves from 32 callers as fast as they go (closed loop: the registry's
//! capacity), then 20 000 resolves offered at a fixed 10 000/s by 32 callers (open loop:
//! latency at that rate), 200 concurrent pulls, then (tokens on) 400 listings of 200
//! repositories in 20 namespaces by a one-namespace token.
//!
//! `cargo bench -p delta-tests --bench load` (`DELTA_LOAD_CALLERS`, `DELTA_LOAD_RATE`)

use std::time::{Duration, Instant};

use delta_client::{Remote, hub};
use delta_tests::{TestRegistry, fixtures};
use indicatif::ProgressBar;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut lat: Vec<Duration>, errors: usize, wall: Duration) {
    lat.sort();
    let n = lat.len() + errors;
    println!(
        "| {what} | {n} | {:.2}% | {:.2} ms | {:.2} ms | {:.0}/s |",
        100.0 * errors as f64 / n as f64,
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        n as f64 / wall.as_secs_f64()
    );
}

/// What the machine itself allows a 2 ms tail: one thread per core spins for `span`,
/// reading the clock, and notes every gap of 2 ms or more between two reads (time it did
/// not run: the hypervisor or the kernel had the core, with nothing else of ours running).
/// Returns how many such gaps there were, in all, and the longest.
fn hiccups(span: Duration) -> (usize, Duration) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let (start, mut last) = (Instant::now(), Instant::now());
                let (mut gaps, mut worst) = (0, Duration::ZERO);
                while last - start < span {
                    let now = Instant::now();
                    let gap = now - last;
                    if gap >= Duration::from_millis(2) {
                        gaps += 1;
                    }
                    worst = worst.max(gap);
                    last = now;
                }
                (gaps, worst)
            })
        })
        .collect();
    threads.into_iter().fold((0, Duration::ZERO), |(n, w), t| {
        let (gaps, worst) = t.join().expect("probe thread");
        (n + gaps, w.max(worst))
    })
}

/// Every caller's latencies and error count, together.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<(Vec<Duration>, usize)>>,
) -> (Vec<Duration>, usize) {
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("task");
        lat.extend(l);
        errors += e;
    }
    (lat, errors)
}

/// `requests` resolves offered at `rate` per second (open loop): a pacing thread hands
/// request i to caller i % callers at `i / rate` seconds after the start; each caller
/// works through its requests in order. A request's latency runs from its scheduled time,
/// so time spent queued behind a slow answer counts (no coordinated omission, as wrk2
/// measures). Returns the latencies, the error count and the time to the last answer.
async fn resolve_at_rate(
    clients: &[Remote],
    callers: usize,
    rate: f64,
    requests: usize,
) -> (Vec<Duration>, usize, Duration) {
    let start = Instant::now() + Duration::from_millis(20);
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for w in 0..callers {
        let c = clients[w % clients.len()].clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            while let Some(scheduled) = rx.recv().await {
                match c.resolve("load/delta:prod").await {
                    Ok(_) => lat.push(scheduled.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    // A thread, not a task: tokio's timers tick in whole milliseconds, which would send
    // the requests in bursts; a thread's sleep keeps to the schedule within microseconds.
    let pacer = std::thread::spawn(move || {
        for i in 0..requests {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if senders[i % senders.len()].send(at).is_err() {
                break;
            }
        }
    });
    let (lat, errors) = gather(tasks).await;
    let wall = start.elapsed();
    pacer.join().expect("pacer");
    (lat, errors, wall)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let registry = TestRegistry::start().await;
    let remote = registry.remote().await;
    let work = tempfile::tempdir().expect("tempdir");
    let base = work.path().join("base.safetensors");
    fixtures::write_base(&base, 1);
    let model = delta_client::tensors::Model::open(&base).expect("base");
    remote
        .add_base("tiny", &model.entries())
        .await
        .expect("add base");
    let dir = work.path().join("d");
    fixtures::write_native_lora(&dir, 1, 8, json!({}));
    hub::push(
        &remote,
        &dir,
        "load/delta:prod",
        "tiny",
        &[],
        &ProgressBar::hidden(),
    )
    .await
    .expect("push");
    let blob = remote
        .resolve("load/delta")
        .await
        .expect("resolve")
        .manifest
        .files[0]
        .digest;

    let (gaps, worst) = hiccups(Duration::from_secs(2));
    println!(
        "The machine, idle: one spinning thread per core for 2 s missed the core {gaps} times \
         for 2 ms or more (longest {:.2} ms).\n",
        worst.as_secs_f64() * 1e3
    );
    println!("| operation | requests | errors | p50 | p99 | throughput |");
    println!("|---|---|---|---|---|---|");

    // 10 000 resolves from 32 concurrent callers over 8 connections.
    let url = registry.url();
    let mut clients: Vec<Remote> = Vec::new();
    for _ in 0..8 {
        clients.push(Remote::connect(&url).await.expect("connect"));
    }
    let callers: usize = std::env::var("DELTA_LOAD_CALLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..callers {
        let c = clients[w % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            for _ in 0..10_000 / callers + usize::from(w < 10_000 % callers) {
                let t = Instant::now();
                match c.resolve("load/delta:prod").await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (lat, errors) = gather(tasks).await;
    report(
        &format!("resolve, {callers} callers as fast as they go"),
        lat,
        errors,
        start.elapsed(),
    );

    // The same resolve offered at a fixed rate: the latency a caller sees at that load.
    let rate: f64 = std::env::var("DELTA_LOAD_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r: &f64| *r >= 1.0)
        .unwrap_or(10_000.0);
    let requests = (2.0 * rate) as usize;
    let (lat, errors, wall) = resolve_at_rate(&clients, callers, rate, requests).await;
    report(
        &format!("resolve, {rate:.0}/s offered by {callers} callers"),
        lat,
        errors,
        wall,
    );

    // 200 concurrent pulls of the delta's blob, each into its own file, verified.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = clients[i % clients.len()].clone();
        let path = work.path().join(format!("pull-{i}"));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.download_to(blob, &path, &ProgressBar::hidden()).await;
            (t.elapsed(), r.is_ok())
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (d, ok) = t.await.expect("task");
        if ok {
            lat.push(d);
        } else {
            errors += 1;
        }
    }
    report("pull (verified)", lat, errors, start.elapsed());

    // 200 repositories in 20 namespaces, listed whole 400 times (8 callers) by a read
    // token of one namespace: every row's namespace is checked for the caller.
    for i in 0..200 {
        let dir = work.path().join(format!("r{i}"));
        fixtures::write_native_lora(&dir, 1, 8, json!({"n": i.to_string()}));
        let target = format!("ns{}/repo{i}", i % 20);
        hub::push(&remote, &dir, &target, "tiny", &[], &ProgressBar::hidden())
            .await
            .expect("push");
    }
    let meta = delta_registry::SqlMeta::open(&registry.dir.path().join("registry.sqlite"))
        .expect("open metadata");
    let secret = tokio::task::block_in_place(|| {
        delta_tests::new_token(&meta, "ns0", delta_registry::auth::Scope::Read, false)
    });
    let mut readers = Vec::new();
    for c in &clients {
        readers.push(c.with_token(Some(&secret)).expect("token"));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in &readers {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            for _ in 0..50 {
                let t = Instant::now();
                match c.list_repositories("").await {
                    Ok(r) if r.len() == 10 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (lat, errors) = gather(tasks).await;
    report(
        "list 200 repositories (10 readable)",
        lat,
        errors,
        start.elapsed(),
    );
    drop((clients, readers));
    registry.stop().await;
}
