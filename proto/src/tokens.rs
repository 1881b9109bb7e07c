//! Who a token, or a caller without one, is and what it may do: the names the registry
//! stores in its token table and the wire carries (`WhoAmIResponse.kind`, `.scope`).

/// Token scopes, ordered: admin ⊃ write ⊃ read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Pull, list, resolve.
    Read,
    /// Also push, tag, upload, register bases.
    Write,
    /// Also delete, gc.
    Admin,
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// A person or a program using the registry.
    User,
    /// A worker: it may also lease, run and complete jobs.
    Worker,
}

/// Who the registry takes a caller for (`WhoAmI`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallerKind {
    /// The registry has no tokens: everyone may do everything.
    Open,
    /// No token was sent (public namespaces only).
    Anonymous,
    /// A user token.
    User,
    /// A worker token.
    Worker,
}

names!(Scope, "scope", Read => "read", Write => "write", Admin => "admin");
names!(TokenKind, "token kind", User => "user", Worker => "worker");
names!(
    CallerKind,
    "caller kind",
    Open => "open",
    Anonymous => "anonymous",
    User => "user",
    Worker => "worker"
);

impl From<TokenKind> for CallerKind {
    fn from(k: TokenKind) -> Self {
        match k {
            TokenKind::User => CallerKind::User,
            TokenKind::Worker => CallerKind::Worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(*s));
        }
        for k in CallerKind::ALL {
            assert_eq!(k.to_string().parse::<CallerKind>(), Ok(*k));
        }
        assert_eq!("worker".parse::<TokenKind>(), Ok(TokenKind::Worker));
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        assert_eq!(
            "owner".parse::<Scope>().unwrap_err().to_string(),
            "scope \"owner\" is not one of read, write, admin"
        );
    }
}
