//! The token domain: the one place that knows the rules of API tokens (names,
//! roles, expiry, secrets, quotas, read-your-writes) and the only writer of
//! the store. The REST API and the command line are thin adapters over
//! [`Service`].

pub mod audit;
mod caller;
mod error;
pub mod evidence;
pub mod inactivity;
pub mod leaks;
mod rate;
pub mod secret;
mod service;

pub use caller::{Actor, Caller, Lifetimes};
pub use error::Error;
pub use rate::{whole_seconds, Rate};
pub use service::{
    check_path, ConditionsPatch, Delivery, Issued, NewToken, Service, ServiceOptions, Updated, Wait, MAX_OVERLAP,
};
