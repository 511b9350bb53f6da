//! The plugin configuration validated into an immutable [`Config`] (its JSON
//! schema is [`crate::spec`]).

use crate::error::ConfigError;
use crate::overrides::{UrlOverrides, METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS};
use crate::reply::Replies;
use crate::rules::Rules;
use crate::spec::{
    IdentityHeadersSpec, PluginConfig, UsageReportSpec, DEFAULT_NAMESPACE_HEADER, DEFAULT_NAME_HEADER, DEFAULT_REALM,
    DEFAULT_ROLE_HEADER, DEFAULT_USAGE_REPORT_SECONDS,
};
use crate::table::TokenTable;

/// Validated usage-report settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReport {
    pub cluster: Box<str>,
    pub interval_seconds: u32,
    pub delta_channel: bool,
}

/// Names of the identity headers set on allowed requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub name: Box<str>,
    pub namespace: Box<str>,
    pub role: Box<str>,
}

/// A validated configuration: built once per `on_configure`, then only read.
#[derive(Debug)]
pub struct Config {
    pub(crate) tokens: TokenTable,
    pub(crate) rules: Rules,
    identity: IdentityHeaders,
    forward_authorization: bool,
    /// Where allowed requests keep `Authorization` (patterns, no verbs)...
    pub(crate) forward_paths: Rules,
    /// ... when routed to one of these clusters.
    forward_clusters: Vec<Box<[u8]>>,
    url_overrides: UrlOverrides,
    replies: Replies,
    usage_report: Option<UsageReport>,
}

