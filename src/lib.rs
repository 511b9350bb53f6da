//! The apitokens proxy-wasm filter: a thin adapter from the proxy-wasm ABI to
//! `apitokens_core`, which holds every decision.
//!
//! The only unsafe code of the project is here, at the host boundary
//! (`abi`, the proxy-wasm imports and the buffers the host hands over): each
//! `unsafe` says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]

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
