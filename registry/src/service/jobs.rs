//! Job handlers: submission (whatever a job makes a worker read must be the submitter's
//! to read), watching, leases, progress, completion (publishing what the job asked for).

use delta_proto::jobs::{JobKind, JobSpec, JobState};
use delta_proto::manifest::Manifest;
use delta_proto::reference::{Repository, check_tag};
use delta_proto::{self as pb, Digest, excerpt};
use tonic::{Request, Response, Status};

use super::{BoxStream, RegistryService, actor};
use crate::auth::{Caller, Scope};
use crate::clock::now;
use crate::error::{Error, Result};
use crate::meta::jobs::{Completion, JobRow};

impl RegistryService {
    /// A job as `caller` may see it, with its events after `after`. A job is visible to
    /// tokens covering its namespace (its team's users and workers, `*` tokens) and to its
    /// submitter; to anyone else it looks missing, whether it exists or not.
    pub(super) async fn job_snapshot(
        &self,
        caller: &Caller,
        id: u64,
        after: u64,
    ) -> std::result::Result<pb::GetJobResponse, Status> {
        let job = self.meta(move |m| m.get_job(id)).await?;
        let job = job
            .filter(|j| {
                caller.covers(&j.namespace)
                    || (j.submitter.is_some() && j.submitter == caller.token_id())
            })
            .ok_or_else(|| Error::NotFound {
                what: "job",
                name: id.to_string(),
            })?;
        let events = self.meta(move |m| m.job_events(id, after)).await?;
        Ok(pb::GetJobResponse {
            job: Some(job_info(job)),
            events: events
                .into_iter()
                .map(|(seq, at, body)| pb::JobEvent { seq, at, body })
                .collect(),
        })
    }
}

pub(super) async fn submit_job(
    svc: &RegistryService,
    req: Request<pb::SubmitJobRequest>,
) -> Result<Response<pb::JobInfo>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    if req.spec.len() > svc.inner.config.max_manifest_bytes {
        return Err(Error::LimitExceeded(format!(
            "job spec is {} bytes; the limit is {}",
            req.spec.len(),
            svc.inner.config.max_manifest_bytes
        ))
        .into());
    }
    let kind: JobKind = req.kind.parse().map_err(Error::from)?;
    // The spec as the worker will read it, refused here when it names no dataset, an
    // unknown field or a setting no run could use (not failed later by the first worker).
    let mut spec =
        JobSpec::parse(kind, &req.spec).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    // The base the job runs on, so it waits for a worker that holds it.
    let (repository, namespace, base) = match &mut spec {
        JobSpec::Train(job) => {
            let repo: Repository = req.repository.parse().map_err(Error::from)?;
            svc.authorize(&caller, repo.namespace(), Scope::Write)
                .await?;
            for t in &req.tags {
                check_tag(t).map_err(Error::from)?;
            }
            let fp = job.base;
            if svc
                .visible_bases(&caller, &fp.to_string())
                .await?
                .is_empty()
            {
                return Err(Error::NotFound {
                    what: "base",
                    name: fp.to_string(),
                }
                .into());
            }
            (
                repo.to_string(),
                repo.namespace().to_owned(),
                fp.to_string(),
            )
        }
        JobSpec::Verify(job) => {
            let r = svc
                .resolve_checked(&caller, &req.repository, Scope::Read)
                .await?;
            job.manifest = r.digest;
            let base = Manifest::from_json(&r.manifest)
                .map(|m| m.base.fingerprint.to_string())
                .unwrap_or_default();
            (
                format!("{}:v{}", r.repository, r.version),
                r.repository.namespace().to_owned(),
                base,
            )
        }
    };
    // Whatever the worker will read on the submitter's behalf must be the submitter's
    // to read: the datasets (a digest only another namespace holds is as absent as one
    // nobody holds) and the parent deltas.
    let (datasets, parents) = job_inputs(&spec, &req.blobs)?;
    let visible = svc.visible_blobs(&caller, datasets.clone()).await?;
    if let Some(d) = datasets.iter().find(|d| !visible.contains_key(d)) {
        return Err(Error::NotFound {
            what: "blob",
            name: d.to_string(),
        }
        .into());
    }
    for p in &parents {
        svc.resolve_checked(&caller, p, Scope::Read).await?;
    }
    let (tags, who) = (req.tags.clone(), actor(&caller));
    let spec = spec.to_json();
    let job = svc
        .meta(move |m| m.submit_job(kind, &spec, &repository, &namespace, &base, &tags, &who))
        .await?;
    tracing::info!(job = job.id, kind = %job.kind, repository = %job.repository, "job queued");
    svc.inner.jobs_submitted.notify_waiters();
    Ok(Response::new(job_info(job)))
}

