//! The plugin configuration as written: its JSON schema, a public contract
//! shared by the filter, the control plane and users' Envoy and Istio
//! configurations. Parsed here without validating values; [`crate::config`]
//! validates it into a `Config`.

use crate::error::{describe_json_error, ConfigError};
use serde::{Deserialize, Serialize};

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
    /// The token is disabled: every secret of it is refused (`disabled`),
    /// and it stays as it is, to be enabled again. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// RFC 3339; the token is refused before this instant
    /// (`not_yet_valid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_time: Option<String>,
    /// The client addresses the token may be used from (`address_denied`
    /// from elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addresses: Option<ClientAddressesSpec>,
    /// At most this request rate at each gateway (`rate_limited`, 429,
    /// beyond it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// A request rate: `requests` per `per` (`second` or `minute`), and at
/// most `burst` at once (default: `requests`). Read from a JSON object
/// only, as [`ClientAddressesSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct RateLimitSpec {
    pub requests: u32,
    pub per: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Client address ranges (CIDR, IPv4 or IPv6; a bare address is one host),
/// checked against the address Envoy determined for the request's client.
/// Read from a JSON object only (serde would read a struct from an array
/// too: `[["10.0.0.0/8"]]` is not an allow list).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct ClientAddressesSpec {
    /// When given, the token is refused from any address outside these
    /// (an empty list is refused: it would read as "from anywhere").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// The token is refused from these, even inside `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
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

/// One rule as written in the plugin configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    pub path: String,
    #[serde(default)]
    pub allow: AllowSpec,
    /// Overrides the top-level `forwardAuthorization` (and
    /// `forwardAuthorizationPaths`) for requests this rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_authorization: Option<bool>,
}

/// Verbs per role; a role left out may do nothing. `"*"` means every verb.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub viewer: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub editor: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner: Vec<String>,
}

/// [`ClientAddressesSpec`]'s fields, as they are read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientAddressesFields {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    except: Option<Vec<String>>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for ClientAddressesSpec {
    type Error = String;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let fields: ClientAddressesFields =
            // Never quoting what was sent (an unknown key could be anything).
            serde_json::from_value(serde_json::Value::Object(object)).map_err(|_| {
                "invalid, expected an object with `allow` and/or `except`, lists of address ranges".to_owned()
            })?;
        Ok(Self {
            allow: fields.allow,
            except: fields.except,
        })
    }
}

/// [`RateLimitSpec`]'s fields, as they are read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFields {
    requests: u32,
    per: String,
    #[serde(default)]
    burst: Option<u32>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for RateLimitSpec {
    type Error = String;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let fields: RateLimitFields = serde_json::from_value(serde_json::Value::Object(object)).map_err(|_| {
            "invalid, expected an object with `requests` (a positive integer), `per` (`second` or `minute`) \
             and optionally `burst` (a positive integer)"
                .to_owned()
        })?;
        Ok(Self {
            requests: fields.requests,
            per: fields.per,
            burst: fields.burst,
        })
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
