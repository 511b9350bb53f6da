//! The apitokens proxy-wasm filter: a thin adapter from the proxy-wasm ABI to
//! `apitokens_core`, which holds every decision.

#[cfg(target_family = "wasm")]
mod abi;
#[cfg(target_family = "wasm")]
mod delta;
#[cfg(target_family = "wasm")]
mod filter;
#[cfg(target_family = "wasm")]
mod floor;
pub mod pairs;
#[cfg(target_family = "wasm")]
mod usage;
