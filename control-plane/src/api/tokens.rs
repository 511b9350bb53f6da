//! The token API handlers: each one a permission check (the [`Allowed`]
//! extractor), a call into the token service, and a JSON answer.

use super::error::json_response;
use super::extract::{Allowed, JsonBody, RawBody, Route};
use super::{AppError, AppState, APPLIED_HEADER, CONFIG_VERSION_HEADER, ENVOYS_HEADER, NOT_APPLIED_HEADER};
use crate::acks::{Lag, Lagging};
use crate::store::TokenRecord;
use crate::tokens::evidence::AccessSummary;
use crate::tokens::inactivity::{Action as InactivityAction, Policy, SetBy};
use crate::tokens::secret::Secret;
use crate::tokens::{audit, ConditionsPatch, Delivery, Issued, NewToken, Updated, Wait};
use apitokens_core::conditions::Packed;
use apitokens_core::spec::{ClientAddressesSpec, RateLimitSpec};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiToken<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
    role: &'a str,
    /// `enabled`, or `disabled` (refused by every Envoy until enabled).
    state: &'static str,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
    /// Who created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    created_by: Option<&'a str>,
    /// When one of its secrets last authenticated a request (to the minute).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_use_time: Option<String>,
    /// During a rotation's overlap: until when the previous secret works.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_secret_expire_time: Option<String>,
    /// What its admitted requests did lately (absent without evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<AccessJson>,
    /// Refused before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_before_time: Option<String>,
    /// The client addresses it may be used from.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_addresses: Option<ClientAddressesSpec>,
    /// At most this request rate at each gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateLimitSpec>,
    /// The last client addresses its requests came from, the latest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    last_addresses: Vec<SeenFromJson>,
}

/// `lastAddresses[]`: a client address and when a gateway last saw it (to
/// the minute).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SeenFromJson {
    address: String,
    last_seen_time: String,
}

/// `access`: the kinds of access a token's admitted requests used in the
/// last `days` days, and the narrowest role that would have admitted them
/// all (absent if no single role would have).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccessJson {
    days: u32,
    kinds: Vec<&'static str>,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    narrowest_role: Option<&'static str>,
}

impl From<AccessSummary> for AccessJson {
    fn from(s: AccessSummary) -> Self {
        Self {
            days: s.days,
            kinds: s.kinds.iter().map(|k| k.as_str()).collect(),
            complete: s.complete,
            narrowest_role: s.narrowest.map(|r| r.as_str()),
        }
    }
}

