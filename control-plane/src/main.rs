//! `apitokens`: the control plane of the apitokens Envoy filter.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    apitokens_control_plane::cli::main()
}
