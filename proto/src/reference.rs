//! Repository names, tags and references, with the syntax the registry enforces.
//!
//! - A *namespace* and a *name* are 1–64 characters of `[a-z0-9]` separated by single
//!   `.`, `_` or `-` (OCI's path-component rule, lowercase only, so there is no case or
//!   Unicode confusion and nothing can spell `..`).
//! - A *repository* is `namespace/name`.
//! - A *tag* is 1–128 characters of `[A-Za-z0-9_.-]` starting with a letter, digit or `_`.
//!   `latest` is maintained by the registry (it follows the newest version) and tags of the
//!   form `v<digits>` are reserved for version numbers.
//! - A *reference* is `ns/name` (latest), `ns/name:tag`, `ns/name:v3` or
//!   `ns/name@blake3:<hex>`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// Longest namespace or name.
pub const MAX_COMPONENT_LEN: usize = 64;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 128;
/// The tag the registry moves to every new version.
pub const LATEST: &str = "latest";

/// Why a name, tag or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A namespace or name component breaks the syntax.
    #[error(
        "invalid {what} {value:?}: use 1-{MAX_COMPONENT_LEN} of [a-z0-9] separated by single '.', '_' or '-'"
    )]
    Component {
        /// `namespace` or `name`.
        what: &'static str,
        /// The offending text.
        value: String,
    },
    /// A repository is not `namespace/name`.
    #[error("invalid repository {0:?}: expected namespace/name")]
    Repository(String),
    /// A tag breaks the syntax or is reserved.
    #[error(
        "invalid tag {0:?}: use 1-{MAX_TAG_LEN} of [A-Za-z0-9_.-] starting with a letter, digit or '_'; 'v<number>' is reserved for versions"
    )]
    Tag(String),
    /// A version is not `v<number>` with number ≥ 1.
    #[error("invalid version {0:?}: expected v1, v2, ...")]
    Version(String),
    /// The digest part of a reference is malformed.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
}

fn check_component(what: &'static str, value: &str) -> Result<(), NameError> {
    let err = || NameError::Component {
        what,
        value: crate::excerpt(value),
    };
    if value.is_empty() || value.len() > MAX_COMPONENT_LEN {
        return Err(err());
    }
    let mut prev_sep = true; // a component may not start with a separator
    for b in value.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' => prev_sep = false,
            b'.' | b'_' | b'-' if !prev_sep => prev_sep = true,
            _ => return Err(err()),
        }
    }
    if prev_sep {
        return Err(err());
    }
    Ok(())
}

/// A checked `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    namespace: String,
    name: String,
}

impl Repository {
    /// Checks both components.
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        check_component("namespace", namespace)?;
        check_component("name", name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The namespace (team).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name inside the namespace.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FromStr for Repository {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !name.contains('/') => Self::new(ns, name),
            _ => Err(NameError::Repository(crate::excerpt(s))),
        }
    }
}