impl<'a> ApiToken<'a> {
    fn new(app: &AppState, r: &'a TokenRecord, secret: Option<&'a Secret>) -> Self {
        let conditions = r.conditions.as_ref().map(Packed::conditions).unwrap_or_default();
        Self {
            name: &r.name,
            secret: secret.map(Secret::expose),
            role: r.role.as_str(),
            state: if r.disabled { "disabled" } else { "enabled" },
            create_time: r.create_time.to_rfc3339(),
            expire_time: r.expire_time.map(|t| t.to_rfc3339()),
            created_by: r.created_by.as_deref(),
            last_use_time: r.last_use.map(|t| t.to_rfc3339()),
            previous_secret_expire_time: r
                .previous
                .map(|p| r.expire_time.map_or(p.until, |e| e.min(p.until)).to_rfc3339()),
            access: app.service.access_summary(r).map(AccessJson::from),
            not_before_time: conditions.not_before.map(|t| t.to_rfc3339()),
            client_addresses: conditions.addresses_spec(),
            rate_limit: conditions.rate_limit.map(|l| l.spec()),
            last_addresses: r
                .last_addresses
                .iter()
                .map(|(address, time)| SeenFromJson {
                    address: address.to_string(),
                    last_seen_time: time.to_rfc3339(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct One<'a> {
    api_token: ApiToken<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Many<'a> {
    api_tokens: Vec<ApiToken<'a>>,
}

/// The query of a write: `?waitForEnvoys=false` answers once the change is
/// published, without waiting for the Envoys' ACKs (for bulk jobs).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WriteQuery {
    wait_for_envoys: Option<bool>,
}

fn wait(query: Result<Query<WriteQuery>, QueryRejection>) -> Result<Wait, AppError> {
    let Query(q) = query.map_err(|_| AppError::BadField {
        field: "waitForEnvoys",
        problem: "must be true or false",
    })?;
    Ok(match q.wait_for_envoys {
        Some(false) => Wait::Published,
        _ => Wait::Envoys,
    })
}

/// Header values carry node ids, which the operator chose: visible ASCII only.
fn header_text(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(2000)
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

/// The answer to a write: the seed's JSON body, and headers saying which
/// configuration version carries the change and whether every connected
/// Envoy applied it: how many did not and why, and which ones only when the
/// operator asked for it (`names`, `--name-envoys-in-answers`): a namespace's
/// owner has no business learning the gateways' and replicas' names.
fn written(body: &impl Serialize, delivery: &Delivery, names: bool) -> Response {
    let mut resp = json_response(StatusCode::OK, body);
    let headers = resp.headers_mut();
    if let Some(version) = delivery.version() {
        headers.insert(CONFIG_VERSION_HEADER, header_text(&version.to_string()));
    }
    match delivery {
        Delivery::Stored => {}
        Delivery::NotPublished { reason } => {
            headers.insert(APPLIED_HEADER, HeaderValue::from_static("not-published"));
            headers.insert(
                NOT_APPLIED_HEADER,
                header_text(&format!("committed, not published to the gateways yet: {reason}")),
            );
        }
        Delivery::Published { .. } => {
            headers.insert(APPLIED_HEADER, HeaderValue::from_static("not-waited"));
        }
        Delivery::Applied(rollout) => {
            let applied = if rollout.complete() { "true" } else { "false" };
            headers.insert(APPLIED_HEADER, HeaderValue::from_static(applied));
            headers.insert(
                ENVOYS_HEADER,
                header_text(&format!("{}/{}", rollout.applied, rollout.envoys)),
            );
            if !rollout.complete() {
                let text = not_applied(&rollout.lagging, names);
                headers.insert(NOT_APPLIED_HEADER, header_text(&text));
            }
        }
    }
    resp
}

/// `x-apitokens-not-applied`: each Envoy that did not apply the change and
/// why (`names`), or how many did not for each reason, in the order first
/// seen.
fn not_applied(lagging: &[Lagging], names: bool) -> String {
    let why = |lag: &Lag| match lag {
        Lag::Pending => "no ACK in time",
        Lag::Rejected(_) => "rejected (NACK)",
        Lag::WriteFailed(_) => "write failed",
        Lag::Held(_) => "held (it enforces a newer version than this control plane)",
        Lag::Unresponsive(_) => "unresponsive (no answer to earlier versions either)",
    };
    if names {
        let each: Vec<String> = lagging.iter().map(|l| format!("{}: {}", l.who, why(&l.lag))).collect();
        return each.join("; ");
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for reason in lagging.iter().map(|l| why(&l.lag)) {
        match counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => counts.push((reason, 1)),
        }
    }
    let each: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("{} (which: /status)", each.join("; "))
}

fn issued(app: &AppState, issued: &Issued) -> Response {
    written(
        &One {
            api_token: ApiToken::new(app, &issued.token, Some(&issued.secret)),
        },
        &issued.delivery,
        app.name_envoys,
    )
}

pub(crate) async fn list(State(app): State<Arc<AppState>>, caller: Allowed) -> Result<Response, AppError> {
    let records = app.service.list(caller.route.namespace()).await?;
    Ok(json_response(
        StatusCode::OK,
        &Many {
            api_tokens: records.iter().map(|r| ApiToken::new(&app, r, None)).collect(),
        },
    ))
}

/// A create's body: Ververica Platform's `ApiToken` model (its POST body is
/// the whole model, so generated clients send `createTime` and `secret` as
/// `null`), plus `expireTime`. Only the control plane sets `createTime` and
/// chooses a secret: those two must be absent or `null`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateBody {
    name: String,
    role: String,
    #[serde(default)]
    expire_time: Option<String>,
    #[serde(default)]
    not_before_time: Option<String>,
    #[serde(default)]
    client_addresses: Option<ClientAddressesSpec>,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    create_time: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    secret: Option<serde::de::IgnoredAny>,
}

pub(crate) async fn create(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    query: Result<Query<WriteQuery>, QueryRejection>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, AppError> {
    // (Checked before the token's own fields, and never echoed: a secret
    // sent here may be one a client meant to keep.)
    if body.secret.is_some() {
        return Err(AppError::BadField {
            field: "secret",
            problem: "the control plane generates the secret: send null or leave it out",
        });
    }
    if body.create_time.is_some() {
        return Err(AppError::BadField {
            field: "createTime",
            problem: "the control plane sets the creation time: send null or leave it out",
        });
    }
    let new = NewToken {
        name: body.name,
        role: body.role,
        expire_time: body.expire_time,
        not_before_time: body.not_before_time,
        client_addresses: body.client_addresses,
        rate_limit: body.rate_limit,
    };
    let result = app
        .service
        .create(caller.route.namespace(), new, &caller.actor, wait(query)?)
        .await?;
    Ok(issued(&app, &result))
}

pub(crate) async fn get(State(app): State<Arc<AppState>>, caller: Allowed) -> Result<Response, AppError> {
    let (ns, id) = item(&caller.route)?;
    let record = app.service.get(ns, id).await?;
    Ok(json_response(
        StatusCode::OK,
        &One {
            api_token: ApiToken::new(&app, &record, None),
        },
    ))
}

pub(crate) async fn delete(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    query: Result<Query<WriteQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let (ns, id) = item(&caller.route)?;
    let delivery = app.service.delete(ns, id, &caller.actor, wait(query)?).await?;
    Ok(written(&serde_json::json!({}), &delivery, app.name_envoys))
}

/// No body, `{}`, or `{"previousSecretTtl": "3600s"}`: how long the old
/// secret keeps working.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RegenerateBody {
    #[serde(default)]
    previous_secret_ttl: Option<String>,
}

/// A duration as protobuf's JSON writes it: seconds with an `s`
/// (`"3600s"`, `"1.5s"`).
fn duration(text: &str) -> Option<Duration> {
    let seconds = text.strip_suffix('s')?;
    if seconds.is_empty() || !seconds.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return None;
    }
    Duration::try_from_secs_f64(seconds.parse::<f64>().ok()?).ok()
}

/// The body of a disable or an enable: none, or `{}` (for clients that
/// always send a JSON object).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoFields {}

/// `POST .../apitokens/{token}:ACTION`: `regenerate`, `disable` or `enable`
/// (the extractor refused any other action).
pub(crate) async fn action(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    query: Result<Query<WriteQuery>, QueryRejection>,
    body: RawBody,
) -> Result<Response, AppError> {
    let (ns, id) = item(&caller.route)?;
    let wait = wait(query)?;
    let action = match &caller.route {
        Route::Action { action, .. } => action.as_str(),
        _ => return Err(AppError::UnknownAction),
    };
    let updated = match action {
        "regenerate" => return regenerate(&app, &caller, ns, id, wait, &body).await,
        "disable" => {
            body.optional_json::<NoFields>()?;
            app.service.disable(ns, id, &caller.actor, wait).await?
        }
        "enable" => {
            body.optional_json::<NoFields>()?;
            app.service.enable(ns, id, &caller.actor, wait).await?
        }
        _ => return Err(AppError::UnknownAction),
    };
    Ok(state_set(&app, &updated))
}

/// `PATCH .../apitokens/{token}`'s body: a JSON merge patch (RFC 7396) of
/// the token's conditions, the only fields that change (a field left out
/// stays, `null` removes it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct UpdateBody {
    #[serde(default, deserialize_with = "present")]
    not_before_time: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    client_addresses: Option<Option<ClientAddressesSpec>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<RateLimitSpec>>,
}

/// A field that is present, `null` or not (`Some(None)` for `null`); absent
/// fields are `None` by `#[serde(default)]`.
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// `PATCH .../apitokens/{token}`: changes the token's conditions.
pub(crate) async fn update(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    query: Result<Query<WriteQuery>, QueryRejection>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Response, AppError> {
    let (ns, id) = item(&caller.route)?;
    let patch = ConditionsPatch {
        not_before_time: body.not_before_time,
        client_addresses: body.client_addresses,
        rate_limit: body.rate_limit,
    };
    let updated = app
        .service
        .update_conditions(ns, id, patch, &caller.actor, wait(query)?)
        .await?;
    Ok(state_set(&app, &updated))
}

/// The answer to a disable, an enable or an update: the token (never its
/// secret), and the write's headers.
fn state_set(app: &AppState, updated: &Updated) -> Response {
    written(
        &One {
            api_token: ApiToken::new(app, &updated.token, None),
        },
        &updated.delivery,
        app.name_envoys,
    )
}

async fn regenerate(
    app: &AppState,
    caller: &Allowed,
    ns: &str,
    id: &str,
    wait: Wait,
    body: &RawBody,
) -> Result<Response, AppError> {
    let body = body.optional_json::<RegenerateBody>()?;
    let overlap = match body.and_then(|b| b.previous_secret_ttl) {
        None => None,
        Some(text) => Some(duration(&text).ok_or(AppError::BadField {
            field: "previousSecretTtl",
            problem: "must be a duration in seconds such as \"3600s\"",
        })?),
    };
    let result = app.service.regenerate(ns, id, overlap, &caller.actor, wait).await?;
    Ok(issued(app, &result))
}

/// What a token may learn about itself: nothing about another token (not
/// even which one created it), never a secret.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OwnToken<'a> {
    name: &'a str,
    role: &'a str,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_use_time: Option<String>,
}

/// `GET .../apitokens:self`: the calling token, for any role (a CI job
/// checks its credential before a long run).
pub(crate) async fn own(State(app): State<Arc<AppState>>, caller: Allowed) -> Result<Response, AppError> {
    let record = app.service.own(&caller.actor.name).await?;
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Own<'a> {
        api_token: OwnToken<'a>,
    }
    Ok(json_response(
        StatusCode::OK,
        &Own {
            api_token: OwnToken {
                name: &record.name,
                role: record.role.as_str(),
                create_time: record.create_time.to_rfc3339(),
                expire_time: record.expire_time.map(|t| t.to_rfc3339()),
                last_use_time: record.last_use.map(|t| t.to_rfc3339()),
            },
        },
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EventsQuery {
    page_size: Option<String>,
    page_token: Option<String>,
}

/// `apitokens:inactivity`'s answer: the policy the namespace has (`null`:
/// off), and who set it.
fn inactivity_answer(policy: Option<(Policy, SetBy)>) -> Response {
    let policy = policy.map(|(p, by)| {
        serde_json::json!({
            "after": p.after_text(),
            "action": p.action.as_str(),
            "setBy": match by {
                SetBy::Namespace => "namespace",
                SetBy::Operator => "operator",
            },
        })
    });
    json_response(StatusCode::OK, &serde_json::json!({ "inactivityPolicy": policy }))
}

/// `GET .../apitokens:inactivity`: the namespace's inactivity policy.
pub(crate) async fn inactivity(State(app): State<Arc<AppState>>, caller: Allowed) -> Result<Response, AppError> {
    let policy = app.service.inactivity_policy(caller.route.namespace()).await?;
    Ok(inactivity_answer(policy))
}

/// `PUT .../apitokens:inactivity`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InactivityBody {
    after: String,
    action: String,
}

/// `PUT .../apitokens:inactivity`: the namespace's owners pick its policy
/// (`{"after": "90d", "action": "disable"}`).
pub(crate) async fn set_inactivity(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    JsonBody(body): JsonBody<InactivityBody>,
) -> Result<Response, AppError> {
    // Whole days, as the document says (`90d`): the operator's flag also
    // takes other units.
    let days = body
        .after
        .strip_suffix('d')
        .filter(|n| n.starts_with(|c: char| ('1'..='9').contains(&c)) && n.chars().all(|c| c.is_ascii_digit()));
    let after = days
        .and_then(|_| Policy::parse_after(&body.after))
        .ok_or(AppError::BadField {
            field: "after",
            problem: "must be a number of days from 1d to 36500d",
        })?;
    let action = InactivityAction::parse(&body.action).ok_or(AppError::BadField {
        field: "action",
        problem: "must be disable or delete",
    })?;
    let policy = app
        .service
        .set_inactivity_policy(caller.route.namespace(), Some(Policy { after, action }), &caller.actor)
        .await?;
    Ok(inactivity_answer(policy))
}

/// `DELETE .../apitokens:inactivity`: the namespace's own policy removed
/// (the operator's, if any, applies).
pub(crate) async fn remove_inactivity(State(app): State<Arc<AppState>>, caller: Allowed) -> Result<Response, AppError> {
    let policy = app
        .service
        .set_inactivity_policy(caller.route.namespace(), None, &caller.actor)
        .await?;
    Ok(inactivity_answer(policy))
}

/// `GET .../apitokens:events`: the namespace's audit trail, newest first,
/// `?pageSize=N` (default 50) and `?pageToken=` from the previous page's
/// `nextPageToken`.
pub(crate) async fn events(
    State(app): State<Arc<AppState>>,
    caller: Allowed,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|_| AppError::bad_query())?;
    let page_size = match query.page_size.as_deref().map(str::parse::<u32>) {
        None => 50,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Err(AppError::BadField {
                field: "pageSize",
                problem: "must be a number from 1 to 1000",
            })
        }
    };
    let (events, next) = app
        .service
        .events(caller.route.namespace(), page_size, query.page_token.as_deref())
        .await?;
    let mut body = serde_json::Map::new();
    body.insert("events".into(), events.iter().map(audit::to_json).collect());
    if let Some(next) = next {
        body.insert("nextPageToken".into(), next.into());
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// The namespace and token id of an item or action path.
fn item(route: &Route) -> Result<(&str, &str), AppError> {
    match route {
        Route::Item { ns, id } | Route::Action { ns, id, .. } => Ok((ns, id)),
        Route::Collection { .. } | Route::CollectionAction { .. } => Err(AppError::UnknownPath),
    }
}

/// Any other method on an item or action path.
pub(crate) async fn item_method_not_allowed(uri: Uri) -> impl IntoResponse {
    let allowed = Route::parse(uri.path()).map_or("GET, PATCH, DELETE", |r| r.allowed());
    AppError::MethodNotAllowed(allowed)
}
