//! The job queue: training and verification jobs leased by workers.
//!
//! States: `queued` → `running` (leased, with a deadline) → `succeeded` | `failed`. A
//! `running` job whose lease has expired is leased again by the next worker that asks
//! (its `attempts` grows); after [`MAX_ATTEMPTS`] lost leases it fails. Every call of a
//! worker presents the lease token it was given: a worker that lost its lease (it
//! stalled, the job moved on) is refused and cannot publish anything.

use delta_proto::manifest::Manifest;
use delta_proto::reference::Repository;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::meta::{Pushed, SqliteMeta, push_in};

/// Leases lost before a job fails for good.
pub const MAX_ATTEMPTS: u32 = 3;

/// One job row.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Id.
    pub id: u64,
    /// `train` or `verify`.
    pub kind: String,
    /// Spec JSON.
    pub spec: String,
    /// Target repository (train) or the delta's reference (verify).
    pub repository: String,
    /// Tags for the pushed version.
    pub tags: Vec<String>,
    /// State.
    pub state: String,
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

/// A report row.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// Manifest digest.
    pub manifest: String,
    /// Job that made it.
    pub job: u64,
    /// When.
    pub at: i64,
    /// Report JSON.
    pub body: String,
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

/// Job storage. Blocking, like [`crate::meta::MetaStore`].
pub trait JobStore {
    /// Queues a job.
    fn submit_job(
        &self,
        kind: &str,
        spec: &str,
        repository: &str,
        tags: &[String],
        submitter: Option<i64>,
        now: i64,
    ) -> Result<JobRow>;
    /// A job by id.
    fn get_job(&self, id: u64) -> Result<Option<JobRow>>;
    /// Progress events after `after`, in order.
    fn job_events(&self, id: u64, after: u64) -> Result<Vec<(u64, i64, String)>>;
    /// Leases the oldest waiting job of one of `kinds` (any, if empty): queued, or
    /// running with an expired lease.
    fn lease_job(
        &self,
        worker: &str,
        kinds: &[String],
        lease: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<JobRow>>;
    /// Extends a lease the caller holds.
    fn renew_lease(&self, id: u64, lease: &str, now: i64, expires: i64) -> Result<()>;
    /// Appends a progress event (lease checked).
    fn report_progress(&self, id: u64, lease: &str, body: &str, now: i64) -> Result<()>;
    /// Finishes a job (lease checked), publishing its result in the same transaction.
    fn complete_job(
        &self,
        id: u64,
        lease: &str,
        completion: &Completion<'_>,
        now: i64,
    ) -> Result<JobRow>;
    /// Reports on a manifest, oldest first.
    fn list_reports(&self, manifest: &str) -> Result<Vec<ReportRow>>;
    /// Jobs by state, and how many running jobs hold a live lease at `now`.
    fn job_counts(&self, now: i64) -> Result<(std::collections::BTreeMap<String, u64>, u64)>;
}

const COLUMNS: &str = "id, kind, spec, repository, tags, state, submitter, attempts, worker, \
                       lease_expires, result, error, created_at, updated_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let tags: String = r.get(4)?;
    Ok(JobRow {
        id: r.get::<_, i64>(0)? as u64,
        kind: r.get(1)?,
        spec: r.get(2)?,
        repository: r.get(3)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        state: r.get(5)?,
        submitter: r.get(6)?,
        attempts: r.get::<_, i64>(7)? as u32,
        worker: r.get(8)?,
        lease_expires: r.get(9)?,
        result: r.get(10)?,
        error: r.get(11)?,
        created: r.get(12)?,
        updated: r.get(13)?,
    })
}

fn load(c: &rusqlite::Connection, id: u64) -> Result<Option<JobRow>> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
        [id as i64],
        row,
    )
    .optional()?)
}

