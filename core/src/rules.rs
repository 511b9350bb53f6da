//! Permission rules: which verbs each role may perform on which paths.
//!
//! A rule is a path pattern and, per role, the verbs it allows. The first rule
//! whose pattern matches the request path decides; a path no rule matches is
//! denied to every role. Patterns are `/`-separated segments:
//!
//! - `{namespace}`: exactly one per pattern; matches a DNS label, exactly (no
//!   other case, no suffix), and is the namespace the token must belong to;
//! - `*`: any one segment; `prefix*`: a segment starting with `prefix` in any
//!   ASCII case;
//! - `**`: last segment only; any number (also zero) of further segments;
//! - anything else is a literal. A literal matches the segment spelled the
//!   same in any ASCII case, alone or followed by `.` and anything (a format
//!   suffix such as `secret-values.json`, a trailing dot); a literal without
//!   `:` also matches when followed by `:` and anything (a custom method:
//!   `apitokens:batchGet`, AIP-136).
//!
//! Those are the spellings upstream routers commonly send to the same handler:
//! case-insensitive routing (Express by default, ASP.NET Core), format
//! suffixes (Rails, older Spring), trailing dots (IIS), custom methods.
//! Matching them here means a segment that could alias a stricter rule is
//! decided by that rule instead of falling through to a permissive one further
//! down. It also means order matters: a literal `secret` also matches
//! `secret.values`, so a rule for `secret.values` must come first.
//!
//! Whether GET means `list` or `get` follows from the number of segments after
//! the namespace: odd names a collection (`.../deployments`), even an item
//! (`.../deployments/{id}`, or the namespace itself).
//!
//! Paths are matched as the gateway sees them, without decoding. A path with a
//! percent-escape, a `;` parameter, a backslash, an empty or dot segment, or a
//! byte outside printable ASCII matches no rule: such spellings are where
//! gateways and upstreams disagree about which resource is meant.

use crate::access::Kind;
use crate::error::ConfigError;
use crate::name::is_dns_label;
use crate::role::{Role, RoleSet, Verb, VerbSet};
use crate::spec::RuleSpec;

/// The built-in rules: the product's REST API (the permission table in
/// `docs/filter.md`, checked against this). Written in the rule language
/// itself so that the table and the language cannot drift apart.
///
/// No built-in rule forwards `Authorization`: which upstream may see a bearer
/// token depends on the deployment (the ECDS setup routes the token API to
/// the control plane, which checks the token again), so that setup says so
/// with `forwardAuthorizationPaths` in its own configuration.
pub const DEFAULT_RULES_JSON: &str = r#"[
  {"path": "/apitokens/v1/namespaces/{namespace}/apitokens:self",
   "allow": {"viewer": ["list"], "editor": ["list"], "owner": ["list"]}},
  {"path": "/apitokens/v1/namespaces/{namespace}/apitokens/**",
   "allow": {"owner": ["*"]}},
  {"path": "/namespaces/v1/namespaces/{namespace}/**",
   "allow": {"owner": ["get", "list", "update"]}},
  {"path": "/api/v1/namespaces/{namespace}/secret-values/**",
   "allow": {"editor": ["*"], "owner": ["*"]}},
  {"path": "/api/v1/namespaces/{namespace}/deployment-defaults/**",
   "allow": {"viewer": ["get", "list"], "editor": ["get", "list"], "owner": ["*"]}},
  {"path": "/api/v1/namespaces/{namespace}/deployment-targets/**",
   "allow": {"viewer": ["get", "list"], "editor": ["get", "list"], "owner": ["*"]}},
  {"path": "/artifacts/v1/namespaces/{namespace}/artifacts:list",
   "allow": {"viewer": ["*"], "editor": ["*"], "owner": ["*"]}},
  {"path": "/artifacts/v1/namespaces/{namespace}/artifacts:getMetadata",
   "allow": {"viewer": ["*"], "editor": ["*"], "owner": ["*"]}},
  {"path": "/artifacts/v1/namespaces/{namespace}/artifacts:*",
   "allow": {"editor": ["*"], "owner": ["*"]}},
  {"path": "/*/*/namespaces/{namespace}/**",
   "allow": {"viewer": ["get", "list"], "editor": ["*"], "owner": ["*"]}}
]"#;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Matches itself in any ASCII case, alone or followed by `.` and
    /// anything; when `custom_method`, also followed by `:` and anything.
    Literal {
        text: Box<[u8]>,
        custom_method: bool,
    },
    /// A segment starting with this, in any ASCII case.
    Prefix(Box<[u8]>),
    Any,
    Namespace,
}

impl Segment {
    /// Allocation-free: the literal was compiled once, the segment is
    /// compared in place.
    fn matches(&self, seg: &[u8]) -> bool {
        match self {
            Self::Literal { text, custom_method } => {
                starts_with_folded(seg, text)
                    && match seg.get(text.len()) {
                        None | Some(b'.') => true,
                        Some(b':') => *custom_method,
                        Some(_) => false,
                    }
            }
            Self::Prefix(p) => starts_with_folded(seg, p),
            Self::Any => true,
            Self::Namespace => is_dns_label(seg),
        }
    }
}