/// As its `namespace/name` string (JSON output of listings).
impl serde::Serialize for Repository {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks a tag a user may set (not `latest`, which the registry moves, and not `v<digits>`).
pub fn check_tag(tag: &str) -> Result<(), NameError> {
    let err = || NameError::Tag(crate::excerpt(tag));
    let first_ok = tag
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first_ok
        || !rest_ok
        || tag.len() > MAX_TAG_LEN
        || parse_version(tag).is_some()
        || tag == LATEST
    {
        return Err(err());
    }
    Ok(())
}

/// `v3` → 3. `None` for anything else, including `v0` and `v01`.
pub fn parse_version(s: &str) -> Option<u64> {
    let digits = s.strip_prefix('v')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a reference selects inside its repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// A tag, `latest` included.
    Tag(String),
    /// A version number (`v3`).
    Version(u64),
    /// A manifest digest.
    Digest(Digest),
}

/// A parsed reference: a repository and what to pick in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The repository.
    pub repository: Repository,
    /// Tag, version or digest; `ns/name` alone means the `latest` tag.
    pub selector: Selector,
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((repo, digest)) = s.split_once('@') {
            return Ok(Self {
                repository: repo.parse()?,
                selector: Selector::Digest(digest.parse()?),
            });
        }
        let (repo, selector) = match s.split_once(':') {
            None => (s, Selector::Tag(LATEST.to_owned())),
            Some((repo, tag)) => {
                let selector = if let Some(v) = parse_version(tag) {
                    Selector::Version(v)
                } else if tag.starts_with('v') && tag[1..].bytes().all(|b| b.is_ascii_digit()) {
                    return Err(NameError::Version(crate::excerpt(tag)));
                } else if tag == LATEST {
                    Selector::Tag(LATEST.to_owned())
                } else {
                    check_tag(tag)?;
                    Selector::Tag(tag.to_owned())
                };
                (repo, selector)
            }
        };
        Ok(Self {
            repository: repo.parse()?,
            selector,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Tag(t) => write!(f, "{}:{t}", self.repository),
            Selector::Version(v) => write!(f, "{}:v{v}", self.repository),
            Selector::Digest(d) => write!(f, "{}@{d}", self.repository),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reference_form() {
        let r: Reference = "team-a/sst2.lora".parse().unwrap();
        assert_eq!(r.repository.to_string(), "team-a/sst2.lora");
        assert_eq!(r.selector, Selector::Tag("latest".into()));
        assert_eq!(
            "a/b:v3".parse::<Reference>().unwrap().selector,
            Selector::Version(3)
        );
        assert_eq!(
            "a/b:prod".parse::<Reference>().unwrap().selector,
            Selector::Tag("prod".into())
        );
        let d = Digest::of(b"x");
        assert_eq!(
            format!("a/b@{d}").parse::<Reference>().unwrap().selector,
            Selector::Digest(d)
        );
    }

    #[test]
    fn refuses_abusive_names() {
        for bad in [
            "", "a", "a/", "/b", "a/b/c", "../b", "a/..", "a/%2e%2e", "A/b", "a/b\0", "a/.b",
            "a/b-", "a/b--c", "tеam/b", // Cyrillic 'е': a confusable
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad:?} accepted");
        }
        assert!(
            format!("a/{}", "x".repeat(65))
                .parse::<Repository>()
                .is_err()
        );
        assert!(
            format!("a/{}", "x".repeat(64))
                .parse::<Repository>()
                .is_ok()
        );
    }

    #[test]
    fn tags_and_versions() {
        for bad in [
            "",
            "-x",
            ".x",
            "v1",
            "v22",
            "latest",
            "a b",
            "a/b",
            "ü",
            &"t".repeat(129),
        ] {
            assert!(check_tag(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["prod", "v1.2", "vnext", "_x", "2024-01-01"] {
            assert!(check_tag(good).is_ok(), "{good:?} refused");
        }
        assert!("a/b:v0".parse::<Reference>().is_err());
        assert!("a/b:v01".parse::<Reference>().is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        // Any string: no panic; whatever parses prints back to something that parses the same.
        #[test]
        fn references_round_trip(s in "\\PC{0,80}") {
            if let Ok(r) = s.parse::<Reference>() {
                let again: Reference = r.to_string().parse().unwrap();
                prop_assert_eq!(again, r);
            }
        }

        // Near-misses of valid references (traversal, unicode, separators) never panic and
        // never produce a name with anything outside the allowed alphabet.
        #[test]
        fn near_misses(ns in "[a-z0-9._%/\\-]{0,10}", name in "[a-zA-Zé\\u{0435}0-9._/\\-]{0,10}", tag in "[a-zA-Z0-9.:@_\\-]{0,10}") {
            let s = format!("{ns}/{name}:{tag}");
            if let Ok(r) = s.parse::<Reference>() {
                let repo = r.repository.to_string();
                prop_assert!(repo.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
                prop_assert!(!repo.contains(".."));
            }
        }
    }
}
