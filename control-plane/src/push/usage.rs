//! The usage-report service on the xDS server: each filter VM reports the
//! digests of the tokens it saw used (`apitokens_core::usage`), over the same
//! connection trust as ECDS (mutual TLS when configured), never through the
//! public listener. The token service turns them into last-use times.

use super::grpc::{refuse, Answer, Route};
use super::peers::Identities;
use super::BoxFuture;
use crate::tokens::Service;
use apitokens_core::usage::{METHOD, SERVICE};
use std::sync::Arc;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{Grpc, UnaryService};
use tonic::{Request, Response, Status};

/// `apitokens.v1.UsageReport`, as the filter encodes it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UsageReport {
    #[prost(bytes = "vec", tag = "1")]
    pub lineage: Vec<u8>,
    /// SHA-256 digests, 32 bytes each.
    #[prost(bytes = "vec", tag = "2")]
    pub digests: Vec<u8>,
    /// What each digest's requests did, one `Access` byte per digest.
    #[prost(bytes = "vec", tag = "3")]
    pub access: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UsageReply {}

#[derive(Clone)]
pub struct UsageServer {
    service: Arc<Service>,
    identities: Identities,
}

impl UsageServer {
    /// Reports are taken from the identities ECDS serves (`identities`).
    pub fn new(service: Arc<Service>, identities: Identities) -> Self {
        Self { service, identities }
    }
}

struct Report(Arc<Service>);

impl UnaryService<UsageReport> for Report {
    type Response = UsageReply;
    type Future = BoxFuture<Result<Response<UsageReply>, Status>>;

    fn call(&mut self, request: Request<UsageReport>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            let report = request.into_inner();
            service.record_use(&report.lineage, &report.digests, &report.access);
            Ok(Response::new(UsageReply {}))
        })
    }
}

impl Route for UsageServer {
    const SERVICE: &'static str = SERVICE;

    fn route(&mut self, method: Option<&str>, req: http::Request<Body>) -> Answer {
        if let Err(status) = self.identities.check(req.extensions()) {
            self.service.metrics.usage_refused.inc();
            return refuse(status);
        }
        if method != Some(METHOD) {
            return refuse(Status::unimplemented("no such method"));
        }
        let service = Arc::clone(&self.service);
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::<UsageReply, UsageReport>::default())
                // A report carries at most 16k digests (512 KiB).
                .apply_max_message_size_config(Some(1 << 20), Some(1 << 10));
            Ok(grpc.unary(Report(service), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apitokens_core::access::{Access, Kind};
    use apitokens_core::role::RoleSet;
    use apitokens_core::table::Digest;
    use prost::Message;

    #[test]
    fn the_filters_encoding_decodes() {
        let read = Access::admitted(Kind::Read, RoleSet::ALL);
        let uses = [(Digest::of(b"a"), Access::USED), (Digest::of(b"b"), read)];
        let bytes = apitokens_core::usage::report(b"0123456789abcdef", &uses);
        let report = UsageReport::decode(bytes.as_slice()).unwrap();
        assert_eq!(report.lineage, b"0123456789abcdef");
        assert_eq!(report.digests, [uses[0].0 .0, uses[1].0 .0].concat());
        assert_eq!(report.access, [Access::USED.bits(), read.bits()]);
    }

    #[test]
    fn the_grpc_service_names_the_cluster() {
        use envoy_types::pb::envoy::config::core::v3::{grpc_service, GrpcService};
        let service = GrpcService::decode(apitokens_core::usage::grpc_service("xds_cluster").as_slice()).unwrap();
        let Some(grpc_service::TargetSpecifier::EnvoyGrpc(envoy)) = service.target_specifier else {
            panic!("not envoy_grpc")
        };
        assert_eq!(envoy.cluster_name, "xds_cluster");
    }
}