/// `seg` starts with `lower` (lower case) in any ASCII case. Folds one side
/// only, and most segments that differ already differ in length.
fn starts_with_folded(seg: &[u8], lower: &[u8]) -> bool {
    seg.len() >= lower.len() && seg.iter().zip(lower).all(|(s, l)| s.to_ascii_lowercase() == *l)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    segments: Box<[Segment]>,
    /// The pattern ends with `**`.
    rest: bool,
    allow: [VerbSet; 3],
    forward_authorization: Option<bool>,
    /// The pattern starts with the literal `apitokens`: the token API.
    token_api: bool,
}

/// Compiled rules, immutable once built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    rules: Box<[Rule]>,
}

/// What the matching rule says about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope<'p> {
    /// The path's namespace segment (a DNS label).
    pub namespace: &'p [u8],
    /// The path names a collection (GET is `list`) rather than an item.
    pub collection: bool,
    /// The rule's own `forwardAuthorization`, if it has one.
    pub forward_authorization: Option<bool>,
    /// The path matches `forwardAuthorizationPaths` (set by
    /// `Config::scope`).
    pub forward_path: bool,
    allow: [VerbSet; 3],
    token_api: bool,
}

impl Scope<'_> {
    pub fn permits(&self, role: Role, verb: Verb) -> bool {
        self.allow.get(role.index()).is_some_and(|verbs| verbs.contains(verb))
    }

    /// What `method` would do here: the roles that may (none for a method
    /// without a verb), and the request's kind of access, for the usage
    /// reports' evidence (`crate::access`).
    pub fn access(&self, method: &[u8]) -> (RoleSet, Kind) {
        let Some(verb) = Verb::from_method(method, self.collection) else {
            return (RoleSet::NONE, Kind::Write);
        };
        let roles = Role::ALL
            .into_iter()
            .filter(|role| self.permits(*role, verb))
            .fold(RoleSet::NONE, RoleSet::with);
        let kind = if self.token_api && !roles.contains(Role::Viewer) {
            Kind::Tokens
        } else if verb.is_read() {
            Kind::Read
        } else {
            Kind::Write
        };
        (roles, kind)
    }
}

impl Rules {
    /// The built-in rules.
    pub fn builtin() -> Result<Self, ConfigError> {
        let specs: Vec<RuleSpec> =
            serde_json::from_str(DEFAULT_RULES_JSON).map_err(|e| ConfigError::new("rules", e.to_string()))?;
        Self::compile(&specs)
    }

    pub fn compile(specs: &[RuleSpec]) -> Result<Self, ConfigError> {
        let rules = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| compile_rule(i, spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules: rules.into_boxed_slice(),
        })
    }

    /// Bare patterns without verbs, for [`Self::matches`]; errors name
    /// `{field}[i]`.
    pub fn compile_patterns(field: &str, patterns: &[String]) -> Result<Self, ConfigError> {
        let rules = patterns
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let (segments, rest) = compile_pattern(format!("{field}[{i}]"), path)?;
                Ok(Rule {
                    segments,
                    rest,
                    allow: [VerbSet::NONE; 3],
                    forward_authorization: None,
                    token_api: false,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Self {
            rules: rules.into_boxed_slice(),
        })
    }

    /// No rules: every path is denied.
    pub fn empty() -> Self {
        Self { rules: Box::new([]) }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching `path` (the raw `:path`, query included).
    pub fn classify<'p>(&self, path: &'p [u8]) -> Option<Scope<'p>> {
        let mut buf = PathSegments::buffer();
        self.classify_split(PathSegments::split(path, &mut buf)?)
    }

    /// The first rule matching an already split path.
    pub fn classify_split<'p>(&self, path: PathSegments<'_, 'p>) -> Option<Scope<'p>> {
        self.rules.iter().find_map(|rule| rule.matches(path.0))
    }

    /// Whether any rule matches an already split path.
    pub fn matches(&self, path: PathSegments<'_, '_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(path.0).is_some())
    }
}

/// Longer paths match no rule (an API path has a handful of segments).
const MAX_SEGMENTS: usize = 32;

/// A request path split into segments once, into a buffer on the caller's
/// stack (never moved: it is a few hundred bytes), so that several rule sets
/// can match it without splitting or allocating again.
#[derive(Clone, Copy)]
pub struct PathSegments<'b, 'p>(&'b [&'p [u8]]);

impl<'b, 'p> PathSegments<'b, 'p> {
    /// The buffer [`Self::split`] fills.
    pub fn buffer() -> [&'p [u8]; MAX_SEGMENTS] {
        [&b""[..]; MAX_SEGMENTS]
    }

