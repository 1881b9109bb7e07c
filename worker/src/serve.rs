//! `delta-worker serve`: lease jobs from a registry, run them, publish the results.
//!
//! One job at a time, or with `--co-train K` up to K training jobs on one base trained
//! together in mixed batches (each with its own lease, progress and result). While a job runs, a task renews its lease every third of the lease
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
use delta_client::hub::{self, Cache};
use delta_client::jobs::{Job, JobKind, JobSpec, Progress, TrainJob};
use delta_proto::Digest;
use delta_proto::tokens::{CallerKind, Scope};
use indicatif::ProgressBar;

use crate::data::parse_jsonl;
use crate::run::{Delta, LocalBase, TrainRequest, co_train_to_dirs, verify};

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
    /// Training jobs on one base trained together in mixed batches (1: one at a time).
    pub co_train: usize,
    /// How training runs its products (`--precision`; verification follows what the
    /// delta records).
    pub precision: crate::fused::Precision,
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
async fn job_kinds(remote: &Remote) -> Result<Vec<JobKind>> {
    let me = remote.whoami().await?;
    if me.kind == CallerKind::Anonymous {
        bail!("the registry requires a token for workers: set DELTA_TOKEN to a worker token");
    }
    if me.scope == Some(Scope::Read) {
        tracing::warn!(
            namespace = %me.namespace,
            "read-scope token: verifying only; training jobs need a `--worker --scope write` token"
        );
        return Ok(vec![JobKind::Verify]);
    }
    Ok(JobKind::ALL.to_vec())
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
        // With --co-train K, up to K - 1 more training jobs on the same base join it
        // (without waiting: whatever is queued now).
        let mut group = vec![(job, lease)];
        if opts.co_train > 1
            && group[0].0.kind == JobKind::Train
            && let Ok(JobSpec::Train(spec)) = JobSpec::parse(group[0].0.kind, &group[0].0.spec)
        {
            let fp = spec.base;
            let train = [JobKind::Train];
            while group.len() < opts.co_train {
                match remote
                    .lease_job_on(&opts.name, &train, &[fp], opts.lease_seconds, 0)
                    .await
                {
                    Ok(Some(more)) => group.push(more),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "leasing a job to train alongside failed");
                        break;
                    }
                }
            }
        }
        let mut leased = Vec::with_capacity(group.len());
        let mut renewers = Vec::with_capacity(group.len());
        for (job, lease) in group {
            tracing::info!(job = job.id, kind = %job.kind, attempt = job.attempts, "running job");
            let lost = Arc::new(AtomicBool::new(false));
            renewers.push(renew(
                &remote,
                &job,
                &lease,
                opts.lease_seconds,
                lost.clone(),
            ));
            leased.push(Leased { job, lease, lost });
        }
        let outcomes = if leased.len() > 1 {
            tracing::info!(jobs = leased.len(), "training together in mixed batches");
            train_jobs(&remote, &cache, &bases, &opts, &leased).await
        } else {
            let l = &leased[0];
            vec![
                run_job(
                    &remote,
                    &cache,
                    &bases,
                    &opts,
                    &l.job,
                    &l.lease,
                    l.lost.clone(),
                )
                .await,
            ]
        };
        for r in renewers {
            r.abort();
        }
        for (l, outcome) in leased.iter().zip(outcomes) {
            complete(&remote, l, outcome).await;
            done += 1;
        }
    }
}

/// Renews a lease every third of its length until aborted; a refused renewal (the job
/// went to another worker) sets `lost`.
fn renew(
    remote: &Remote,
    job: &Job,
    lease: &str,
    secs: u32,
    lost: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (remote, lease, id) = (remote.clone(), lease.to_owned(), job.id);
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
}

/// Ends a job on the registry with its outcome (nothing, if its lease was lost).
async fn complete(remote: &Remote, l: &Leased, outcome: Result<Finished>) {
    let (job, lease) = (&l.job, l.lease.as_str());
    if l.lost.load(Ordering::Relaxed) {
        tracing::warn!(job = job.id, "lease lost; result dropped");
        return;
    }
    let completed = match outcome {
        Ok(Finished::Trained(manifest)) => {
            remote
                .complete_job(job.id, lease, None, Some(&manifest), None)
                .await
        }
        Ok(Finished::Verified(report)) => {
            remote
                .complete_job(job.id, lease, None, None, Some(&report))
                .await
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!(job = job.id, error = %msg, "job failed");
            remote
                .complete_job(job.id, lease, Some(&msg), None, None)
                .await
        }
    };
    match completed {
        Ok(info) => {
            tracing::info!(job = info.id, state = %info.state, result = %info.result, "job completed")
        }
        Err(e) => tracing::warn!(job = job.id, error = %e, "completing the job failed"),
    }
}

enum Finished {
    Trained(Box<delta_proto::manifest::Manifest>),
    Verified(String),
}