/// Checks that `lease` is the live lease of job `id`.
fn check_lease(c: &rusqlite::Connection, id: u64, lease: &str, now: i64) -> Result<JobRow> {
    let (job, held) = c
        .query_row(
            &format!("SELECT {COLUMNS}, lease FROM jobs WHERE id = ?1"),
            [id as i64],
            |r| Ok((row(r)?, r.get::<_, Option<String>>(14)?)),
        )
        .optional()?
        .ok_or_else(|| Error::NotFound {
            what: "job",
            name: id.to_string(),
        })?;
    if job.state != "running" || held.as_deref() != Some(lease) || job.lease_expires < now {
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

impl JobStore for SqliteMeta {
    fn submit_job(
        &self,
        kind: &str,
        spec: &str,
        repository: &str,
        tags: &[String],
        submitter: Option<i64>,
        now: i64,
    ) -> Result<JobRow> {
        let tags = serde_json::to_string(tags).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (kind, spec, repository, tags, state, submitter, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?6)",
                params![kind, spec, repository, tags, submitter, now],
            )?;
            let id = c.last_insert_rowid() as u64;
            load(c, id)?.ok_or_else(|| Error::NotFound { what: "job", name: id.to_string() })
        })
    }

    fn get_job(&self, id: u64) -> Result<Option<JobRow>> {
        self.with(|c| load(c, id))
    }

    fn job_events(&self, id: u64, after: u64) -> Result<Vec<(u64, i64, String)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT seq, at, body FROM job_events WHERE job = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = stmt
                .query_map(params![id as i64, after as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn lease_job(
        &self,
        worker: &str,
        kinds: &[String],
        lease: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<JobRow>> {
        let kinds = serde_json::to_string(kinds).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            loop {
                let id: Option<i64> = tx
                    .query_row(
                        "SELECT id FROM jobs
                         WHERE (state = 'queued' OR (state = 'running' AND lease_expires < ?1))
                           AND (json_array_length(?2) = 0 OR kind IN (SELECT value FROM json_each(?2)))
                         ORDER BY id LIMIT 1",
                        params![now, kinds],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(id) = id else {
                    tx.commit()?;
                    return Ok(None);
                };
                let attempts: i64 =
                    tx.query_row("SELECT attempts FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
                if attempts >= i64::from(MAX_ATTEMPTS) {
                    tx.execute(
                        "UPDATE jobs SET state = 'failed', lease = NULL, updated_at = ?2,
                         error = 'the job lost its worker ' || attempts || ' times (each stopped renewing its lease)'
                         WHERE id = ?1",
                        params![id, now],
                    )?;
                    continue;
                }
                tx.execute(
                    "UPDATE jobs SET state = 'running', lease = ?2, lease_expires = ?3, worker = ?4,
                     attempts = attempts + 1, updated_at = ?5 WHERE id = ?1",
                    params![id, lease, expires, worker, now],
                )?;
                let job = load(&tx, id as u64)?;
                tx.commit()?;
                return Ok(job);
            }
        })
    }

    fn renew_lease(&self, id: u64, lease: &str, now: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_lease(&tx, id, lease, now)?;
            tx.execute(
                "UPDATE jobs SET lease_expires = ?2, updated_at = ?3 WHERE id = ?1",
                params![id as i64, expires, now],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn report_progress(&self, id: u64, lease: &str, body: &str, now: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_lease(&tx, id, lease, now)?;
            tx.execute(
                "INSERT INTO job_events (job, seq, at, body)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job = ?1), ?2, ?3)",
                params![id as i64, now, body],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn complete_job(
        &self,
        id: u64,
        lease: &str,
        completion: &Completion<'_>,
        now: i64,
    ) -> Result<JobRow> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let job = check_lease(&tx, id, lease, now)?;
            let (state, result, error) = match completion {
                Completion::Failed(msg) => ("failed", String::new(), (*msg).to_owned()),
                Completion::Trained { manifest, body } => {
                    let repo: Repository = job.repository.parse().map_err(Error::from)?;
                    let Pushed { version, .. } = push_in(&tx, &repo, manifest, body, &job.tags, now)?;
                    let result = serde_json::json!({
                        "repository": repo.to_string(),
                        "version": version,
                        "digest": delta_proto::Digest::of(body).to_string(),
                    });
                    ("succeeded", result.to_string(), String::new())
                }
                Completion::Verified { manifest, report } => {
                    tx.execute(
                        "INSERT INTO reports (manifest, job, at, body) VALUES (?1, ?2, ?3, ?4)",
                        params![manifest, id as i64, now, report],
                    )?;
                    ("succeeded", (*report).to_owned(), String::new())
                }
            };
            tx.execute(
                "UPDATE jobs SET state = ?2, result = ?3, error = ?4, lease = NULL, lease_expires = 0,
                 updated_at = ?5 WHERE id = ?1",
                params![id as i64, state, result, error, now],
            )?;
            let job = load(&tx, id)?;
            tx.commit()?;
            job.ok_or_else(|| Error::NotFound { what: "job", name: id.to_string() })
        })
    }

    fn list_reports(&self, manifest: &str) -> Result<Vec<ReportRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT manifest, job, at, body FROM reports WHERE manifest = ?1 ORDER BY id",
            )?;
            let rows = stmt
                .query_map([manifest], |r| {
                    Ok(ReportRow {
                        manifest: r.get(0)?,
                        job: r.get::<_, i64>(1)? as u64,
                        at: r.get(2)?,
                        body: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn job_counts(&self, now: i64) -> Result<(std::collections::BTreeMap<String, u64>, u64)> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
            let states = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let leases: i64 = c.query_row(
                "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_expires >= ?1",
                [now],
                |r| r.get(0),
            )?;
            Ok((states, leases as u64))
        })
    }
}
