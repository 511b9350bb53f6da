//! Answers Envoy's ext_authz Check calls: OK (with `x-apitoken-name` set and
//! `authorization` removed) for a known bearer secret, 401 otherwise. The
//! same work the Lua and api_key_auth variants of the benchmark do.

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use tonic::{Request, Response, Status};

struct Authz {
    keys: HashMap<String, String>,
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let name = request
            .get_client_headers()
            .and_then(|h| h.get("authorization"))
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|secret| self.keys.get(secret));
        let mut response = CheckResponse::new();
        match name {
            Some(name) => {
                let mut ok = OkHttpResponseBuilder::new();
                ok.add_header("x-apitoken-name", name.as_str(), None, false);
                ok.remove_header("authorization");
                response.set_status(Status::ok("")).set_http_response(ok);
            }
            None => {
                let mut denied = DeniedHttpResponseBuilder::new();
                denied.set_http_status(HttpStatusCode::Unauthorized);
                response
                    .set_status(Status::unauthenticated("unknown token"))
                    .set_http_response(denied);
            }
        }
        Ok(Response::new(response))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().ok_or("usage: bench-extauthz ADDR KEYFILE")?.parse()?;
    let file = args.next().ok_or("usage: bench-extauthz ADDR KEYFILE")?;
    let keys = std::fs::read_to_string(file)?
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(s, n)| (s.to_owned(), n.to_owned())))
        .collect::<HashMap<_, _>>();
    eprintln!("bench-extauthz: {} keys, listening on {addr}", keys.len());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Authz { keys }))
            .serve(addr)
            .await
    })?;
    Ok(())
}