async fn blob(remote: &Remote, cache: &Cache, digest: Digest) -> Result<Vec<u8>> {
    let (path, _) = cache.fetch(remote, digest, &ProgressBar::hidden()).await?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// Fetches a delta and, first, every parent it needs, into a chain in application order
/// (`delta_client::hub::fetch_chain`: each parent pinned by the digest its child
/// recorded, each delta once).
pub async fn fetch_chain(remote: &Remote, cache: &Cache, reference: &str) -> Result<Vec<Delta>> {
    let reports = hub::fetch_chain(remote, cache, reference, &ProgressBar::hidden())
        .await
        .with_context(|| format!("pulling {reference} and its parents"))?;
    reports
        .into_iter()
        .map(|r| {
            let mut d = Delta::load_files(r.manifest, &r.blobs)?;
            d.reference = Some(format!("{}@{}", r.repository, r.digest));
            Ok(d)
        })
        .collect()
}

/// A leased job: its lease, and the flag its renewer sets if the lease is lost.
struct Leased {
    job: Job,
    lease: String,
    lost: Arc<AtomicBool>,
}

/// A training job's inputs, fetched.
struct TrainInput {
    spec: TrainJob,
    fp: Digest,
    train: Vec<delta_client::jobs::Example>,
    eval: Option<Vec<delta_client::jobs::Example>>,
    parents: Vec<Delta>,
}

async fn fetch_train_input(remote: &Remote, cache: &Cache, job: &Job) -> Result<TrainInput> {
    // Parsed and checked as the registry checks a submitted spec, so one queued by an older
    // registry that would not pass today fails here, naming its field.
    let JobSpec::Train(spec) = JobSpec::parse(job.kind, &job.spec)? else {
        bail!("job {} is not a training job", job.id);
    };
    let spec = *spec;
    let fp = spec.base;
    let train = parse_jsonl(&blob(remote, cache, spec.train).await?, "training data")?;
    let eval = match spec.eval {
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
    Ok(TrainInput {
        spec,
        fp,
        train,
        eval,
        parents,
    })
}

/// Trains leased jobs on one base, together in mixed batches where their deltas allow
/// (`--co-train`; one job trains alone), reporting each job's progress on its own lease,
/// and uploads each trained delta's blobs. One result per job, in order: a job whose
/// inputs cannot be fetched, whose training fails or whose lease is lost fails alone.
async fn train_jobs(
    remote: &Remote,
    cache: &Cache,
    bases: &HashMap<Digest, PathBuf>,
    opts: &ServeOptions,
    jobs: &[Leased],
) -> Vec<Result<Finished>> {
    let mut results: Vec<Option<Result<Finished>>> = jobs.iter().map(|_| None).collect();
    let mut inputs = Vec::new();
    for (i, l) in jobs.iter().enumerate() {
        match fetch_train_input(remote, cache, &l.job).await {
            Ok(input) => inputs.push((i, input)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    if let Some((_, first)) = inputs.first() {
        let fp = first.fp;
        match bases.get(&fp) {
            None => {
                for (i, _) in inputs.drain(..) {
                    results[i] = Some(Err(anyhow::anyhow!(
                        "this worker has no base with fingerprint {fp}"
                    )));
                }
            }
            Some(dir) => {
                let dir = dir.clone();
                // Jobs are leased for one base; anything else waits for its own group.
                let (same, other): (Vec<_>, Vec<_>) =
                    inputs.into_iter().partition(|(_, x)| x.fp == fp);
                for (i, x) in other {
                    results[i] = Some(Err(anyhow::anyhow!(
                        "job is for base {}, not the group's {fp}",
                        x.fp
                    )));
                }
                for (i, r) in train_group(remote, opts, jobs, dir, fp, same).await {
                    results[i] = Some(r);
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("the job was not run"))))
        .collect()
}

async fn train_group(
    remote: &Remote,
    opts: &ServeOptions,
    jobs: &[Leased],
    dir: PathBuf,
    fp: Digest,
    inputs: Vec<(usize, TrainInput)>,
) -> Vec<(usize, Result<Finished>)> {
    let index: Vec<usize> = inputs.iter().map(|(i, _)| *i).collect();
    let outs: Vec<tempfile::TempDir> = match (0..inputs.len())
        .map(|_| tempfile::tempdir())
        .collect::<std::io::Result<Vec<_>>>()
    {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("creating a temporary folder: {e}");
            return index
                .into_iter()
                .map(|i| (i, Err(anyhow::anyhow!("{msg}"))))
                .collect();
        }
    };
    let out_paths: Vec<PathBuf> = outs.iter().map(|o| o.path().to_owned()).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Progress)>();
    let (device, precision) = (opts.device.clone(), opts.precision);
    let stops: Vec<Arc<AtomicBool>> = index.iter().map(|&i| jobs[i].lost.clone()).collect();
    let provenances: Vec<std::collections::BTreeMap<String, serde_json::Value>> = index
        .iter()
        .zip(&inputs)
        .map(|(&i, (_, x))| {
            let mut p = std::collections::BTreeMap::new();
            p.insert("job".into(), serde_json::json!(jobs[i].job.id));
            p.insert("worker".into(), serde_json::json!(opts.name));
            p.insert("device".into(), serde_json::json!(opts.device_name));
            p.insert(
                "datasets".into(),
                serde_json::json!({ "train": x.spec.train, "eval": x.spec.eval }),
            );
            if index.len() > 1 {
                p.insert("co_trained_with".into(), serde_json::json!(index.len() - 1));
            }
            p
        })
        .collect();
    let handle =
        tokio::task::spawn_blocking(move || -> Result<Vec<Result<crate::run::Trained>>> {
            let mut base = LocalBase::open_known(&dir, &device, fp)?;
            base.weights.set_precision(precision)?;
            let reqs: Vec<TrainRequest<'_>> = inputs
                .iter()
                .zip(provenances)
                .map(|((_, x), provenance)| TrainRequest {
                    spec: &x.spec.spec,
                    parents: &x.parents,
                    train: &x.train,
                    eval: x.eval.as_deref(),
                    base_name: x.spec.base_name.clone(),
                    provenance,
                })
                .collect();
            Ok(co_train_to_dirs(&base, &reqs, &out_paths, &mut |k, p| {
                if stops[k].load(Ordering::Relaxed) {
                    bail!("the lease was lost");
                }
                let _ = tx.send((k, p.clone()));
                Ok(())
            }))
        });
    // Forward progress while training runs: per job, every event with eval results, the
    // first steps, and then about one step event a second.
    let mut last: Vec<Option<std::time::Instant>> = vec![None; index.len()];
    while let Some((k, p)) = rx.recv().await {
        let important = p.message.is_some() || p.eval_accuracy.is_some() || p.step <= 1;
        if important || last[k].is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last[k] = Some(std::time::Instant::now());
            let l = &jobs[index[k]];
            let Ok(body) = serde_json::to_string(&p) else {
                continue;
            };
            if let Err(e) = remote.report_progress(l.job.id, &l.lease, &body).await {
                tracing::warn!(job = l.job.id, error = %e, "progress report refused");
            }
        }
    }
    let trained = match handle.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            return index
                .into_iter()
                .map(|i| (i, Err(anyhow::anyhow!("{msg}"))))
                .collect();
        }
        Err(e) => {
            return index
                .into_iter()
                .map(|i| (i, Err(anyhow::anyhow!("training panicked: {e}"))))
                .collect();
        }
    };
    let mut out = Vec::with_capacity(index.len());
    for (k, t) in trained.into_iter().enumerate() {
        let r = match t {
            Ok(t) => upload(remote, &t)
                .await
                .map(|()| Finished::Trained(Box::new(t.manifest))),
            Err(e) => Err(e),
        };
        out.push((index[k], r));
    }
    drop(outs);
    out
}

/// Uploads the blobs of a trained delta the registry lacks (its manifest is published by
/// `CompleteJob`).
async fn upload(remote: &Remote, trained: &crate::run::Trained) -> Result<()> {
    let m = &trained.manifest;
    let paths: Vec<PathBuf> = m.files.iter().map(|f| trained.dir.join(&f.path)).collect();
    hub::upload_missing(remote, m, &paths, &ProgressBar::hidden()).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    remote: &Remote,
    cache: &Cache,
    bases: &HashMap<Digest, PathBuf>,
    opts: &ServeOptions,
    job: &Job,
    lease: &str,
    lost: Arc<AtomicBool>,
) -> Result<Finished> {
    match job.kind {
        JobKind::Train => {
            let leased = Leased {
                job: job.clone(),
                lease: lease.to_owned(),
                lost,
            };
            train_jobs(remote, cache, bases, opts, std::slice::from_ref(&leased))
                .await
                .pop()
                .unwrap_or_else(|| Err(anyhow::anyhow!("the job was not run")))
        }
        JobKind::Verify => {
            let JobSpec::Verify(spec) = JobSpec::parse(job.kind, &job.spec)? else {
                bail!("job {} is not a verification job", job.id);
            };
            let eval = parse_jsonl(&blob(remote, cache, spec.eval).await?, "evaluation data")?;
            let chain = fetch_chain(remote, cache, &job.repository).await?;
            let last = chain.last().context("nothing to verify")?;
            if last.manifest.digest() != spec.manifest {
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
            let precision = crate::fused::Precision::recorded(&last.manifest.provenance);
            let report = tokio::task::spawn_blocking(move || -> Result<_> {
                let mut base = LocalBase::open_known(&dir, &device, fp)?;
                base.weights.set_precision(precision)?;
                verify(&base, &chain, &eval, &name, &device_name)
            })
            .await??;
            Ok(Finished::Verified(serde_json::to_string(&report)?))
        }
    }
}
