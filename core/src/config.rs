//! The plugin configuration: its JSON schema (a public contract, shared with
//! the control plane) and its validation into an immutable [`Config`].

use crate::overrides::{UrlOverrides, METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS};
use crate::reply::Replies;
use crate::rules::{RuleSpec, Rules};
use crate::table::TokenTable;
use serde::{Deserialize, Serialize};
use std::fmt;

pub const DEFAULT_REALM: &str = "apitokens";
pub const DEFAULT_NAME_HEADER: &str = "x-apitoken-name";
pub const DEFAULT_NAMESPACE_HEADER: &str = "x-apitoken-namespace";
pub const DEFAULT_ROLE_HEADER: &str = "x-apitoken-role";

/// The plugin configuration as users write it (Envoy `configuration`, Istio
/// `pluginConfig`) and as the control plane pushes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginConfig {
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    /// `realm` of `WWW-Authenticate`; default `apitokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// Names of the headers that carry the caller's identity upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_headers: Option<IdentityHeadersSpec>,
    /// Send the `Authorization` header upstream; default false (removed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_authorization: bool,
    /// Path patterns (the rule language) whose allowed requests keep the
    /// `Authorization` header, whatever rule allowed them: for an upstream
    /// that checks the token itself, such as the control plane's token API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_authorization_paths: Vec<String>,
    /// The upstream clusters that reach that API (required with
    /// `forwardAuthorizationPaths`): a request whose path matches keeps the
    /// header only when its route sends it to one of them, so a route to
    /// another service under a matching path never receives the secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_authorization_clusters: Vec<String>,
    /// `reject` (default), `remove` or `forward`: what to do with requests
    /// carrying `X-Original-URL` or `X-Rewrite-URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_override_headers: Option<String>,
    /// Permission rules replacing the built-in table when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleSpec>>,
    /// Where the filter reports which tokens were used (their last use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_report: Option<UsageReportSpec>,
}

/// Usage reports: every `intervalSeconds`, each VM sends the digests of the
/// tokens it saw used to the control plane, over gRPC to `cluster` (the
/// cluster Envoy reaches the control plane's xDS server by, so the report
/// travels the xDS side's trust, never the public listener).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UsageReportSpec {
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u32>,
    /// Whether the filter also takes table changes from `cluster` (the
    /// delta channel, `crate::delta`; default true). Only a compact
    /// configuration from the control plane has changes to take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_channel: Option<bool>,
}

/// Default seconds between usage reports: last use is shown to the minute.
pub const DEFAULT_USAGE_REPORT_SECONDS: u32 = 30;

/// Validated usage-report settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReport {
    pub cluster: Box<str>,
    pub interval_seconds: u32,
    pub delta_channel: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenSpec {
    /// `namespaces/{namespace}/apitokens/{token}`.
    pub name: String,
    /// `viewer`, `editor` or `owner`.
    pub role: String,
    /// SHA-256 of the secret's bytes, 64 lower-case hex characters.
    pub secret_sha256: String,
    /// RFC 3339; the token is refused from this instant on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<String>,
    /// The token's previous secret (SHA-256, as `secretSha256`), still
    /// accepted during a rotation's overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_sha256: Option<String>,
    /// RFC 3339: the end of the overlap (required with the previous secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_expire_time: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityHeadersSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A configuration error: the field (as a path such as `tokens[3].role`) and
/// what is wrong with it. Never carries the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

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

impl PluginConfig {
    /// Parses JSON without validating values (see [`Config::from_spec`]).
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        match json.iter().find(|c| !c.is_ascii_whitespace()) {
            None => return Ok(Self::default()),
            Some(b'{') => {}
            // serde would also read a struct from a JSON array.
            Some(_) => return Err(ConfigError::new("configuration", "must be a JSON object")),
        }
        let mut de = serde_json::Deserializer::from_slice(json);
        let spec: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            // The root is "."; an unknown field with an empty name has an
            // empty path (found by fuzzing).
            let field = if path == "." || path.is_empty() {
                "configuration".to_owned()
            } else {
                path
            };
            ConfigError::new(field, describe_json_error(e.inner()))
        })?;
        de.end()
            .map_err(|e| ConfigError::new("configuration", describe_json_error(&e)))?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// serde_json's messages can quote the offending string value; keep only the
/// kind of error and its position, plus the expected alternatives for unknown
/// fields (which name fields, not values). The phrase completes a subject:
/// "tokens[0] has unknown field `x`", "the request body is not valid JSON".
pub fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let msg = e.to_string();
    let what = match e.classify() {
        Category::Syntax | Category::Eof => "is not valid JSON".to_owned(),
        Category::Io => "could not be read".to_owned(),
        Category::Data => {
            let msg = msg.split(" at line").next().unwrap_or_default();
            if msg.starts_with("unknown field") {
                format!("has {msg}")
            } else if msg.starts_with("missing field") {
                format!("is {msg}")
            } else if let Some(expected) = msg.split(", expected ").nth(1) {
                let expected = expected.split(" at line").next().unwrap_or("");
                format!("has the wrong type: expected {expected}")
            } else {
                "is invalid".to_owned()
            }
        }
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
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
