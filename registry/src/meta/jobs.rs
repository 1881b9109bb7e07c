//! The job queue: training and verification jobs leased by workers.
//!
//! States: `queued` → `running` (leased, with a deadline) → `succeeded` | `failed`. A
//! `running` job whose lease has expired is leased again by the next worker that asks
//! (its `attempts` grows); after [`MAX_ATTEMPTS`] lost leases it fails. Every call of a
//! worker presents the lease token it was given: a worker that lost its lease (it
//! stalled, the job moved on) is refused and cannot publish anything.
//!
//! Every job belongs to the namespace of its repository. A worker's token confines it:
//! it leases only jobs of namespaces it covers ([`WorkerScope`]), and a job outside them is
//! as absent to its renew, progress and complete calls as one that does not exist.

use delta_proto::jobs::{JobKind, JobState};
use delta_proto::manifest::Manifest;
use delta_proto::reference::Repository;

use crate::error::{Error, Result};
use crate::meta::{Actor, Pushed, Report, SqlMeta, audit_in, push_in};
use crate::sql::{Row, Sql, Value, p};

/// Leases lost before a job fails for good.
pub const MAX_ATTEMPTS: u32 = 3;

/// One job row.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Id.
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// Spec JSON.
    pub spec: String,
    /// Target repository (train) or the delta's reference (verify).
    pub repository: String,
    /// The repository's namespace.
    pub namespace: String,
    /// Tags for the pushed version.
    pub tags: Vec<String>,
    /// State.
    pub state: JobState,
    /// Submitting token.
    pub submitter: Option<i64>,
    /// Leases handed out so far.
    pub attempts: u32,
    /// The worker holding (or last holding) the lease.
    pub worker: String,
    /// Lease deadline (unix seconds; 0: none).
    pub lease_expires: i64,
    /// Result JSON.
    pub result: String,
    /// Failure message.
    pub error: String,
    /// Created.
    pub created: i64,
    /// Last change.
    pub updated: i64,
}

/// How a job ends.
#[derive(Debug, Clone)]
pub enum Completion<'a> {
    /// The worker failed it.
    Failed(&'a str),
    /// A trained delta: publish it in the job's repository.
    Trained {
        /// The manifest.
        manifest: &'a Manifest,
        /// Its canonical bytes.
        body: &'a [u8],
    },
    /// A verification report for a manifest.
    Verified {
        /// Manifest digest.
        manifest: &'a str,
        /// Report JSON.
        report: &'a str,
    },
}

/// What a worker token lets its holder lease and finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerScope {
    /// The namespace whose jobs it runs, or `*` for every namespace.
    pub namespace: String,
    /// Whether it may run training jobs (which publish: write on the namespace).
    /// Verification jobs need read only.
    pub train: bool,
}

impl WorkerScope {
    /// Every job of every namespace (open registries).
    pub fn all() -> Self {
        Self {
            namespace: "*".into(),
            train: true,
        }
    }

    /// Whether a job of `namespace` is within reach.
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespace == "*" || self.namespace == namespace
    }
}