pub(super) async fn get_job(
    svc: &RegistryService,
    req: Request<pb::GetJobRequest>,
) -> Result<Response<pb::GetJobResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    Ok(Response::new(
        svc.job_snapshot(&caller, req.id, req.after).await?,
    ))
}

pub(super) async fn watch_job(
    svc: &RegistryService,
    req: Request<pb::GetJobRequest>,
) -> Result<Response<BoxStream<pb::GetJobResponse>>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    // Refusals (a job the caller may not see) come before the stream starts.
    let first = svc.job_snapshot(&caller, req.id, req.after).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let this = svc.clone();
    tokio::spawn(async move {
        let mut snapshot = first;
        let mut last: Option<(String, u32)> = None;
        let mut seen = req.after;
        loop {
            let Some(job) = snapshot.job.clone() else {
                return;
            };
            seen = snapshot.events.last().map_or(seen, |e| e.seq.max(seen));
            let state = (job.state.clone(), job.attempts);
            let changed = last.as_ref() != Some(&state) || !snapshot.events.is_empty();
            let ended = job.state.parse().is_ok_and(JobState::is_final);
            if changed && tx.send(Ok(snapshot)).await.is_err() {
                return; // the watcher went away
            }
            if ended {
                return;
            }
            last = Some(state);
            // Woken by a change on this replica, or once a second for the others'.
            let changed = this.inner.jobs_changed.notified();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                () = tx.closed() => return,
            }
            snapshot = match this.job_snapshot(&caller, req.id, seen).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

pub(super) async fn lease_job(
    svc: &RegistryService,
    req: Request<pb::LeaseJobRequest>,
) -> Result<Response<pb::LeaseJobResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let scope = caller.worker_scope()?;
    let req = req.into_inner();
    // Refused now, not after the work: a worker that may not publish asks for
    // training jobs in vain.
    let kinds = req
        .kinds
        .iter()
        .map(|k| k.parse::<JobKind>().map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    if !scope.train && kinds.contains(&JobKind::Train) {
        return Err(Error::PermissionDenied(format!(
            "{} has read scope: it runs verify jobs only; training jobs publish deltas and need a worker token with --scope write",
            caller.describe()
        ))
        .into());
    }
    let mut bases = Vec::with_capacity(req.bases.len());
    for b in &req.bases {
        bases.push(b.parse::<Digest>().map_err(Error::from)?.to_string());
    }
    let secs = i64::from(lease_seconds(req.lease_seconds));
    let lease = uuid::Uuid::new_v4().to_string();
    // An idle worker waits here instead of asking again and again: one lease attempt
    // now, then one when a job is submitted to this replica or a second has passed
    // (a lease expiring, a job submitted elsewhere), until the wait is over.
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(u64::from(req.wait_seconds.min(60)));
    let job = loop {
        let submitted = svc.inner.jobs_submitted.notified();
        let (worker, kinds, bases, scope, l) = (
            req.worker.clone(),
            kinds.clone(),
            bases.clone(),
            scope.clone(),
            lease.clone(),
        );
        let t = now();
        let job = svc
            .meta(move |m| m.lease_job(&worker, &kinds, &bases, &scope, &l, t, t + secs))
            .await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if job.is_some() || left.is_zero() {
            break job;
        }
        let _ = tokio::time::timeout(left.min(std::time::Duration::from_secs(1)), submitted).await;
    };
    if let Some(j) = &job {
        tracing::info!(job = j.id, worker = %excerpt(&req.worker), attempt = j.attempts, "job leased");
        svc.inner.jobs_changed.notify_waiters();
    }
    Ok(Response::new(pb::LeaseJobResponse {
        job: job.map(job_info),
        lease: lease.to_string(),
    }))
}

pub(super) async fn renew_lease(
    svc: &RegistryService,
    req: Request<pb::RenewLeaseRequest>,
) -> Result<Response<pb::RenewLeaseResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let scope = caller.worker_scope()?;
    let req = req.into_inner();
    let t = now();
    let expires = t + i64::from(lease_seconds(req.lease_seconds));
    svc.meta(move |m| m.renew_lease(req.id, &req.lease, &scope, t, expires))
        .await?;
    Ok(Response::new(pb::RenewLeaseResponse { expires }))
}

pub(super) async fn report_progress(
    svc: &RegistryService,
    req: Request<pb::ReportProgressRequest>,
) -> Result<Response<pb::ReportProgressResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let scope = caller.worker_scope()?;
    let req = req.into_inner();
    if req.body.len() > 64 << 10 {
        return Err(Error::LimitExceeded("progress events are at most 64 KiB".into()).into());
    }
    svc.meta(move |m| m.report_progress(req.id, &req.lease, &scope, &req.body, now()))
        .await?;
    svc.inner.jobs_changed.notify_waiters();
    Ok(Response::new(pb::ReportProgressResponse {}))
}

