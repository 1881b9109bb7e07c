//! `delta train`, `delta verify` and `delta job`: submit jobs to the registry's queue and
//! follow them (step, loss, eval metric, steps/s) until a worker finishes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::Ctx;
use crate::jobs::{Job, JobEvent, JobKind, JobState, Progress, TrainJob, TrainSpec, VerifyJob};
use crate::remote::Remote;
use delta_proto::Digest;

/// Arguments of `delta train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The registered base model (name or fingerprint).
    #[arg(long)]
    pub base: String,
    /// Training data (JSONL: {"text": …, "label": …}, optional "text_pair").
    #[arg(long)]
    pub train: PathBuf,
    /// Evaluation data (same format); the best checkpoint on it is kept.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Where the trained delta is pushed: NAMESPACE/NAME[:TAG].
    #[arg(long)]
    pub push: String,
    /// Train on top of these frozen deltas (references, application order).
    #[arg(long = "parent")]
    pub parents: Vec<String>,
    /// Stream progress until the job ends.
    #[arg(long)]
    pub follow: bool,
    /// Methods and hyper-parameters.
    #[command(flatten)]
    pub spec: TrainSpec,
}

/// Arguments of `delta verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The delta to verify.
    pub reference: String,
    /// Evaluation data (JSONL).
    #[arg(long)]
    pub eval: PathBuf,
    /// Wait for the report and print it.
    #[arg(long)]
    pub follow: bool,
}

/// Arguments of `delta job`.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Job id.
    pub id: u64,
    /// Stream progress until the job ends.
    #[arg(long)]
    pub follow: bool,
}

/// `delta train`.
pub async fn train(args: TrainArgs, ctx: &Ctx) -> anyhow::Result<()> {
    args.spec.check().map_err(anyhow::Error::msg)?;
    let (repo, tag) = crate::hub::parse_target(&args.push)?;
    let remote = ctx.remote().await?;
    let base = remote
        .get_base(&args.base)
        .await
        .with_context(|| format!("base {} is not registered (delta base add)", args.base))?;
    let mut blobs = Vec::new();
    let train = upload(&remote, ctx, &args.train).await?;
    blobs.push(train);
    let eval = match &args.eval {
        Some(p) => {
            let d = upload(&remote, ctx, p).await?;
            blobs.push(d);
            Some(d)
        }
        None => None,
    };
    let mut parents = Vec::new();
    for p in &args.parents {
        let r = remote
            .resolve(p)
            .await
            .with_context(|| format!("cannot resolve parent {p}"))?;
        if r.manifest.base.fingerprint != base.fingerprint {
            bail!(
                "parent {p} belongs to another base ({})",
                r.manifest.base.fingerprint
            );
        }
        parents.push(format!("{}@{}", r.repository, r.digest));
    }
    let job = TrainJob {
        base: base.fingerprint,
        base_name: Some(base.name.clone()),
        train,
        eval,
        parents,
        spec: args.spec,
    };
    let info = remote
        .submit_job(
            JobKind::Train,
            &serde_json::to_value(&job)?,
            &repo.to_string(),
            &tag.into_iter().collect::<Vec<_>>(),
            &blobs,
        )
        .await?;
    finish(&remote, ctx, info, args.follow).await
}

/// `delta verify`.
pub async fn verify(args: VerifyArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = ctx.remote().await?;
    let eval = upload(&remote, ctx, &args.eval).await?;
    let r = remote
        .resolve(&args.reference)
        .await
        .with_context(|| format!("cannot resolve {}", args.reference))?;
    let job = VerifyJob {
        manifest: r.digest,
        reference: Some(args.reference.clone()),
        eval,
    };
    let info = remote
        .submit_job(
            JobKind::Verify,
            &serde_json::to_value(&job)?,
            &args.reference,
            &[],
            &[eval],
        )
        .await?;
    finish(&remote, ctx, info, args.follow).await
}

/// `delta job`.
pub async fn job(args: JobArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = ctx.remote().await?;
    let (info, _) = remote.get_job(args.id, u64::MAX).await?;
    finish(&remote, ctx, info, args.follow).await
}

async fn upload(remote: &Remote, ctx: &Ctx, path: &std::path::Path) -> anyhow::Result<Digest> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    check_jsonl(&bytes, &path.display().to_string())?;
    let bar = ctx.progress(&format!("uploading {}", path.display()));
    let d = remote.upload_blob_file(path, &bar).await?;
    bar.finish_and_clear();
    Ok(d)
}

/// Refuses data a worker would refuse, before anything is queued: the worker's own parser,
/// and a label on every example.
fn check_jsonl(bytes: &[u8], what: &str) -> anyhow::Result<()> {
    let examples = crate::jobs::parse_jsonl(bytes, what)?;
    if let Some(i) = examples.iter().position(|e| e.label.is_empty()) {
        bail!("{what}: example {} has no \"label\"", i + 1);
    }
    Ok(())
}

