//! What the registry lists, as its clients read it: repositories, versions, deltas found
//! by a search and verification reports, converted from the wire's messages (digests
//! parsed strictly, "none" as `None`).

use std::collections::BTreeMap;

use crate::Digest;
use crate::digest::DigestError;

/// One repository (`ListRepositories`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSummary {
    /// `namespace/name`.
    pub repository: String,
    /// Its latest version (the newest yanked one when every version is yanked).
    pub latest_version: u64,
    /// That version's manifest digest.
    pub latest_digest: Digest,
    /// The base it is a delta of.
    pub base_fingerprint: Digest,
    /// The latest version's method.
    pub method: String,
    /// How many versions it has (the yanked ones when all are).
    pub versions: u64,
    /// Unix seconds of the last push.
    pub updated_at: i64,
    /// Every version is yanked.
    pub yanked: bool,
}

/// One version of a repository (`ListVersions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Its number.
    pub version: u64,
    /// Its manifest digest.
    pub digest: Digest,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// Bytes of its files.
    pub size: u64,
    /// Unix seconds it was pushed.
    pub created_at: i64,
    /// Who pushed it (`token N (description)`, `open registry`), or `None` when a worker
    /// published it by completing a job (its provenance names the job).
    pub pushed_by: Option<String>,
}

/// One delta a search found (`SearchDeltas`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaSummary {
    /// `namespace/name`.
    pub repository: String,
    /// Its version.
    pub version: u64,
    /// Its manifest digest.
    pub digest: Digest,
    /// The base it is a delta of.
    pub base_fingerprint: Digest,
    /// Its method.
    pub method: String,
    /// Bytes of its files.
    pub size: u64,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
}

/// One verification report on a delta (`ListReports`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The manifest it verifies.
    pub manifest: Digest,
    /// Unix seconds it was filed.
    pub at: i64,
    /// The job that made it.
    pub job: u64,
    /// The report (JSON).
    pub body: String,
}

impl TryFrom<crate::RepositorySummary> for RepoSummary {
    type Error = DigestError;
    fn try_from(r: crate::RepositorySummary) -> Result<Self, DigestError> {
        Ok(RepoSummary {
            repository: r.repository,
            latest_version: r.latest_version,
            latest_digest: r.latest_digest.parse()?,
            base_fingerprint: r.base_fingerprint.parse()?,
            method: r.method,
            versions: r.versions,
            updated_at: r.updated_at,
            yanked: r.yanked,
        })
    }
}

impl TryFrom<crate::VersionInfo> for VersionInfo {
    type Error = DigestError;
    fn try_from(v: crate::VersionInfo) -> Result<Self, DigestError> {
        Ok(VersionInfo {
            version: v.version,
            digest: v.digest.parse()?,
            tags: v.tags,
            size: v.size,
            created_at: v.created_at,
            pushed_by: (!v.pushed_by.is_empty()).then_some(v.pushed_by),
        })
    }
}

impl TryFrom<crate::DeltaSummary> for DeltaSummary {
    type Error = DigestError;
    fn try_from(d: crate::DeltaSummary) -> Result<Self, DigestError> {
        Ok(DeltaSummary {
            repository: d.repository,
            version: d.version,
            digest: d.digest.parse()?,
            base_fingerprint: d.base_fingerprint.parse()?,
            method: d.method,
            size: d.size,
            annotations: d.annotations.into_iter().collect(),
        })
    }
}

impl TryFrom<crate::Report> for Report {
    type Error = DigestError;
    fn try_from(r: crate::Report) -> Result<Self, DigestError> {
        Ok(Report {
            manifest: r.manifest.parse()?,
            at: r.at,
            job: r.job,
            body: r.body,
        })
    }
}
