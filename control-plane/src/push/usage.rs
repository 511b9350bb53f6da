//! The usage-report service on the xDS server: each filter VM reports the
//! digests of the tokens it saw used (`apitokens_core::usage`), over the same
//! connection trust as ECDS (mutual TLS when configured), never through the
//! public listener. The token service turns them into last-use times.

use super::grpc::{refuse, Answer, Route};
use super::peers::Identities;
use super::BoxFuture;
use crate::tokens::Service;
use apitokens_core::table::Digest;
use apitokens_core::usage::{MAX_SEEN_PER_REPORT, METHOD, SERVICE};
use std::net::IpAddr;
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
    /// Where digests' first requests in the interval came from.
    #[prost(message, repeated, tag = "4")]
    pub seen: Vec<SeenFrom>,
}

/// `apitokens.v1.SeenFrom`: a digest and a client address (4 or 16 bytes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeenFrom {
    #[prost(bytes = "vec", tag = "1")]
    pub digest: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
}

impl SeenFrom {
    /// The digest and the address; `None` if either is not one.
    fn read(&self) -> Option<(Digest, IpAddr)> {
        let digest = Digest(self.digest.as_slice().try_into().ok()?);
        let address = match self.address.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(self.address.as_slice()).ok()?),
            16 => IpAddr::from(<[u8; 16]>::try_from(self.address.as_slice()).ok()?),
            _ => return None,
        };
        Some((digest, address))
    }
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
            // At most the filter's own bound (a forged report is no bigger
            // than the message limit anyway).
            let seen: Vec<(Digest, IpAddr)> = report
                .seen
                .iter()
                .take(MAX_SEEN_PER_REPORT)
                .filter_map(SeenFrom::read)
                .collect();
            service.record_seen(&report.lineage, &seen);
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
    use prost::Message;

    #[test]
    fn the_filters_encoding_decodes() {
        let read = Access::admitted(Kind::Read, RoleSet::ALL);
        let uses = [(Digest::of(b"a"), Access::USED), (Digest::of(b"b"), read)];
        let seen = [
            (Digest::of(b"a"), "10.0.0.7".parse().unwrap()),
            (Digest::of(b"b"), "2001:db8::7".parse().unwrap()),
            // A mapped address travels as its IPv4 address.
            (Digest::of(b"c"), "::ffff:192.0.2.1".parse().unwrap()),
        ];
        let bytes = apitokens_core::usage::report(b"0123456789abcdef", &uses, &seen);
        let report = UsageReport::decode(bytes.as_slice()).unwrap();
        assert_eq!(report.lineage, b"0123456789abcdef");
        assert_eq!(report.digests, [uses[0].0 .0, uses[1].0 .0].concat());
        assert_eq!(report.access, [Access::USED.bits(), read.bits()]);
        let read_back: Vec<_> = report.seen.iter().map(|s| s.read().unwrap()).collect();
        assert_eq!(read_back[..2], seen[..2]);
        assert_eq!(read_back[2], (Digest::of(b"c"), "192.0.2.1".parse().unwrap()));
        // Not an address: left out.
        let odd = SeenFrom {
            digest: vec![0; 32],
            address: vec![1, 2, 3],
        };
        assert_eq!(odd.read(), None);
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
