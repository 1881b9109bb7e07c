//! Job kinds and states, as the registry's queue, the workers and the CLI reason about
//! them. The wire (`JobInfo.kind`, `.state`) and the database carry their names.

use std::fmt;
use std::str::FromStr;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// Train a delta and publish it.
    Train,
    /// Re-evaluate a published delta and attach a report to it.
    Verify,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Leased by a worker (until its lease expires).
    Running,
    /// Done: the result is published.
    Succeeded,
    /// Given up: the error says why.
    Failed,
}

/// A name that is no job kind or state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {what} {name:?} is not one of {expected}")]
pub struct UnknownName {
    what: &'static str,
    name: String,
    expected: &'static str,
}

impl JobKind {
    /// Every kind.
    pub const ALL: [JobKind; 2] = [JobKind::Train, JobKind::Verify];

    /// The name on the wire and in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Verify => "verify",
        }
    }
}

impl JobState {
    /// The name on the wire and in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    /// Whether the job will not change again.
    pub const fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

impl FromStr for JobKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "kind",
                name: crate::excerpt(s),
                expected: "train, verify",
            })
    }
}

impl FromStr for JobState {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| UnknownName {
            what: "state",
            name: crate::excerpt(s),
            expected: "queued, running, succeeded, failed",
        })
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(k));
        }
        for s in ["queued", "running", "succeeded", "failed"] {
            assert_eq!(s.parse::<JobState>().map(JobState::as_str), Ok(s));
        }
        assert_eq!(
            "deploy".parse::<JobKind>().unwrap_err().to_string(),
            "job kind \"deploy\" is not one of train, verify"
        );
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Failed.is_final() && !JobState::Running.is_final());
    }
}