    /// Splits the path (without the query, the leading `/` and one trailing
    /// `/`) in one pass, or `None` when the path must match nothing: a byte
    /// outside printable ASCII, `%`, `;`, `\`, `#`, an empty or dot segment,
    /// or too many segments.
    pub fn split(path: &'p [u8], buf: &'b mut [&'p [u8]; MAX_SEGMENTS]) -> Option<Self> {
        let path = match path.iter().position(|c| *c == b'?') {
            Some(q) => path.get(..q)?,
            None => path,
        };
        let rest = path.strip_prefix(b"/")?;
        let rest = rest.strip_suffix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            return Some(Self(&[]));
        }
        let mut count = 0;
        for segment in rest.split(|c| *c == b'/') {
            if segment.is_empty()
                || segment == b"."
                || segment == b".."
                || segment
                    .iter()
                    .any(|c| !(0x21..=0x7e).contains(c) || matches!(c, b'%' | b';' | b'\\' | b'#'))
            {
                return None;
            }
            *buf.get_mut(count)? = segment;
            count += 1;
        }
        buf.get(..count).map(Self)
    }
}

impl Rule {
    fn matches<'p>(&self, segments: &[&'p [u8]]) -> Option<Scope<'p>> {
        if segments.len() < self.segments.len() || (segments.len() > self.segments.len() && !self.rest) {
            return None;
        }
        let mut namespace: Option<(usize, &'p [u8])> = None;
        for (i, (pattern, seg)) in self.segments.iter().zip(segments).enumerate() {
            if !pattern.matches(seg) {
                return None;
            }
            if *pattern == Segment::Namespace {
                namespace = Some((i, seg));
            }
        }
        let (at, namespace) = namespace?;
        let after_namespace = segments.len() - at - 1;
        Some(Scope {
            namespace,
            collection: after_namespace % 2 == 1,
            forward_authorization: self.forward_authorization,
            forward_path: false,
            allow: self.allow,
            token_api: self.token_api,
        })
    }
}

fn compile_rule(i: usize, spec: &RuleSpec) -> Result<Rule, ConfigError> {
    let (segments, rest) = compile_pattern(format!("rules[{i}].path"), &spec.path)?;
    let allow = [
        verbs(i, "viewer", &spec.allow.viewer)?,
        verbs(i, "editor", &spec.allow.editor)?,
        verbs(i, "owner", &spec.allow.owner)?,
    ];
    let token_api = matches!(segments.first(), Some(Segment::Literal { text, .. }) if &**text == b"apitokens");
    Ok(Rule {
        segments,
        rest,
        allow,
        forward_authorization: spec.forward_authorization,
        token_api,
    })
}

/// A pattern's segments and whether it ends with `**`; errors name `field`.
fn compile_pattern(field: String, path: &str) -> Result<(Box<[Segment]>, bool), ConfigError> {
    let bad = |msg: &str| ConfigError::new(field.clone(), msg);
    let body = path.strip_prefix('/').ok_or_else(|| bad("must start with '/'"))?;
    let parts: Vec<&str> = body.split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    let mut rest = false;
    let last = parts.len().saturating_sub(1);
    for (j, part) in parts.iter().enumerate() {
        if *part == "**" {
            if j != last {
                return Err(bad("'**' is allowed only as the last segment"));
            }
            rest = true;
            continue;
        }
        let segment = match *part {
            "" => return Err(bad("has an empty segment")),
            "{namespace}" => Segment::Namespace,
            "*" => Segment::Any,
            _ => {
                let (text, prefix) = match part.strip_suffix('*') {
                    Some(p) => (p, true),
                    None => (*part, false),
                };
                if text == "." || text == ".." {
                    return Err(bad("has a dot segment"));
                }
                if !text.bytes().all(|c| {
                    (0x21..=0x7e).contains(&c) && !matches!(c, b'%' | b';' | b'\\' | b'#' | b'?' | b'*' | b'{' | b'}')
                }) {
                    return Err(bad(
                        "segments are literals, '*', 'prefix*', '{namespace}' or a final '**' \
                         (printable ASCII without % ; \\ # ? { })",
                    ));
                }
                let bytes: Box<[u8]> = text.to_ascii_lowercase().into_bytes().into();
                if prefix {
                    Segment::Prefix(bytes)
                } else {
                    Segment::Literal {
                        custom_method: !text.contains(':'),
                        text: bytes,
                    }
                }
            }
        };
        segments.push(segment);
    }
    match segments.iter().filter(|s| **s == Segment::Namespace).count() {
        1 => Ok((segments.into_boxed_slice(), rest)),
        0 => Err(bad("must contain '{namespace}': tokens are scoped to a namespace")),
        _ => Err(bad("must contain '{namespace}' only once")),
    }
}

fn verbs(i: usize, role: &str, names: &[String]) -> Result<VerbSet, ConfigError> {
    names.iter().enumerate().try_fold(VerbSet::NONE, |set, (j, name)| {
        if name == "*" {
            Ok(VerbSet::ALL)
        } else {
            Verb::parse(name).map(|v| set.with(v)).ok_or_else(|| {
                ConfigError::new(
                    format!("rules[{i}].allow.{role}[{j}]"),
                    "unknown verb; expected list, get, create, update, delete or \"*\"",
                )
            })
        }
    })
}
