//! The `agentidp` binary: a thin shell over [`agentidp::cli`].

fn main() -> std::process::ExitCode {
    // Before anything can open a TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    agentidp::cli::main()
}
