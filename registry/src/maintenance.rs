//! Garbage collection and fsck: the upkeep of a content-addressed store, shared by the
//! admin RPC and the `delta-registry gc` / `fsck` commands.

use std::sync::Arc;
use std::time::Duration;

use delta_proto::Digest;
use futures::StreamExt;

use crate::blobs::BlobStore;
use crate::error::{Error, Result};
use crate::meta::{Actor, MetaStore};

/// What a garbage collection removed (or, dry, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed.
    pub removed: Vec<Digest>,
    /// Bytes freed.
    pub bytes: u64,
    /// Nothing was deleted.
    pub dry_run: bool,
}

/// Removes blobs that no live version references and nobody referenced within `grace`
/// (which protects uploads in flight and pushes racing with the collection: a blob is only
/// referenced once its row exists, and rows are refreshed on every upload and push). The
/// rows go first, in one transaction; then the bytes, unless the object was rewritten after
/// the cut-off (a concurrent re-upload of the same content).
pub async fn collect_garbage(
    meta: Arc<dyn MetaStore>,
    blobs: &BlobStore,
    grace: Duration,
    dry_run: bool,
    who: Actor,
) -> Result<GcReport> {
    let cutoff = who.at - grace.as_secs() as i64;
    let m = meta.clone();
    let rows =
        tokio::task::spawn_blocking(move || m.collect_garbage(cutoff, dry_run, &who)).await??;
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    for (d, size) in rows {
        if !dry_run {
            // Another replica may have committed the same bytes again since the rows went
            // (its publish found the object and recorded a new row): keep them then.
            let m = meta.clone();
            let revived = tokio::task::spawn_blocking(move || m.blob_sizes(&[d])).await??;
            if revived.is_empty() {
                blobs.delete_unless_newer(&d, cutoff).await?;
            }
        }
        tracing::info!(digest = %d, bytes = size, dry_run, "garbage blob");
        report.removed.push(d);
        report.bytes += size;
    }
    Ok(report)
}

/// What fsck found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Blobs re-hashed.
    pub checked: usize,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Rows whose bytes no longer match (or were quarantined earlier).
    pub corrupt: Vec<Digest>,
    /// Rows whose bytes are gone.
    pub missing: Vec<Digest>,
    /// Stored objects without a row (older than the grace period).
    pub orphans: Vec<String>,
    /// Corrupt blobs moved to `quarantine/` by `--repair`.
    pub quarantined: usize,
    /// What killed uploads left (staging objects, partial files), older than the grace
    /// period: harmless, reported so the space is accounted for; `--repair` removes them.
    pub stale_staging: Vec<String>,
    /// For each corrupt or missing blob, the versions whose manifest names it (what its
    /// loss breaks until someone pushes the delta again).
    pub users: std::collections::BTreeMap<Digest, Vec<String>>,
}

impl FsckReport {
    /// Whether nothing is wrong.
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.orphans.is_empty()
    }
}

/// Re-hashes every blob and checks the database against the store in both directions.
/// Read-only unless `repair`, which quarantines corrupt blobs (marking their rows, so a
/// re-push heals them) and removes orphans. Objects younger than `grace` are uploads in
/// flight, not orphans.
pub async fn fsck(
    meta: Arc<dyn MetaStore>,
    blobs: &BlobStore,
    repair: bool,
    grace: Duration,
    now: i64,
) -> Result<FsckReport> {
    let m = meta.clone();
    let rows = tokio::task::spawn_blocking(move || m.all_blobs()).await??;
    let mut report = FsckReport::default();
    let known: std::collections::HashSet<Digest> = rows.iter().map(|r| r.0).collect();
    for (d, size, marked) in rows {
        if marked {
            report.corrupt.push(d);
            continue;
        }
        report.checked += 1;
        let mut hasher = blake3::Hasher::new();
        let mut seen = 0u64;
        let mut stream = blobs.stream(&d, size, 8 << 20);
        let mut gone = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    seen += b.len() as u64;
                    hasher.update(&b);
                }
                Err(Error::Blob(object_store::Error::NotFound { .. })) => {
                    gone = true;
                    break;
                }
                // A range past a truncated end is reported as corrupt below.
                Err(Error::Blob(object_store::Error::Generic { .. })) => break,
                Err(e) => return Err(e),
            }
        }
        report.bytes += seen;
        if gone {
            tracing::error!(digest = %d, "blob row without bytes");
            report.missing.push(d);
        } else if seen != size
            || Digest::from_hash(hasher.finalize()) != d
            || blobs.size(&d).await? != Some(size)
        {
            tracing::error!(digest = %d, "blob bytes do not match the digest");
            report.corrupt.push(d);
            if repair {
                blobs.quarantine(&d).await?;
                let m = meta.clone();
                tokio::task::spawn_blocking(move || m.mark_corrupt(&d)).await??;
                report.quarantined += 1;
            }
        }
    }
    let cutoff = now - grace.as_secs() as i64;
    for (key, digest, modified) in blobs.list().await? {
        let known_row = digest.is_some_and(|d| known.contains(&d));
        if !known_row && modified < cutoff {
            tracing::error!(%key, "stored object without a row");
            if repair {
                blobs.delete_key(&key).await?;
            }
            report.orphans.push(key);
        }
    }
    for d in report.corrupt.iter().chain(&report.missing).copied() {
        let m = meta.clone();
        let users = tokio::task::spawn_blocking(move || m.blob_users(&d)).await??;
        report.users.insert(d, users);
    }
    report.stale_staging = blobs.stale_staging(grace, now).await?;

    if repair && !report.stale_staging.is_empty() {
        blobs.cleanup_staging(grace, grace, now).await?;
        blobs.remove_stale_staging(grace)?;
    }
    Ok(report)
}