/// A verification report as people read it: the verdict, where it ran, each check, the
/// metrics measured and whether they equal the recorded ones.
fn verification_summary(report: &serde_json::Value) -> String {
    let verdict = if report["passed"] == json!(true) {
        "passed"
    } else {
        "FAILED"
    };
    let mut out = format!(
        "verification {verdict} on {} ({})\n",
        report["worker"].as_str().unwrap_or("?"),
        report["device"].as_str().unwrap_or("?")
    );
    for c in report["checks"].as_array().into_iter().flatten() {
        out.push_str(&format!("  check: {}\n", c.as_str().unwrap_or("?")));
    }
    if let Some(m) = report["metrics"].as_object() {
        let shown: Vec<String> = m
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(x) => format!("{k} {x:.6}"),
                None => format!("{k} {v}"),
            })
            .collect();
        out.push_str(&format!("  measured: {}\n", shown.join(", ")));
    }
    match report["matches_recorded"].as_bool() {
        Some(true) => out.push_str("  equal to the metrics recorded at training\n"),
        Some(false) => out.push_str("  DIFFERENT from the metrics recorded at training\n"),
        None => out.push_str("  no recorded metrics to compare\n"),
    }
    out
}

fn info_json(info: &Job) -> serde_json::Value {
    let result: serde_json::Value = serde_json::from_str(&info.result).unwrap_or(json!(null));
    json!({
        "id": info.id, "kind": info.kind.as_str(), "state": info.state.as_str(), "repository": info.repository,
        "attempts": info.attempts, "worker": info.worker, "result": result, "error": info.error,
    })
}

/// Prints the job, and with `follow` streams its events until it ends; a failed job is an
/// error (exit 1).
async fn finish(remote: &Remote, ctx: &Ctx, mut info: Job, follow: bool) -> anyhow::Result<()> {
    if !ctx.json {
        eprintln!("job {} ({}) {}", info.id, info.kind, info.state);
    }
    let mut seen = 0u64;
    // Prints a change; returns the last event's number.
    let show = |now: &Job, events: Vec<JobEvent>, was: JobState| {
        if now.state != was && !ctx.json {
            eprintln!("job {} {} {}", now.id, now.state, now.worker);
        }
        let mut last = 0;
        for e in events {
            last = last.max(e.seq);
            if ctx.json {
                println!("{}", e.body);
            } else {
                let p: Progress = serde_json::from_str(&e.body).unwrap_or_default();
                eprintln!("{p}");
            }
        }
        last
    };
    let running = |i: &Job| !i.state.is_final();
    if follow && running(&info) {
        // The registry pushes each change; one without WatchJob is polled.
        match remote.watch_job(info.id, 0).await? {
            Some(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = futures::StreamExt::next(&mut stream).await {
                    let (now, events) = item?;
                    seen = seen.max(show(&now, events, info.state));
                    info = now;
                    if !running(&info) {
                        break;
                    }
                }
            }
            None => {
                while running(&info) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let (now, events) = remote.get_job(info.id, seen).await?;
                    seen = seen.max(show(&now, events, info.state));
                    info = now;
                }
            }
        }
    }
    if ctx.json && follow {
        // Following prints one JSON object per line (the events, then the job).
        println!("{}", serde_json::to_string(&info_json(&info))?);
    } else if ctx.json {
        ctx.print_json(&info_json(&info))?;
    } else if info.state == JobState::Succeeded {
        let result: serde_json::Value = serde_json::from_str(&info.result).unwrap_or(json!(null));
        if info.kind == JobKind::Train {
            println!(
                "pushed {}:v{}  {}",
                result["repository"].as_str().unwrap_or("?"),
                result["version"],
                result["digest"].as_str().unwrap_or("?")
            );
        } else {
            print!("{}", verification_summary(&result));
        }
    } else if !follow {
        println!("job {} is {}", info.id, info.state);
    }
    if info.state == JobState::Failed {
        bail!("job {} failed: {}", info.id, info.error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verification_report_reads_as_sentences_not_json() {
        let report = json!({
            "manifest": "blake3:00", "passed": true, "worker": "w1", "device": "cpu",
            "checks": ["base fingerprint blake3:aa matches", "blake3:00: every tensor is finite"],
            "metrics": {"eval_accuracy": 0.9375, "eval_loss": 0.25}, "recorded": {},
            "matches_recorded": true,
        });
        let text = verification_summary(&report);
        assert_eq!(
            text,
            "verification passed on w1 (cpu)\n  check: base fingerprint blake3:aa matches\n  \
             check: blake3:00: every tensor is finite\n  measured: eval_accuracy 0.937500, \
             eval_loss 0.250000\n  equal to the metrics recorded at training\n"
        );
        assert!(!text.contains('{'));
        let failed = verification_summary(&json!({"passed": false, "matches_recorded": false}));
        assert!(failed.starts_with("verification FAILED") && failed.contains("DIFFERENT"));
    }
}