/// Job storage. Blocking, like [`crate::meta::MetaStore`].
pub trait JobStore {
    /// Queues a job in `namespace` (its repository's) on base fingerprint `base` (`""`:
    /// none named; any worker may take it), submitted by `who` (a `submit-job` audit row).
    #[allow(clippy::too_many_arguments)]
    fn submit_job(
        &self,
        kind: JobKind,
        spec: &str,
        repository: &str,
        namespace: &str,
        base: &str,
        tags: &[String],
        who: &Actor,
    ) -> Result<JobRow>;
    /// A job by id.
    fn get_job(&self, id: u64) -> Result<Option<JobRow>>;
    /// Progress events after `after`, in order.
    fn job_events(&self, id: u64, after: u64) -> Result<Vec<(u64, i64, String)>>;
    /// Leases the oldest waiting job of one of `kinds` (any, if empty) on one of `bases`
    /// (base fingerprints; any, if empty) within `scope`: queued, or running with an
    /// expired lease. A job that names no base goes to any worker.
    #[allow(clippy::too_many_arguments)]
    fn lease_job(
        &self,
        worker: &str,
        kinds: &[JobKind],
        bases: &[String],
        scope: &WorkerScope,
        lease: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<JobRow>>;
    /// Extends a lease the caller holds. Jobs outside `scope` are not found.
    fn renew_lease(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        now: i64,
        expires: i64,
    ) -> Result<()>;
    /// The job, if the caller holds its lease now: what `complete_job` checks first,
    /// without changing anything, so a caller without the lease learns nothing more.
    /// Jobs outside `scope` are not found.
    fn leased_job(&self, id: u64, lease: &str, scope: &WorkerScope, now: i64) -> Result<JobRow>;
    /// Appends a progress event (lease checked).
    fn report_progress(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        body: &str,
        now: i64,
    ) -> Result<()>;
    /// Finishes a job (lease checked), publishing its result in the same transaction, with
    /// `who`'s `complete-job` audit row.
    fn complete_job(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        completion: &Completion<'_>,
        who: &Actor,
    ) -> Result<JobRow>;
    /// Reports on a manifest, oldest first.
    fn list_reports(&self, manifest: &str) -> Result<Vec<Report>>;
    /// Jobs by state, and how many running jobs hold a live lease at `now`.
    fn job_counts(&self, now: i64) -> Result<(std::collections::BTreeMap<String, u64>, u64)>;
}

const COLUMNS: &str = "id, kind, spec, repository, tags, state, submitter, attempts, worker, \
                       lease_expires, result, error, created_at, updated_at, namespace";

/// A kind or state the database holds that this version does not know.
fn stored(e: delta_proto::UnknownName) -> Error {
    Error::Database(format!("jobs table: {e}"))
}

fn job_row(r: &Row) -> Result<JobRow> {
    Ok(JobRow {
        id: r.uint(0)?,
        kind: r.text(1)?.parse().map_err(stored)?,
        spec: r.text(2)?,
        repository: r.text(3)?,
        tags: serde_json::from_str(&r.text(4)?).unwrap_or_default(),
        state: r.text(5)?.parse().map_err(stored)?,
        submitter: r.opt_int(6)?,
        attempts: r.uint(7)? as u32,
        worker: r.text(8)?,
        lease_expires: r.int(9)?,
        result: r.text(10)?,
        error: r.text(11)?,
        created: r.int(12)?,
        updated: r.int(13)?,
        namespace: r.text(14)?,
    })
}

fn load(c: &mut dyn Sql, id: u64) -> Result<Option<JobRow>> {
    c.opt(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"), p![id])?
        .as_ref()
        .map(job_row)
        .transpose()
}

/// Checks that `lease` is the live lease of job `id`, and locks the job's row until the
/// transaction ends. A job outside `scope` is not found, exactly like a missing one.
fn check_lease(
    c: &mut dyn Sql,
    id: u64,
    lease: &str,
    scope: &WorkerScope,
    now: i64,
) -> Result<JobRow> {
    let lock = c.engine().for_update();
    let not_found = || Error::NotFound {
        what: "job",
        name: id.to_string(),
    };
    let r = c
        .opt(
            &format!("SELECT {COLUMNS}, lease FROM jobs WHERE id = $1{lock}"),
            p![id],
        )?
        .ok_or_else(not_found)?;
    let (job, held) = (job_row(&r)?, r.opt_text(15)?);
    if !scope.covers(&job.namespace) {
        return Err(not_found());
    }
    if job.state != JobState::Running || held.as_deref() != Some(lease) || job.lease_expires < now {
        return Err(Error::FailedPrecondition(format!(
            "job {id}: this worker no longer holds its lease (state {}, lease {}); the job may have been handed to another worker",
            job.state,
            if job.lease_expires < now {
                "expired"
            } else {
                "taken"
            }
        )));
    }
    Ok(job)
}

impl JobStore for SqlMeta {
    fn submit_job(
        &self,
        kind: JobKind,
        spec: &str,
        repository: &str,
        namespace: &str,
        base: &str,
        tags: &[String],
        who: &Actor,
    ) -> Result<JobRow> {
        let tags = serde_json::to_string(tags).unwrap_or_else(|_| "[]".into());
        self.db.write(|c| {
            let id = c
                .one(
                    "INSERT INTO jobs (kind, spec, repository, namespace, base, tags, state, submitter, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $8) RETURNING id",
                    p![kind.as_str(), spec, repository, namespace, base, &tags, who.token, who.at],
                )?
                .uint(0)?;
            audit_in(c, who, "submit-job", repository, &id.to_string())?;
            load(c, id)?.ok_or_else(|| Error::NotFound {
                what: "job",
                name: id.to_string(),
            })
        })
    }

    fn get_job(&self, id: u64) -> Result<Option<JobRow>> {
        self.db.read(|c| load(c, id))
    }

    fn job_events(&self, id: u64, after: u64) -> Result<Vec<(u64, i64, String)>> {
        self.db.read(|c| {
            c.query(
                "SELECT seq, at, body FROM job_events WHERE job = $1 AND seq > $2 ORDER BY seq",
                p![id, after],
            )?
            .iter()
            .map(|r| Ok((r.uint(0)?, r.int(1)?, r.text(2)?)))
            .collect()
        })
    }

    fn lease_job(
        &self,
        worker: &str,
        kinds: &[JobKind],
        bases: &[String],
        scope: &WorkerScope,
        lease: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<JobRow>> {
        // Within the worker's namespace (`*`: all), training jobs only if it may publish,
        // `kind IN (...)` and `base IN ('', ...)`, or no such filter.
        let mut filter =
            String::from(" AND ($2 = '*' OR namespace = $2) AND ($3 = 1 OR kind <> 'train')");
        let mut params = vec![
            Value::from(now),
            Value::from(scope.namespace.as_str()),
            Value::from(i64::from(scope.train)),
        ];
        let kinds: Vec<String> = kinds.iter().map(|k| k.as_str().to_owned()).collect();
        for (column, values) in [("kind", &kinds[..]), ("base", bases)] {
            if values.is_empty() {
                continue;
            }
            let first = params.len() + 1;
            let slots: Vec<String> = (first..first + values.len())
                .map(|i| format!("${i}"))
                .collect();
            let none = if column == "base" { "'', " } else { "" };
            filter.push_str(&format!(" AND {column} IN ({none}{})", slots.join(", ")));
            params.extend(values.iter().map(Value::from));
        }
        self.db.write(|c| {
            // Another replica leasing at the same moment skips the row this one holds.
            let lock = c.engine().skip_locked();
            loop {
                let Some(r) = c.opt(
                    &format!(
                        "SELECT id, attempts FROM jobs
                         WHERE (state = 'queued' OR (state = 'running' AND lease_expires < $1)){filter}
                         ORDER BY id LIMIT 1{lock}"
                    ),
                    &params,
                )?
                else {
                    return Ok(None);
                };
                let (id, attempts) = (r.uint(0)?, r.uint(1)?);
                if attempts >= u64::from(MAX_ATTEMPTS) {
                    let error = format!(
                        "the job lost its worker {attempts} times (each stopped renewing its lease)"
                    );
                    c.exec(
                        "UPDATE jobs SET state = 'failed', lease = NULL, updated_at = $2, error = $3 WHERE id = $1",
                        p![id, now, &error],
                    )?;
                    continue;
                }
                c.exec(
                    "UPDATE jobs SET state = 'running', lease = $2, lease_expires = $3, worker = $4,
                     attempts = attempts + 1, updated_at = $5 WHERE id = $1",
                    p![id, lease, expires, worker, now],
                )?;
                return load(c, id);
            }
        })
    }

    fn leased_job(&self, id: u64, lease: &str, scope: &WorkerScope, now: i64) -> Result<JobRow> {
        self.db.write(|c| check_lease(c, id, lease, scope, now))
    }

    fn renew_lease(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        now: i64,
        expires: i64,
    ) -> Result<()> {
        self.db.write(|c| {
            check_lease(c, id, lease, scope, now)?;
            c.exec(
                "UPDATE jobs SET lease_expires = $2, updated_at = $3 WHERE id = $1",
                p![id, expires, now],
            )?;
            Ok(())
        })
    }

    fn report_progress(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        body: &str,
        now: i64,
    ) -> Result<()> {
        self.db.write(|c| {
            check_lease(c, id, lease, scope, now)?;
            c.exec(
                "INSERT INTO job_events (job, seq, at, body)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job = $1), $2, $3)",
                p![id, now, body],
            )?;
            Ok(())
        })
    }

    fn complete_job(
        &self,
        id: u64,
        lease: &str,
        scope: &WorkerScope,
        completion: &Completion<'_>,
        who: &Actor,
    ) -> Result<JobRow> {
        let now = who.at;
        self.db.write(|c| {
            let job = check_lease(c, id, lease, scope, now)?;
            let (state, result, error) = match completion {
                Completion::Failed(msg) => (JobState::Failed, String::new(), (*msg).to_owned()),
                Completion::Trained { manifest, body } => {
                    let repo: Repository = job.repository.parse().map_err(Error::from)?;
                    let Pushed { version, .. } = push_in(c, &repo, manifest, body, &job.tags, now)?;
                    let result = serde_json::json!({
                        "repository": repo.to_string(),
                        "version": version,
                        "digest": delta_proto::Digest::of(body).to_string(),
                    });
                    (JobState::Succeeded, result.to_string(), String::new())
                }
                Completion::Verified { manifest, report } => {
                    c.exec(
                        "INSERT INTO reports (manifest, job, at, body) VALUES ($1, $2, $3, $4)",
                        p![*manifest, id, now, *report],
                    )?;
                    (JobState::Succeeded, (*report).to_owned(), String::new())
                }
            };
            c.exec(
                "UPDATE jobs SET state = $2, result = $3, error = $4, lease = NULL, lease_expires = 0,
                 updated_at = $5 WHERE id = $1",
                p![id, state.as_str(), &result, &error, now],
            )?;
            audit_in(c, who, "complete-job", &job.repository, &id.to_string())?;
            load(c, id)?.ok_or_else(|| Error::NotFound {
                what: "job",
                name: id.to_string(),
            })
        })
    }

    fn list_reports(&self, manifest: &str) -> Result<Vec<Report>> {
        self.db.read(|c| {
            c.query(
                "SELECT manifest, job, at, body FROM reports WHERE manifest = $1 ORDER BY id",
                p![manifest],
            )?
            .iter()
            .map(|r| {
                Ok(Report {
                    manifest: r.digest(0)?,
                    job: r.uint(1)?,
                    at: r.int(2)?,
                    body: r.text(3)?,
                })
            })
            .collect()
        })
    }

    fn job_counts(&self, now: i64) -> Result<(std::collections::BTreeMap<String, u64>, u64)> {
        self.db.read(|c| {
            let states = c
                .query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])?
                .iter()
                .map(|r| Ok((r.text(0)?, r.uint(1)?)))
                .collect::<Result<_>>()?;
            let leases = c
                .one(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_expires >= $1",
                    p![now],
                )?
                .uint(0)?;
            Ok((states, leases))
        })
    }
}
