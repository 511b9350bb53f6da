//! The web console: **Settings > API Tokens**, served under [`PREFIX`].
//!
//! Static files only (`control-plane/console/`: HTML, CSS, JavaScript and an
//! icon, embedded in the binary). The page talks to the token REST API
//! (`/apitokens/v1/...`) on the same origin with `Authorization: Bearer`; it
//! holds owner tokens and one-time secrets in the page's memory only. Nothing
//! here reads a token, sets a cookie or answers CORS: the console's routes
//! need no authentication, and every API call the page makes is checked by
//! the gateway's filter and again by the API.
//!
//! Every response (assets, redirect, 404, 405) carries a strict
//! `Content-Security-Policy` (scripts, styles and images from the console's
//! own origin only, no inline script or style, `connect-src 'self'`,
//! `frame-ancestors 'none'`, `form-action 'none'`), `X-Content-Type-Options:
//! nosniff`, `Referrer-Policy: no-referrer` and `Cache-Control: no-store`.
//!
//! Mount it with `Router::merge(console::router())`; it serves [`PREFIX`]
//! (a redirect to `PREFIX/`) and everything under `PREFIX/`.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

/// The console's path prefix (no trailing slash).
pub const PREFIX: &str = "/console";

/// The security headers of every console response.
pub const SECURITY_HEADERS: [(&str, &str); 8] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=()",
    ),
];

/// One embedded file: its path under `PREFIX/`, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../../console/index.html");

const ASSETS: [Asset; 4] = [
    Asset {
        path: "",
        content_type: "text/html; charset=utf-8",
        body: INDEX,
    },
    Asset {
        path: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../console/console.css"),
    },
    Asset {
        path: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/console.js"),
    },
    Asset {
        path: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../console/icon.svg"),
    },
];

/// The console's routes: `GET`/`HEAD` of [`PREFIX`] (redirect), `PREFIX/`
/// (the page) and its assets; anything else under `PREFIX/` is a 404 (or 405
/// for another method), never passed on to another handler.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(PREFIX, any(serve))
        .route("/console/", any(serve))
        .route("/console/{*rest}", any(serve))
}

async fn serve(method: Method, uri: Uri) -> Response {
    respond(&method, uri.path())
}

fn respond(method: &Method, path: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: the console is read-only\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let resp = if path == PREFIX {
        // Relative asset paths need the trailing slash.
        let mut resp = text(StatusCode::PERMANENT_REDIRECT, "the console is at /console/\n");
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/console/"));
        resp
    } else {
        let file = path
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| ASSETS.iter().find(|a| a.path == rest));
        match file {
            Some(asset) => with_headers(
                (StatusCode::OK, Body::from(asset.body)).into_response(),
                asset.content_type,
            ),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    if method == Method::HEAD {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response {
    with_headers((status, body).into_response(), "text/plain; charset=utf-8")
}

fn with_headers(mut resp: Response, content_type: &'static str) -> Response {
    let headers: &mut HeaderMap = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in SECURITY_HEADERS {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn call(method: &str, path: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
        let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        let resp = router::<()>().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, headers, body.to_vec())
    }

    fn assert_security_headers(headers: &HeaderMap, what: &str) {
        for (name, value) in SECURITY_HEADERS {
            assert_eq!(
                headers.get(name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{what}: {name}"
            );
        }
        assert!(headers.get(header::SET_COOKIE).is_none(), "{what}: a cookie");
        assert!(headers.get("access-control-allow-origin").is_none(), "{what}: CORS");
        assert!(headers.get(header::CONTENT_TYPE).is_some(), "{what}: content type");
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_and_the_security_headers() {
        for asset in &ASSETS {
            let path = format!("{PREFIX}/{}", asset.path);
            let (status, headers, body) = call("GET", &path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], asset.content_type, "{path}");
            assert_security_headers(&headers, &path);
            assert_eq!(body, asset.body, "{path}");
            assert!(!body.is_empty(), "{path}");
            let (status, headers, body) = call("HEAD", &path).await;
            assert_eq!(status, StatusCode::OK, "HEAD {path}");
            assert_security_headers(&headers, &path);
            assert!(body.is_empty(), "HEAD {path}");
        }
    }

    #[tokio::test]
    async fn other_answers_carry_the_security_headers_too() {
        let (status, headers, _) = call("GET", "/console").await;
        assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(headers[header::LOCATION], "/console/");
        assert_security_headers(&headers, "redirect");
        for path in [
            "/console/nope.js",
            "/console/console.js/x",
            "/console//console.js",
            "/console/../apitokens/v1/namespaces/default/apitokens",
            "/console/%2e%2e/index.html",
            "/console/index.html",
        ] {
            let (status, headers, body) = call("GET", path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_security_headers(&headers, path);
            assert_eq!(body, b"not found\n", "{path}");
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
            for path in ["/console", "/console/", "/console/console.js", "/console/x"] {
                let (status, headers, _) = call(method, path).await;
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert_eq!(headers[header::ALLOW], "GET, HEAD");
                assert_security_headers(&headers, path);
            }
        }
    }

    #[tokio::test]
    async fn paths_outside_the_prefix_are_not_the_consoles() {
        for path in [
            "/",
            "/consolex",
            "/apitokens/v1/namespaces/default/apitokens",
            "/healthz",
        ] {
            let (status, headers, _) = call("GET", path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(headers.get("content-security-policy").is_none(), "{path}");
        }
    }

    #[test]
    fn the_policy_allows_no_inline_code_and_no_other_origin() {
        let csp = SECURITY_HEADERS[0].1;
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
            "base-uri 'none'",
        ] {
            assert!(csp.split("; ").any(|d| d == directive), "{directive}");
        }
        for loose in ["unsafe-inline", "unsafe-eval", "data:", "*", "http:", "https:"] {
            assert!(!csp.contains(loose), "{loose}");
        }
    }

    /// The page itself keeps to the policy: no inline script, style or event
    /// handler attribute, and nothing loaded from another origin.
    #[test]
    fn the_page_has_no_inline_code_and_no_external_reference() {
        for asset in &ASSETS {
            let text = std::str::from_utf8(asset.body).unwrap().to_ascii_lowercase();
            for bad in ["http://", "https://", "//cdn", "javascript:"] {
                if asset.path == "icon.svg" && bad == "http://" {
                    // The SVG namespace URI is a name, not a load.
                    continue;
                }
                assert!(!text.contains(bad), "{}: {bad}", asset.path);
            }
        }
        let html = std::str::from_utf8(INDEX).unwrap().to_ascii_lowercase();
        assert!(!html.contains("<style"), "an inline style element");
        assert!(!html.contains(" style="), "an inline style attribute");
        let mut scripts = 0;
        for (i, _) in html.match_indices("<script") {
            let tag = html[i..].split('>').next().unwrap();
            assert!(tag.contains(" src="), "an inline script: {tag}");
            scripts += 1;
        }
        assert_eq!(scripts, 1);
        for word in html.split(|c: char| c.is_whitespace() || c == '<') {
            assert!(
                !(word.starts_with("on") && word.contains('=')),
                "an event handler attribute: {word}"
            );
        }
        let js = std::str::from_utf8(ASSETS[2].body).unwrap();
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "localStorage",
            "document.cookie",
        ] {
            assert!(!js.contains(bad), "console.js uses {bad}");
        }
    }
}
