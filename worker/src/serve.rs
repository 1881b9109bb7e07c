//! `delta-worker serve`: lease jobs from a registry, run them, publish the results.
//!
//! One job at a time. While a job runs, a task renews its lease every third of the lease
//! time; if a renewal is refused (the lease expired and the job went to another worker)
//! the run is stopped at the next step and nothing is published. A training job's blobs
//! are uploaded first and its manifest is published by `CompleteJob`, which the registry
//! commits together with the job's end: a worker killed at any point leaves no version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use delta_client::Remote;
use delta_client::hub::{Cache, fetch};
use delta_client::jobs::{KIND_TRAIN, KIND_VERIFY, Progress, TrainJob, VerifyJob};
use delta_proto::Digest;
use indicatif::ProgressBar;

use crate::data::parse_jsonl;
use crate::run::{Delta, LocalBase, TrainRequest, train_to_dir, verify};

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Folder of base model folders (each with config.json, model.safetensors,
    /// tokenizer.json); bases are matched to jobs by fingerprint.
    pub models: PathBuf,
    /// Cache for datasets and deltas.
    pub cache: PathBuf,
    /// Device.
    pub device: Device,
    /// Device in words (for reports).
    pub device_name: String,
    /// Worker name recorded on jobs.
    pub name: String,
    /// Lease length asked for.
    pub lease_seconds: u32,
    /// Wait between polls when no job is waiting.
    pub poll: Duration,
    /// Stop after this many jobs (tests, batch use).
    pub max_jobs: Option<usize>,
}

/// Base folders under `models` by fingerprint.
pub fn scan_models(models: &Path) -> Result<HashMap<Digest, PathBuf>> {
    let mut out = HashMap::new();
    let entries =
        std::fs::read_dir(models).with_context(|| format!("reading {}", models.display()))?;
    for e in entries {
        let dir = e?.path();
        if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
            let fp = crate::run::fingerprint(&dir)?;
            tracing::info!(base = %dir.display(), fingerprint = %fp, "base available");
            out.insert(fp, dir);
        }
    }
    Ok(out)
}

/// The job kinds this worker's token may run: training publishes a delta, so it needs a
/// write-scope token; a read-scope token only verifies. The registry refuses a read-scope
/// worker that asks for training jobs, so asking for what the token allows keeps such a
/// worker useful (and says so once at start-up).
async fn job_kinds(remote: &Remote) -> Result<Vec<String>> {
    let me = remote.whoami().await?;
    if me.kind == "anonymous" {
        bail!("the registry requires a token for workers: set DELTA_TOKEN to a worker token");
    }
    if me.scope == "read" {
        tracing::warn!(
            namespace = %me.namespace,
            "read-scope token: verifying only; training jobs need a `--worker --scope write` token"
        );
        return Ok(vec![KIND_VERIFY.to_owned()]);
    }
    Ok(vec![KIND_TRAIN.to_owned(), KIND_VERIFY.to_owned()])
}

/// How long an idle worker's lease call waits at the registry for a job (long poll).
const LEASE_WAIT_SECONDS: u32 = 20;

