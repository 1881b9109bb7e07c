//! Per-method training cost on MiniLM (batch 16, sequence 64): median step time, peak
//! memory, trainable values and delta size, next to full fine-tuning in the same run; and
//! peak memory at batch 1 for LoRA against full fine-tuning.
//!
//! `cargo bench -p delta-worker --bench methods` (fetches MiniLM through
//! scripts/fetch-minilm.sh). Each method runs in its own process so peak RSS is its own.
//! With `DELTA_BENCH_PYTHON` naming a Python that has torch, transformers and peft
//! (`scripts/bench-torch.sh` makes one and runs this), each method is also timed in
//! PyTorch on the same texts, batch, sequence and threads (`tests/python/bench_torch.py`),
//! and the table shows both and their ratio.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use delta_client::jobs::{Method, TrainSpec};
use delta_worker::data::Example;
use delta_worker::methods::Trainable;
use delta_worker::mounts::Mounts;
use delta_worker::run::LocalBase;

fn minilm() -> PathBuf {
    delta_worker::run::minilm_dir().expect("MiniLM")
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The training texts: sentences joined four at a time, so each fills 64 tokens.
fn texts(batch: usize, steps: usize) -> Vec<Example> {
    delta_worker::data::joined_sentences(batch * (steps + 1), 4, 3)
}

/// One method in this process: prints a JSON line.
fn one(method: Method, batch: usize, steps: usize) {
    delta_worker::alloc::tune_for_training();
    let base = LocalBase::open(&minilm(), &Device::Cpu).expect("MiniLM");
    let train = texts(batch, steps);
    let mut spec = TrainSpec::new(&[method]);
    spec.batch_size = batch;
    spec.max_steps = Some(steps + 1);
    spec.eval_every = 1_000_000;
    spec.max_len = 64;
    spec.modules = vec!["intermediate.dense".into(), "output.dense".into()];
    spec.targets = if method == Method::Diff {
        vec!["query".into(), "value".into()]
    } else {
        spec.targets
    };
    let labels = vec!["negative".to_owned(), "positive".to_owned()];
    let tok = base.tokenizer(64).expect("tokenizer");
    let data = tok.encode_all(&train, &labels).expect("encode");
    let t = Trainable::new(&spec, &base.weights, &labels).expect("trainable");
    let frozen = Mounts::new(&base.weights);
    let mut times = Vec::new();
    let mut last = Instant::now();
    delta_worker::train::train(&t, &frozen, &data, None, &mut |p| {
        let now = Instant::now();
        if p.step > 1 {
            times.push((now - last).as_secs_f64() * 1000.0);
        }
        last = now;
        Ok(())
    })
    .expect("train");
    times.sort_by(f64::total_cmp);
    let (tensors, _) = t.export().expect("export");
    let bytes: usize = tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "method": method, "batch": batch, "median_ms": times[times.len() / 2],
            "peak_rss_mb": peak_rss_mb(), "trainable": t.parameters(), "delta_bytes": bytes,
        })
    );
}

fn run(method: &str, batch: usize, steps: usize) -> BTreeMap<String, serde_json::Value> {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args(["--one", method, &batch.to_string(), &steps.to_string()])
        .output()
        .expect("run one method");
    assert!(
        out.status.success(),
        "{method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().last().unwrap_or("{}")).expect("json line")
}

/// One method in PyTorch (`tests/python/bench_torch.py`), in a process of its own.
fn run_torch(
    python: &str,
    texts: &std::path::Path,
    method: &str,
    threads: usize,
) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/bench_torch.py");
    let out = Command::new(python)
        .arg(script)
        .arg(minilm())
        .arg(texts)
        .args([method, "16", "4", &threads.to_string()])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "PyTorch {method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("json line")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let n = |k: usize| args[i + k].parse::<usize>().expect("number");
        one(args[i + 1].parse().expect("method"), n(2), n(3));
        return;
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let torch = std::env::var("DELTA_BENCH_PYTHON").ok().map(|python| {
        let file = std::env::temp_dir().join(format!("delta-bench-{}.jsonl", std::process::id()));
        let lines: String = texts(16, 4)
            .iter()
            .map(|e| serde_json::json!({"text": e.text, "label": e.label}).to_string() + "\n")
            .collect();
        std::fs::write(&file, lines).expect("write texts");
        (python, file)
    });
    println!("MiniLM-L6 (22.7M values), batch 16, sequence 64, {threads} threads, CPU");
    if torch.is_some() {
        println!(
            "| method | worker step (median of 4) | PyTorch step | ratio | peak RSS worker / PyTorch | vs full | trainable values | delta size | PyTorch side |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| method | step (median of 4) | vs full | peak RSS | trainable values | delta size |"
        );
        println!("|---|---|---|---|---|---|");
    }
    let full = run("full", 16, 4);
    let full_ms = full["median_ms"].as_f64().unwrap_or(f64::NAN);
    for m in Method::ALL.iter().map(|m| m.as_str()) {
        let r = if m == "full" {
            full.clone()
        } else {
            run(m, 16, 4)
        };
        let ms = r["median_ms"].as_f64().unwrap_or(f64::NAN);
        let rss = r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
        let size = r["delta_bytes"].as_f64().unwrap_or(0.0) / 1e6;
        match &torch {
            Some((python, file)) => {
                let t = run_torch(python, file, m, threads);
                let (tstep, ratio, trss) =
                    match (t["median_ms"].as_f64(), t["peak_rss_mb"].as_f64()) {
                        (Some(tms), Some(trss)) => (
                            format!("{tms:.0} ms"),
                            format!("{:.2}x", ms / tms),
                            format!("{trss:.0}"),
                        ),
                        _ => ("n/a".into(), "n/a".into(), "n/a".into()),
                    };
                println!(
                    "| {m} | {ms:.0} ms | {tstep} | {ratio} | {rss:.0} / {trss} MB | {:.2}x | {} | {size:.1} MB | {} |",
                    ms / full_ms,
                    r["trainable"],
                    t["equivalent"].as_str().unwrap_or("?")
                );
            }
            None => println!(
                "| {m} | {ms:.0} ms | {:.2}x | {rss:.0} MB | {} | {size:.1} MB |",
                ms / full_ms,
                r["trainable"]
            ),
        }
    }
    let (l1, f1) = (run("lora", 1, 4), run("full", 1, 4));
    let (lm, fm) = (
        l1["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        f1["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "\nbatch 1 peak RSS: lora {lm:.0} MB, full {fm:.0} MB ({:.0}% of full)",
        100.0 * lm / fm
    );
}
