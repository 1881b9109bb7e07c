//! Who is calling, and what they may do.
//!
//! A registry with no tokens at all runs *open* (the one-machine quick start) and says so
//! at start-up. Once any token exists, every write needs one, and a namespace is readable
//! only with a token for it (or for `*`) unless it is marked public. Tokens are
//! `dlt_<64 hex>`; only their blake3 hash is stored.

use crate::error::{Error, Result};
use crate::meta::jobs::WorkerScope;

pub use delta_proto::tokens::{Scope, TokenKind};

/// A valid token's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token id (for the audit log).
    pub token_id: i64,
    /// Namespace, or `*`.
    pub namespace: String,
    /// Scope.
    pub scope: Scope,
    /// A user's or a worker's.
    pub kind: TokenKind,
    /// Unix seconds the token expires (`None`: never).
    pub expires_at: Option<i64>,
}

/// The caller of one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No tokens exist: everything is allowed.
    Open,
    /// No token sent, while tokens exist.
    Anonymous,
    /// A valid token.
    Token(Principal),
}

impl Caller {
    /// The token id, for the audit log.
    pub fn token_id(&self) -> Option<i64> {
        match self {
            Caller::Token(p) => Some(p.token_id),
            _ => None,
        }
    }

    /// The namespace blobs uploaded by this caller are linked to: `None` for open
    /// registries and `*` tokens (no link needed: they see everything).
    pub fn blob_namespace(&self) -> Option<&str> {
        match self {
            Caller::Token(p) if p.namespace != "*" => Some(&p.namespace),
            _ => None,
        }
    }

    /// Whose blobs this caller sees, as [`crate::meta::MetaStore::visible_blobs`] takes
    /// it: `*` (open registries and `*` tokens: every blob), the token's namespace (blobs
    /// linked to it or to a public namespace), or `""` (anonymous: public namespaces only;
    /// no namespace is named `""`).
    pub fn blob_viewer(&self) -> &str {
        match self {
            Caller::Open => "*",
            Caller::Anonymous => "",
            Caller::Token(p) => &p.namespace,
        }
    }

    /// Whether this caller sees every namespace.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Anonymous => false,
            Caller::Token(p) => p.namespace == "*",
        }
    }

    /// Checks `need` on `namespace`; `public` says whether anyone may read it. The
    /// refusal never depends on whether anything in the namespace exists.
    pub fn check(&self, namespace: &str, need: Scope, public: bool) -> Result<()> {
        match self {
            Caller::Open => Ok(()),
            _ if need == Scope::Read && public => Ok(()),
            Caller::Anonymous => Err(Error::Unauthenticated(format!(
                "{need} access to {namespace} needs a token"
            ))),
            Caller::Token(p)
                if (p.namespace == namespace || p.namespace == "*") && p.scope >= need =>
            {
                Ok(())
            }
            Caller::Token(p) => Err(Error::PermissionDenied(format!(
                "token {} ({} on {}) does not grant {need} on {namespace}",
                p.token_id, p.scope, p.namespace
            ))),
        }
    }

    /// Whether the caller's token reaches every repository of `namespace` (open
    /// registries, `*` tokens, tokens of that namespace), whatever the scope. Public
    /// namespaces do not count: this is about tokens, not about what anyone may read.
    pub fn covers(&self, namespace: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Anonymous => false,
            Caller::Token(p) => p.namespace == "*" || p.namespace == namespace,
        }
    }

    /// Names the caller in a refusal: `token 3 (write on team-a)`, never its secret.
    pub fn describe(&self) -> String {
        match self {
            Caller::Open => "an open registry's caller".into(),
            Caller::Anonymous => "a caller without a token".into(),
            Caller::Token(p) => format!(
                "{} token {} ({} on {})",
                p.kind, p.token_id, p.scope, p.namespace
            ),
        }
    }

    /// The jobs a worker may lease and finish: those of its token's namespace (all with
    /// `*`), training jobs only with write scope (they publish), verification jobs with
    /// read. Open registries: every job. Anyone else is refused.
    pub fn worker_scope(&self) -> Result<WorkerScope> {
        self.check_worker()?;
        Ok(match self {
            Caller::Token(p) => WorkerScope {
                namespace: p.namespace.clone(),
                train: p.scope >= Scope::Write,
            },
            Caller::Open | Caller::Anonymous => WorkerScope::all(),
        })
    }

    /// Whether the caller may run jobs: open registries, and worker tokens.
    pub fn check_worker(&self) -> Result<()> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(p) if p.kind == TokenKind::Worker => Ok(()),
            Caller::Anonymous => Err(Error::Unauthenticated(
                "job leases need a worker token".into(),
            )),
            Caller::Token(p) => Err(Error::PermissionDenied(format!(
                "token {} is a {} token; only worker tokens lease and complete jobs",
                p.token_id, p.kind
            ))),
        }
    }

    /// Checks `need` on some namespace (uploads and base registration, which are not
    /// namespaced).
    pub fn check_any(&self, need: Scope) -> Result<()> {
        match self {
            Caller::Open => Ok(()),
            Caller::Anonymous => Err(Error::Unauthenticated(format!(
                "{need} access needs a token"
            ))),
            Caller::Token(p) if p.scope >= need => Ok(()),
            Caller::Token(p) => Err(Error::PermissionDenied(format!(
                "token {} has {} scope; {need} is needed",
                p.token_id, p.scope
            ))),
        }
    }
}

/// A new random token secret.
pub fn new_secret() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("dlt_{}{}", a.simple(), b.simple())
}

/// The stored hash of a secret.
pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Whether a string looks like a token at all (checked before any lookup).
pub fn well_formed(secret: &str) -> bool {
    secret.len() == 68
        && secret.starts_with("dlt_")
        && secret[4..].bytes().all(|b| b.is_ascii_hexdigit())
}
