//! What a token's requests did: the evidence for least privilege. The filter
//! folds every request a token authenticates into one byte per token
//! (an `or`), and the usage reports carry that byte next to the token's
//! digest, so the control plane can say which kinds of access a token used
//! and which roles would have admitted all of it.

use crate::role::{Role, RoleSet};

/// One byte: bit 0, the token authenticated a request (whatever the rules
/// then decided); bits 1 to 3, the kinds of the requests it was admitted
/// for ([`Kind`]); bits 4 to 6, the roles that would have refused one of
/// them (bit `4 + Role::index`). Admitted requests only: a refused request
/// is no evidence of what the token needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access(u8);

/// The kind of access a request the rules admitted was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `list` or `get`.
    Read,
    /// `create`, `update` or `delete`.
    Write,
    /// A call on the token API (`/apitokens/...`) that a viewer may not
    /// make: listing, creating, regenerating, disabling or deleting tokens.
    /// (`apitokens:self`, open to every role, is a read.)
    Tokens,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Read, Kind::Write, Kind::Tokens];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Tokens => "tokens",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Self::Read => 1 << 1,
            Self::Write => 1 << 2,
            Self::Tokens => 1 << 3,
        }
    }
}

const USED: u8 = 1;
const REFUSING_SHIFT: u8 = 4;
const UNREPORTED: u8 = 1 << 7;

impl Access {
    /// Nothing.
    pub const NONE: Access = Access(0);
    /// Authenticated, and nothing admitted (yet).
    pub const USED: Access = Access(USED);
    /// Used, by a report that did not say what the requests did (a filter
    /// older than the access byte): whatever it did is unknown. Set by the
    /// control plane, never read from a report ([`Self::from_bits`]).
    pub const UNREPORTED: Access = Access(USED | UNREPORTED);

    /// A request admitted as `kind`, which only the roles in `admitting`
    /// may make.
    pub const fn admitted(kind: Kind, admitting: RoleSet) -> Self {
        Self(USED | kind.bit() | admitting.complement().bits() << REFUSING_SHIFT)
    }

    /// With a request of `kind` admitted.
    pub const fn with_kind(self, kind: Kind) -> Self {
        Self(self.0 | USED | kind.bit())
    }

    /// With an admitted request that `role` would have refused.
    pub const fn refused_by(self, role: Role) -> Self {
        Self(self.0 | 1 << (REFUSING_SHIFT + role.index() as u8))
    }

    pub const fn union(self, other: Access) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn is_used(self) -> bool {
        self.0 & USED != 0
    }

    /// Some use came without what it did ([`Self::UNREPORTED`]).
    pub const fn is_unreported(self) -> bool {
        self.0 & UNREPORTED != 0
    }

    pub const fn has(self, kind: Kind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The roles that would have refused at least one admitted request.
    pub const fn refusing(self) -> RoleSet {
        RoleSet::from_bits(self.0 >> REFUSING_SHIFT)
    }

    /// The narrowest role that would have admitted every request admitted
    /// so far; `None` if none was, or no role would have.
    pub fn narrowest_role(self) -> Option<Role> {
        if self.0 & (Kind::Read.bit() | Kind::Write.bit() | Kind::Tokens.bit()) == 0 {
            return None;
        }
        self.refusing().complement().narrowest()
    }

    /// The byte a usage report carries.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// From a report's byte; bits this version does not know are dropped,
    /// and so is [`Self::UNREPORTED`]'s, which no report sets.
    pub const fn from_bits(bits: u8) -> Self {
        Self(bits & !UNREPORTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_narrowest_role_admits_everything_admitted() {
        let anyone = RoleSet::ALL;
        let editors = RoleSet::NONE.with(Role::Editor).with(Role::Owner);
        let owners = RoleSet::NONE.with(Role::Owner);
        let read = Access::admitted(Kind::Read, anyone);
        assert_eq!(read.narrowest_role(), Some(Role::Viewer));
        let write = read.union(Access::admitted(Kind::Write, editors));
        assert_eq!(write.narrowest_role(), Some(Role::Editor));
        assert!(write.has(Kind::Read) && write.has(Kind::Write) && !write.has(Kind::Tokens));
        let tokens = write.union(Access::admitted(Kind::Tokens, owners));
        assert_eq!(tokens.narrowest_role(), Some(Role::Owner));
        // Custom rules need not be ordered: a request only viewers and
        // owners may make, then one only editors and owners may make.
        let odd = Access::admitted(Kind::Read, RoleSet::NONE.with(Role::Viewer).with(Role::Owner))
            .union(Access::admitted(Kind::Write, editors));
        assert_eq!(odd.narrowest_role(), Some(Role::Owner));
        // Authenticated and never admitted: no evidence.
        assert_eq!(Access::USED.narrowest_role(), None);
        assert!(Access::USED.is_used() && !Access::NONE.is_used());
        assert_eq!(Access::from_bits(tokens.bits()), tokens);
        // Built up from its parts, as a store reads it back.
        let parts = Access::NONE
            .with_kind(Kind::Read)
            .with_kind(Kind::Write)
            .refused_by(Role::Viewer);
        assert_eq!(parts, write);
        // A report cannot say its uses are unreported.
        assert!(Access::UNREPORTED.is_unreported());
        assert!(!Access::from_bits(Access::UNREPORTED.bits()).is_unreported());
    }
}