impl Config {
    /// Parses and validates the JSON plugin configuration. Empty input is the
    /// empty configuration: no tokens, so every request is refused.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        Self::from_spec(&PluginConfig::from_json(json)?)
    }

    pub fn from_spec(spec: &PluginConfig) -> Result<Self, ConfigError> {
        Self::with_table(spec, TokenTable::from_specs(&spec.tokens)?)
    }

    /// The settings of `spec` (its `tokens` ignored) with a token table.
    pub fn with_table(spec: &PluginConfig, tokens: TokenTable) -> Result<Self, ConfigError> {
        let realm = spec.realm.as_deref().unwrap_or(DEFAULT_REALM);
        if realm.is_empty()
            || realm.len() > 128
            || !realm
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b'"' && c != b'\\')
        {
            return Err(ConfigError::new(
                "realm",
                "must be 1 to 128 printable ASCII characters without '\"' or '\\'",
            ));
        }
        let identity = identity_headers(spec.identity_headers.as_ref())?;
        let rules = match &spec.rules {
            Some(rules) => Rules::compile(rules)?,
            None => Rules::builtin()?,
        };
        let forward_paths = Rules::compile_patterns("forwardAuthorizationPaths", &spec.forward_authorization_paths)?;
        let forward_clusters = forward_clusters(spec)?;
        let url_overrides = match spec.url_override_headers.as_deref() {
            None => UrlOverrides::Reject,
            Some(mode) => UrlOverrides::parse(mode).ok_or_else(|| {
                ConfigError::new("urlOverrideHeaders", "must be \"reject\", \"remove\" or \"forward\"")
            })?,
        };
        Ok(Self {
            tokens,
            rules,
            identity,
            forward_authorization: spec.forward_authorization,
            forward_paths,
            forward_clusters,
            url_overrides,
            replies: Replies::new(realm),
            usage_report: usage_report(spec.usage_report.as_ref())?,
        })
    }

    /// A configuration without tokens: refuses every request.
    pub fn deny_all() -> Self {
        Self {
            tokens: TokenTable::default(),
            rules: Rules::empty(),
            identity: default_identity(),
            forward_authorization: false,
            forward_paths: Rules::empty(),
            forward_clusters: Vec::new(),
            url_overrides: UrlOverrides::Reject,
            replies: Replies::new(DEFAULT_REALM),
            usage_report: None,
        }
    }

    pub fn tokens(&self) -> &TokenTable {
        &self.tokens
    }

    pub fn usage_report(&self) -> Option<&UsageReport> {
        self.usage_report.as_ref()
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn identity_headers(&self) -> &IdentityHeaders {
        &self.identity
    }

    pub fn forward_authorization(&self) -> bool {
        self.forward_authorization
    }

    /// Whether `cluster` (the route's upstream cluster) is one that
    /// `forwardAuthorizationPaths` keeps the header for.
    pub fn forwards_to(&self, cluster: &[u8]) -> bool {
        self.forward_clusters.iter().any(|c| **c == *cluster)
    }

    pub fn url_overrides(&self) -> UrlOverrides {
        self.url_overrides
    }

    pub fn replies(&self) -> &Replies {
        &self.replies
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

fn default_identity() -> IdentityHeaders {
    IdentityHeaders {
        name: DEFAULT_NAME_HEADER.into(),
        namespace: DEFAULT_NAMESPACE_HEADER.into(),
        role: DEFAULT_ROLE_HEADER.into(),
    }
}

/// Header names an identity header must not take: each already means
/// something to HTTP, to Envoy, to this filter or to an upstream framework, so
/// the filter setting it would change what that header says (or a client
/// could send it under the name the upstream reads as the identity).
const RESERVED_HEADERS: [&str; 21] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "forwarded",
    "via",
    "x-request-id",
    "x-real-ip",
    "x-client-ip",
    "origin",
];

/// Prefixes of header families with a meaning elsewhere: Envoy's own
/// (`x-envoy-*`, which Envoy strips or acts on), the forwarding headers and
/// the hop-by-hop proxy headers.
const RESERVED_PREFIXES: [&str; 3] = ["x-envoy-", "x-forwarded-", "proxy-"];

fn identity_headers(spec: Option<&IdentityHeadersSpec>) -> Result<IdentityHeaders, ConfigError> {
    let pick = |field: &str, value: Option<&String>, default: &str| -> Result<Box<str>, ConfigError> {
        let name = value.map_or(default, String::as_str);
        if !is_header_name(name) {
            return Err(ConfigError::new(
                format!("identityHeaders.{field}"),
                "must be a lower-case HTTP header name (letters, digits, '-'; no '_', which \
                 many upstreams read as '-'), not a pseudo-header",
            ));
        }
        if RESERVED_HEADERS
            .iter()
            .chain(METHOD_OVERRIDE_HEADERS.iter())
            .chain(URL_OVERRIDE_HEADERS.iter())
            .any(|reserved| *reserved == name)
            || RESERVED_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        {
            return Err(ConfigError::new(
                format!("identityHeaders.{field}"),
                "must not be a header that HTTP, Envoy, this filter or upstream frameworks already use",
            ));
        }
        Ok(name.into())
    };
    let spec = spec.cloned().unwrap_or_default();
    let headers = IdentityHeaders {
        name: pick("name", spec.name.as_ref(), DEFAULT_NAME_HEADER)?,
        namespace: pick("namespace", spec.namespace.as_ref(), DEFAULT_NAMESPACE_HEADER)?,
        role: pick("role", spec.role.as_ref(), DEFAULT_ROLE_HEADER)?,
    };
    if headers.name == headers.namespace || headers.name == headers.role || headers.namespace == headers.role {
        return Err(ConfigError::new(
            "identityHeaders",
            "the three header names must differ",
        ));
    }
    Ok(headers)
}

/// `forwardAuthorizationClusters`, checked against `forwardAuthorizationPaths`:
/// one without the other is refused (paths alone would hand owners' secrets to
/// whatever upstream a matching path is routed to).
fn forward_clusters(spec: &PluginConfig) -> Result<Vec<Box<[u8]>>, ConfigError> {
    const FIELD: &str = "forwardAuthorizationClusters";
    match (
        spec.forward_authorization_paths.is_empty(),
        spec.forward_authorization_clusters.is_empty(),
    ) {
        (false, true) => {
            return Err(ConfigError::new(
                FIELD,
                "required with forwardAuthorizationPaths: the upstream clusters of the routes to the API that checks \
                 the token (e.g. [\"apitokens_api\"])",
            ))
        }
        (true, false) => {
            return Err(ConfigError::new(
                FIELD,
                "has no effect without forwardAuthorizationPaths",
            ))
        }
        _ => {}
    }
    spec.forward_authorization_clusters
        .iter()
        .enumerate()
        .map(|(i, name)| {
            if name.is_empty() || name.len() > 256 || !name.bytes().all(|c| (0x21..=0x7e).contains(&c)) {
                Err(ConfigError::new(
                    format!("{FIELD}[{i}]"),
                    "must be a cluster name: 1 to 256 printable ASCII characters, no spaces",
                ))
            } else {
                Ok(name.as_bytes().into())
            }
        })
        .collect()
}

fn usage_report(spec: Option<&UsageReportSpec>) -> Result<Option<UsageReport>, ConfigError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let cluster = &spec.cluster;
    if cluster.is_empty() || cluster.len() > 256 || !cluster.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "usageReport.cluster",
            "must be the name of an Envoy cluster (1 to 256 printable ASCII characters)",
        ));
    }
    let interval_seconds = spec.interval_seconds.unwrap_or(DEFAULT_USAGE_REPORT_SECONDS);
    if !(1..=3600).contains(&interval_seconds) {
        return Err(ConfigError::new(
            "usageReport.intervalSeconds",
            "must be from 1 to 3600 seconds",
        ));
    }
    Ok(Some(UsageReport {
        cluster: cluster.as_str().into(),
        interval_seconds,
        delta_channel: spec.delta_channel.unwrap_or(true),
    }))
}

/// Lower-case letters, digits and `-`, not at either end: no pseudo-header
/// (`:`), no `_` (CGI, PHP and others read `_` and `-` alike, so
/// `x_apitoken_role` and `x-apitoken-role` would be one header upstream).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}
