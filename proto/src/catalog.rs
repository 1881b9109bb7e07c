//! What the registry lists: base records, repositories, versions, deltas found by a
//! search and verification reports. The registry's store returns these types and the client reads
//! them back; both conversions to and from the wire's messages live here (digests and
//! names parsed strictly, "none" as `None`).

use std::collections::BTreeMap;

use crate::Digest;
use crate::digest::DigestError;
use crate::manifest::TensorInfo;
use crate::reference::{NameError, Repository};

/// A listing the wire carried with a malformed digest or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadListing {
    /// A digest that does not parse.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// A repository name that does not parse.
    #[error("{0}")]
    Name(#[from] NameError),
}

/// A base model as the registry records it (`GetBase`, `ListBases`), or as a client reads
/// it from local weights: what deltas are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRecord {
    /// Registered name: `namespace/name`, or a global name (a local model: its path).
    pub name: String,
    /// Fingerprint of its weights.
    pub fingerprint: Digest,
    /// Its tensor table, sorted by name.
    pub tensors: Vec<TensorInfo>,
    /// The blake3 of each tensor's bytes, in `tensors` order: the proof that the table is
    /// the fingerprint's (the registry recomputes it before storing). Empty for records
    /// registered before proofs existed.
    pub digests: Vec<Digest>,
    /// Unix seconds it was registered (0: a local model, not registered).
    pub created_at: i64,
}

impl BaseRecord {
    /// Whether the record carries the digests that prove its table.
    pub fn proven(&self) -> bool {
        !self.digests.is_empty()
    }
}

impl From<BaseRecord> for crate::BaseRecord {
    fn from(b: BaseRecord) -> Self {
        let digests = b.digests.iter().map(ToString::to_string);
        crate::BaseRecord {
            name: b.name,
            fingerprint: b.fingerprint.to_string(),
            tensors: b
                .tensors
                .into_iter()
                .zip(digests.chain(std::iter::repeat(String::new())))
                .map(|(t, digest)| crate::TensorInfo { digest, ..t.into() })
                .collect(),
            created_at: b.created_at,
        }
    }
}

impl TryFrom<crate::BaseRecord> for BaseRecord {
    type Error = BadListing;
    /// Digests are all there (a proven record) or none (one from before proofs).
    fn try_from(b: crate::BaseRecord) -> Result<Self, BadListing> {
        let proven = b.tensors.iter().all(|t| !t.digest.is_empty());
        let digests = if proven {
            b.tensors
                .iter()
                .map(|t| t.digest.parse())
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(BaseRecord {
            name: b.name,
            fingerprint: b.fingerprint.parse()?,
            tensors: b.tensors.into_iter().map(Into::into).collect(),
            digests,
            created_at: b.created_at,
        })
    }
}

/// One repository (`ListRepositories`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSummary {
    /// `namespace/name`.
    pub repository: Repository,
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
    pub repository: Repository,
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
    type Error = BadListing;
    fn try_from(r: crate::RepositorySummary) -> Result<Self, BadListing> {
        Ok(RepoSummary {
            repository: r.repository.parse()?,
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

impl From<RepoSummary> for crate::RepositorySummary {
    fn from(r: RepoSummary) -> Self {
        crate::RepositorySummary {
            repository: r.repository.to_string(),
            latest_version: r.latest_version,
            latest_digest: r.latest_digest.to_string(),
            base_fingerprint: r.base_fingerprint.to_string(),
            method: r.method,
            versions: r.versions,
            updated_at: r.updated_at,
            yanked: r.yanked,
        }
    }
}

impl TryFrom<crate::VersionInfo> for VersionInfo {
    type Error = BadListing;
    fn try_from(v: crate::VersionInfo) -> Result<Self, BadListing> {
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

impl From<VersionInfo> for crate::VersionInfo {
    fn from(v: VersionInfo) -> Self {
        crate::VersionInfo {
            version: v.version,
            digest: v.digest.to_string(),
            tags: v.tags,
            size: v.size,
            created_at: v.created_at,
            pushed_by: v.pushed_by.unwrap_or_default(),
        }
    }
}

impl TryFrom<crate::DeltaSummary> for DeltaSummary {
    type Error = BadListing;
    fn try_from(d: crate::DeltaSummary) -> Result<Self, BadListing> {
        Ok(DeltaSummary {
            repository: d.repository.parse()?,
            version: d.version,
            digest: d.digest.parse()?,
            base_fingerprint: d.base_fingerprint.parse()?,
            method: d.method,
            size: d.size,
            annotations: d.annotations.into_iter().collect(),
        })
    }
}

impl From<DeltaSummary> for crate::DeltaSummary {
    fn from(d: DeltaSummary) -> Self {
        crate::DeltaSummary {
            repository: d.repository.to_string(),
            version: d.version,
            digest: d.digest.to_string(),
            base_fingerprint: d.base_fingerprint.to_string(),
            method: d.method,
            size: d.size,
            annotations: d.annotations.into_iter().collect(),
        }
    }
}

impl TryFrom<crate::Report> for Report {
    type Error = BadListing;
    fn try_from(r: crate::Report) -> Result<Self, BadListing> {
        Ok(Report {
            manifest: r.manifest.parse()?,
            at: r.at,
            job: r.job,
            body: r.body,
        })
    }
}

impl From<Report> for crate::Report {
    fn from(r: Report) -> Self {
        crate::Report {
            manifest: r.manifest.to_string(),
            at: r.at,
            job: r.job,
            body: r.body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_survive_the_wire_and_malformed_ones_are_named() {
        let d = Digest::of(b"m");
        let summary = DeltaSummary {
            repository: "team/x".parse().unwrap(),
            version: 3,
            digest: d,
            base_fingerprint: Digest::of(b"base"),
            method: "lora".into(),
            size: 10,
            annotations: [("task".to_owned(), "sst2".to_owned())].into(),
        };
        let wire = crate::DeltaSummary::from(summary.clone());
        assert_eq!(DeltaSummary::try_from(wire.clone()), Ok(summary));
        let version = VersionInfo {
            version: 1,
            digest: d,
            tags: vec!["latest".into()],
            size: 10,
            created_at: 5,
            pushed_by: None,
        };
        let back = VersionInfo::try_from(crate::VersionInfo::from(version.clone()));
        assert_eq!(back, Ok(version));
        let base = BaseRecord {
            name: "tiny".into(),
            fingerprint: Digest::of(b"fp"),
            tensors: vec![TensorInfo {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![2, 2],
            }],
            digests: vec![Digest::of(b"w")],
            created_at: 7,
        };
        let back = BaseRecord::try_from(crate::BaseRecord::from(base.clone()));
        assert_eq!(back, Ok(base.clone()));
        let legacy = BaseRecord {
            digests: Vec::new(),
            ..base
        };
        let back = BaseRecord::try_from(crate::BaseRecord::from(legacy.clone()));
        assert_eq!(back.map(|b| b.proven()), Ok(false));
        let bad = crate::DeltaSummary {
            repository: "no-slash".into(),
            ..wire
        };
        assert!(matches!(
            DeltaSummary::try_from(bad),
            Err(BadListing::Name(_))
        ));
    }
}
