//! Roles a token can hold and the verbs a request can perform.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Editor,
    Owner,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Editor, Role::Owner];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Owner => "owner",
        }
    }

    /// Exact, lower-case match: the configuration and the API use these names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request does to a resource, derived from the method and whether the
/// path names a collection or an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    List,
    Get,
    Create,
    Update,
    Delete,
}

impl Verb {
    pub const ALL: [Verb; 5] = [Verb::List, Verb::Get, Verb::Create, Verb::Update, Verb::Delete];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Get => "get",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// GET on a collection is `list`, on an item `get`; POST `create`; PUT and
    /// PATCH `update`; DELETE `delete`. Methods are case-sensitive (RFC 9110
    /// 9.1); any other method (HEAD, OPTIONS, `get`, ...) has no verb and is
    /// therefore never permitted.
    pub fn from_method(method: &[u8], collection: bool) -> Option<Self> {
        match method {
            b"GET" if collection => Some(Self::List),
            b"GET" => Some(Self::Get),
            b"POST" => Some(Self::Create),
            b"PUT" | b"PATCH" => Some(Self::Update),
            b"DELETE" => Some(Self::Delete),
            _ => None,
        }
    }

    /// Reads (`list`, `get`) change nothing.
    pub const fn is_read(self) -> bool {
        matches!(self, Self::List | Self::Get)
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of verbs as a bit mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerbSet(u8);

impl VerbSet {
    pub const NONE: VerbSet = VerbSet(0);
    pub const ALL: VerbSet = VerbSet(0b1_1111);

    pub const fn with(self, verb: Verb) -> Self {
        Self(self.0 | verb.bit())
    }

    pub const fn contains(self, verb: Verb) -> bool {
        self.0 & verb.bit() != 0
    }
}

/// A set of roles as a bit mask (bit [`Role::index`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RoleSet(u8);

impl RoleSet {
    pub const NONE: RoleSet = RoleSet(0);
    pub const ALL: RoleSet = RoleSet(0b111);

    pub const fn with(self, role: Role) -> Self {
        Self(self.0 | 1 << role.index())
    }

    pub const fn contains(self, role: Role) -> bool {
        self.0 & 1 << role.index() != 0
    }

    pub const fn and(self, other: RoleSet) -> Self {
        Self(self.0 & other.0)
    }

    /// The roles not in the set.
    pub const fn complement(self) -> Self {
        Self(!self.0 & Self::ALL.0)
    }

    /// The narrowest role in the set (roles are ordered viewer < editor <
    /// owner), if any.
    pub fn narrowest(self) -> Option<Role> {
        Role::ALL.into_iter().find(|r| self.contains(*r))
    }

    /// The role to ask for instead of `held`, which the set does not
    /// hold: the narrowest broader one in the set; else (custom rules need
    /// not be ordered) the narrowest in the set; `None` for an empty set.
    pub fn to_ask_for(self, held: Role) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| *r > held && self.contains(*r))
            .or_else(|| self.narrowest())
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    pub const fn from_bits(bits: u8) -> Self {
        Self(bits & Self::ALL.0)
    }
}
