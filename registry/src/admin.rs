//! Administration on the data dir (tokens, public namespaces, the audit log) and the
//! authentication of RPC callers against the stored tokens.

use std::time::Duration;

use delta_proto::reference::Repository;

use crate::auth::{Caller, Principal, Scope, TokenKind, hash_secret, new_secret, well_formed};
use crate::error::{Error, Result};
use crate::meta::{MetaStore, TokenRecord};

/// What a new token grants.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// A namespace, or `*` for all.
    pub namespace: String,
    /// Its scope.
    pub scope: Scope,
    /// A worker token (for `delta-worker`) rather than a user token.
    pub worker: bool,
    /// Lifetime; `None`: until revoked.
    pub expires_in: Option<Duration>,
    /// Free text.
    pub description: String,
}

/// Checks a namespace name (or `*`).
pub fn check_namespace(ns: &str) -> Result<()> {
    if ns == "*" {
        return Ok(());
    }
    Repository::new(ns, "x").map(|_| ()).map_err(Error::from)
}

/// Creates a token. Returns its id and the secret, which is shown once and never stored.
pub fn create_token(meta: &dyn MetaStore, t: &NewToken, now: i64) -> Result<(i64, String)> {
    check_namespace(&t.namespace)?;
    let secret = new_secret();
    let record = TokenRecord {
        id: 0,
        namespace: t.namespace.clone(),
        scope: t.scope,
        kind: if t.worker {
            TokenKind::Worker
        } else {
            TokenKind::User
        },
        description: t.description.clone(),
        created_at: now,
        expires_at: t.expires_in.map(|d| now + d.as_secs() as i64),
        revoked_at: None,
    };
    let id = meta.create_token(&hash_secret(&secret), &record)?;
    Ok((id, secret))
}

/// Who is calling, from the `authorization` header's value (if any).
pub fn authenticate(meta: &dyn MetaStore, header: Option<&str>, now: i64) -> Result<Caller> {
    let Some(value) = header else {
        return Ok(if meta.token_count()? == 0 {
            Caller::Open
        } else {
            Caller::Anonymous
        });
    };
    let bad =
        || Error::Unauthenticated("the token is malformed, unknown, expired or revoked".to_owned());
    let secret = value.strip_prefix("Bearer ").ok_or_else(bad)?.trim();
    if !well_formed(secret) {
        return Err(bad());
    }
    let t = meta.find_token(&hash_secret(secret))?.ok_or_else(bad)?;
    if t.revoked_at.is_some() || t.expires_at.is_some_and(|e| e <= now) {
        return Err(bad());
    }
    Ok(Caller::Token(Principal {
        token_id: t.id,
        namespace: t.namespace,
        scope: t.scope,
        kind: t.kind,
        expires_at: t.expires_at,
    }))
}
