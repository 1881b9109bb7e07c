//! Who a token, or a caller without one, is and what it may do: the names the registry
//! stores in its token table and the wire carries (`WhoAmIResponse.kind`, `.scope`).

use std::fmt;
use std::str::FromStr;

use crate::UnknownName;

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

/// `as_str`, `FromStr` and `Display` over the names of a closed set.
macro_rules! names {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+) => {
        impl $ty {
            /// Every value.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name on the wire and in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $ty::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownName {
                        what: $what,
                        name: crate::excerpt(s),
                        expected: concat!($($name, ", "),+).trim_end_matches(", "),
                    })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
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