/// Runs the job loop until `max_jobs` jobs are done (or forever).
pub async fn serve(remote: Remote, opts: ServeOptions) -> Result<()> {
    let bases = scan_models(&opts.models)?;
    if bases.is_empty() {
        bail!(
            "{} holds no base model folders (config.json + model.safetensors + tokenizer.json)",
            opts.models.display()
        );
    }
    let cache = Cache::new(&opts.cache);
    let kinds = job_kinds(&remote).await?;
    // Jobs on bases this worker lacks wait for a worker that holds them.
    let held: Vec<Digest> = bases.keys().copied().collect();
    let mut done = 0usize;
    loop {
        if opts.max_jobs.is_some_and(|m| done >= m) {
            return Ok(());
        }
        let asked = std::time::Instant::now();
        let leased = remote
            .lease_job_on(
                &opts.name,
                &kinds,
                &held,
                opts.lease_seconds,
                LEASE_WAIT_SECONDS,
            )
            .await?;
        let Some((job, lease)) = leased else {
            // The registry held the call until its wait was over; one that answers at once
            // (a registry without long polls) is asked again after `poll`.
            if asked.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(opts.poll).await;
            }
            continue;
        };
        tracing::info!(job = job.id, kind = %job.kind, attempt = job.attempts, "running job");
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (remote, lease, lost) = (remote.clone(), lease.clone(), lost.clone());
            let (id, secs) = (job.id, opts.lease_seconds);
            tokio::spawn(async move {
                let every = Duration::from_millis(u64::from(secs.max(1)) * 1000 / 3);
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = remote.renew_lease(id, &lease, secs).await {
                        tracing::warn!(job = id, error = %e, "lease lost");
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })
        };
        let outcome = run_job(&remote, &cache, &bases, &opts, &job, &lease, lost.clone()).await;
        renewer.abort();
        if lost.load(Ordering::Relaxed) {
            tracing::warn!(job = job.id, "lease lost; result dropped");
            continue;
        }
        let completed = match outcome {
            Ok(Finished::Trained(manifest)) => {
                remote
                    .complete_job(job.id, &lease, None, Some(&manifest), None)
                    .await
            }
            Ok(Finished::Verified(report)) => {
                remote
                    .complete_job(job.id, &lease, None, None, Some(&report))
                    .await
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(job = job.id, error = %msg, "job failed");
                remote
                    .complete_job(job.id, &lease, Some(&msg), None, None)
                    .await
            }
        };
        match completed {
            Ok(info) => {
                tracing::info!(job = info.id, state = %info.state, result = %info.result, "job completed")
            }
            Err(e) => tracing::warn!(job = job.id, error = %e, "completing the job failed"),
        }
        done += 1;
    }
}

enum Finished {
    Trained(Box<delta_proto::manifest::Manifest>),
    Verified(String),
}

