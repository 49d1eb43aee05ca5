//! The `agentidp` binary: a thin shell over [`agentidp::cli`].

fn main() -> std::process::ExitCode {
    // glibc raises its mmap threshold every time a large block is freed, after which argon2's
    // 19 MiB buffers stay in per-thread heaps for good (measured: 2.6 GiB resident after a login
    // burst). A fixed threshold sends them back to the kernel when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator and is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    // Before anything can open a TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    agentidp::cli::main()
}