pub(super) async fn complete_job(
    svc: &RegistryService,
    req: Request<pb::CompleteJobRequest>,
) -> Result<Response<pb::JobInfo>, Status> {
    let caller = svc.caller(&req).await?;
    let scope = caller.worker_scope()?;
    let req = req.into_inner();
    let id = req.id;
    // Another namespace's job is as absent as a missing one, and a lease this caller does
    // not hold is refused, before the manifest or report is looked at (the transaction
    // that completes the job checks both again).
    let (lease, held_scope) = (req.lease.clone(), scope.clone());
    let job = svc
        .meta(move |m| m.leased_job(id, &lease, &held_scope, now()))
        .await?;
    let (lease, who) = (req.lease.clone(), actor(&caller));
    let done = if !req.error.is_empty() {
        let msg = req.error.clone();
        svc.meta(move |m| m.complete_job(id, &lease, &scope, &Completion::Failed(&msg), &who))
            .await?
    } else if job.kind == JobKind::Train {
        // Publishing needs write on the job's namespace (checked again at lease time).
        svc.authorize(&caller, &job.namespace, Scope::Write).await?;
        let manifest = svc.parse_manifest(&req.manifest)?;
        check_against_job(&job, &manifest)?;
        svc.validate(&manifest, &caller).await?;
        let body = manifest.canonical_json();
        svc.meta(move |m| {
            m.complete_job(
                id,
                &lease,
                &scope,
                &Completion::Trained {
                    manifest: &manifest,
                    body: &body,
                },
                &who,
            )
        })
        .await?
    } else {
        let JobSpec::Verify(spec) = stored_spec(&job)? else {
            return Err(Error::Database(format!("job {id}'s spec is not a verification")).into());
        };
        let digest = spec.manifest.to_string();
        serde_json::from_str::<serde_json::Value>(&req.report)
            .map_err(|e| Error::InvalidArgument(format!("report is not JSON: {e}")))?;
        let report = req.report.clone();
        svc.meta(move |m| {
            m.complete_job(
                id,
                &lease,
                &scope,
                &Completion::Verified {
                    manifest: &digest,
                    report: &report,
                },
                &who,
            )
        })
        .await?
    };
    tracing::info!(job = id, state = %done.state, error = %excerpt(&done.error), "job completed");
    svc.inner.jobs_changed.notify_waiters();
    Ok(Response::new(job_info(done)))
}

