//! `apitokens`: the control plane of the apitokens Envoy filter.

fn main() -> std::process::ExitCode {
    apitokens_control_plane::cli::main()
}
