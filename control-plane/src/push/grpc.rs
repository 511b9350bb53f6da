//! The frame of the hand-written gRPC services on the xDS port (ECDS, the
//! delta channel, usage reports): each says which service it is and how it
//! answers a request; [`Grpc`] makes it the tower service tonic's router
//! takes. Hand-written rather than generated, so that each stream's
//! responses can be written around a shared payload (`frames`) and each
//! request's peer identity is checked before anything is decoded.

use super::BoxFuture;
use std::convert::Infallible;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

/// The answer to one HTTP/2 request, as tonic's router awaits it.
pub(crate) type Answer = BoxFuture<Result<http::Response<Body>, Infallible>>;

/// One gRPC service: its full name, and how it answers a request for
/// `method` (the path's last segment; `None` when the path names another
/// service).
pub(crate) trait Route: Clone + Send + 'static {
    const SERVICE: &'static str;

    fn route(&mut self, method: Option<&str>, req: http::Request<Body>) -> Answer;
}

/// A [`Route`] as a tower service (`Server::builder().add_service(Grpc(..))`).
#[derive(Clone)]
pub struct Grpc<R>(pub R);

impl<R: Route> NamedService for Grpc<R> {
    const NAME: &'static str = R::SERVICE;
}

impl<R: Route> Service<http::Request<Body>> for Grpc<R> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Answer {
        let method = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(R::SERVICE))
            .and_then(|m| m.strip_prefix('/'))
            .map(str::to_owned);
        self.0.route(method.as_deref(), req)
    }
}

/// A refusal (or any status) as the answer to a request.
pub(crate) fn refuse(status: Status) -> Answer {
    Box::pin(async move { Ok(status.into_http()) })
}