async fn blob(remote: &Remote, cache: &Cache, digest: &str) -> Result<Vec<u8>> {
    let d: Digest = digest
        .parse()
        .with_context(|| format!("bad digest {digest}"))?;
    cache.fetch(remote, d, &ProgressBar::hidden()).await?;
    let path = cache.blob_path(&d);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// Fetches a delta and, first, every parent it names (recursively), into a chain in
/// application order.
pub async fn fetch_chain(remote: &Remote, cache: &Cache, reference: &str) -> Result<Vec<Delta>> {
    let mut chain = Vec::new();
    let mut pending = vec![reference.to_owned()];
    while let Some(r) = pending.pop() {
        if chain.len() > 64 {
            bail!("parent chain of {reference} is longer than 64");
        }
        let report = fetch(remote, cache, &r, &ProgressBar::hidden())
            .await
            .with_context(|| format!("pulling {r}"))?;
        let mut d = Delta::load_files(report.manifest, &report.blobs)?;
        d.reference = Some(format!("{}@{}", report.repository, report.digest));
        for p in &d.manifest.parents {
            let repo_ref = p
                .reference
                .clone()
                .with_context(|| format!("{r}: parent {} has no reference", p.digest))?;
            pending.push(repo_ref);
        }
        chain.push(d);
    }
    chain.reverse();
    Ok(chain)
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    remote: &Remote,
    cache: &Cache,
    bases: &HashMap<Digest, PathBuf>,
    opts: &ServeOptions,
    job: &delta_proto::JobInfo,
    lease: &str,
    lost: Arc<AtomicBool>,
) -> Result<Finished> {
    match job.kind.as_str() {
        KIND_TRAIN => {
            let spec: TrainJob =
                serde_json::from_str(&job.spec).context("the job's spec is not a training spec")?;
            let fp: Digest = spec.base.parse().context("bad base fingerprint")?;
            let dir = bases
                .get(&fp)
                .with_context(|| format!("this worker has no base with fingerprint {fp}"))?
                .clone();
            let train = parse_jsonl(&blob(remote, cache, &spec.train).await?, "training data")?;
            let eval = match &spec.eval {
                Some(d) => Some(parse_jsonl(
                    &blob(remote, cache, d).await?,
                    "evaluation data",
                )?),
                None => None,
            };
            let mut parents = Vec::new();
            for p in &spec.parents {
                parents.extend(fetch_chain(remote, cache, p).await?);
            }
            let out = tempfile::tempdir()?;
            let out_path = out.path().to_owned();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
            let device = opts.device.clone();
            let mut provenance = std::collections::BTreeMap::new();
            provenance.insert("job".into(), serde_json::json!(job.id));
            provenance.insert("worker".into(), serde_json::json!(opts.name));
            provenance.insert("device".into(), serde_json::json!(opts.device_name));
            provenance.insert(
                "datasets".into(),
                serde_json::json!({ "train": spec.train, "eval": spec.eval }),
            );
            let base_name = spec.base_name.clone();
            let train_spec = spec.spec.clone();
            let stop = lost.clone();
            let handle = tokio::task::spawn_blocking(move || -> Result<_> {
                let base = LocalBase::open_known(&dir, &device, fp)?;
                let req = TrainRequest {
                    spec: &train_spec,
                    parents: &parents,
                    train: &train,
                    eval: eval.as_deref(),
                    base_name,
                    provenance,
                };
                train_to_dir(&base, &req, &out_path, &mut |p| {
                    if stop.load(Ordering::Relaxed) {
                        bail!("the lease was lost");
                    }
                    let _ = tx.send(p.clone());
                    Ok(())
                })
            });
            // Forward progress while training runs: every event with eval results, the
            // first steps, and then about one step event a second.
            let mut last = std::time::Instant::now();
            while let Some(p) = rx.recv().await {
                let important = p.message.is_some() || p.eval_accuracy.is_some() || p.step <= 1;
                if important || last.elapsed() >= Duration::from_secs(1) {
                    last = std::time::Instant::now();
                    let body = serde_json::to_string(&p)?;
                    if let Err(e) = remote.report_progress(job.id, lease, &body).await {
                        tracing::warn!(job = job.id, error = %e, "progress report refused");
                    }
                }
            }
            let trained = handle.await??;
            let paths: Vec<PathBuf> = trained
                .manifest
                .files
                .iter()
                .map(|f| trained.dir.join(&f.path))
                .collect();
            let digests: Vec<Digest> = trained.manifest.files.iter().map(|f| f.digest).collect();
            let missing = remote.missing(&digests).await?;
            for (f, path) in trained.manifest.files.iter().zip(&paths) {
                if missing.contains(&f.digest) {
                    remote
                        .upload_file(path, f.digest, f.size, &ProgressBar::hidden())
                        .await?;
                }
            }
            drop(out);
            Ok(Finished::Trained(Box::new(trained.manifest)))
        }
        KIND_VERIFY => {
            let spec: VerifyJob = serde_json::from_str(&job.spec)
                .context("the job's spec is not a verification spec")?;
            let eval = parse_jsonl(&blob(remote, cache, &spec.eval).await?, "evaluation data")?;
            let chain = fetch_chain(remote, cache, &job.repository).await?;
            let last = chain.last().context("nothing to verify")?;
            if last.manifest.digest().to_string() != spec.manifest {
                bail!(
                    "{} now resolves to {}, not the submitted {}",
                    job.repository,
                    last.manifest.digest(),
                    spec.manifest
                );
            }
            let fp = last.manifest.base.fingerprint;
            let dir = bases
                .get(&fp)
                .with_context(|| format!("this worker has no base with fingerprint {fp}"))?
                .clone();
            let (device, name, device_name) = (
                opts.device.clone(),
                opts.name.clone(),
                opts.device_name.clone(),
            );
            let report = tokio::task::spawn_blocking(move || -> Result<_> {
                let base = LocalBase::open_known(&dir, &device, fp)?;
                verify(&base, &chain, &eval, &name, &device_name)
            })
            .await??;
            Ok(Finished::Verified(serde_json::to_string(&report)?))
        }
        other => bail!("job kind {other:?} is not one this worker runs"),
    }
}
