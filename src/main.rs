//! The `agentidp` binary: a thin shell over [`agentidp::cli`].

// mimalloc: every request allocates and frees many small blocks on whichever worker thread runs
// it; glibc's malloc spent a fifth of the request path's cycles doing so. mimalloc also gives
// argon2's 19 MiB buffers back to the kernel after a login burst, which glibc did only with a
// fixed mmap threshold.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before anything can open a TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    agentidp::cli::main()
}