pub(super) async fn list_reports(
    svc: &RegistryService,
    req: Request<pb::ListReportsRequest>,
) -> Result<Response<pb::ListReportsResponse>, Status> {
    let caller = svc.caller(&req).await?;
    let req = req.into_inner();
    let r = svc
        .resolve_checked(&caller, &req.reference, Scope::Read)
        .await?;
    let digest = r.digest.to_string();
    let rows = svc.meta(move |m| m.list_reports(&digest)).await?;
    Ok(Response::new(pb::ListReportsResponse {
        reports: rows.into_iter().map(Into::into).collect(),
    }))
}

/// What a job spec makes a worker read: the dataset blobs (`train`, `eval`, and every
/// digest the request lists in `blobs`) and the parent deltas (references).
fn job_inputs(spec: &JobSpec, listed: &[String]) -> Result<(Vec<Digest>, Vec<String>)> {
    let mut datasets = listed
        .iter()
        .map(|d| d.parse::<Digest>().map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    let parents = match spec {
        JobSpec::Train(job) => {
            datasets.push(job.train);
            datasets.extend(job.eval);
            job.parents.clone()
        }
        JobSpec::Verify(job) => {
            datasets.push(job.eval);
            Vec::new()
        }
    };
    datasets.sort();
    datasets.dedup();
    Ok((datasets, parents))
}

/// A queued job's spec, as `SubmitJob` stored it (parsed and checked then, so a spec
/// that no longer parses is the registry's fault, not the caller's).
fn stored_spec(job: &JobRow) -> Result<JobSpec> {
    JobSpec::parse(job.kind, &job.spec)
        .map_err(|e| Error::Database(format!("job {}: stored {e}", job.id)))
}

/// A trained delta must be what its job asked for: on the job's base, on top of the
/// job's parents (those the job names by digest must be among the manifest's).
fn check_against_job(job: &JobRow, manifest: &Manifest) -> Result<()> {
    let JobSpec::Train(spec) = stored_spec(job)? else {
        return Err(Error::Database(format!(
            "job {}'s spec is not a training",
            job.id
        )));
    };
    if spec.base != manifest.base.fingerprint {
        return Err(Error::InvalidArgument(format!(
            "job {} trains on base {}, but the manifest's base is {}",
            job.id, spec.base, manifest.base.fingerprint
        )));
    }
    // The manifest lists each parent's whole chain (ancestors first), so it holds at least
    // the job's parents, and every one the job named by digest.
    if manifest.parents.len() < spec.parents.len() {
        return Err(Error::InvalidArgument(format!(
            "job {} trains on {} parent(s), but the manifest names {}",
            job.id,
            spec.parents.len(),
            manifest.parents.len()
        )));
    }
    for want in &spec.parents {
        if let Some((_, digest)) = want.split_once('@')
            && !manifest
                .parents
                .iter()
                .any(|p| p.digest.to_string() == digest)
        {
            return Err(Error::InvalidArgument(format!(
                "job {} trains on parent {}, which the manifest does not name",
                job.id,
                excerpt(want)
            )));
        }
    }
    Ok(())
}

/// A lease length: the worker's request within 1 s..1 h (default 60 s).
fn lease_seconds(asked: u32) -> u32 {
    if asked == 0 { 60 } else { asked.clamp(1, 3600) }
}

fn job_info(j: JobRow) -> pb::JobInfo {
    pb::JobInfo {
        id: j.id,
        kind: j.kind.to_string(),
        state: j.state.to_string(),
        spec: j.spec,
        repository: j.repository,
        tags: j.tags,
        attempts: j.attempts,
        worker: j.worker,
        result: j.result,
        error: j.error,
        created: j.created,
        updated: j.updated,
        lease_expires: j.lease_expires,
    }
}
