//! What both programs do at start and stop: set up logging (`--log-format text|json`, filtered by
//! `RUST_LOG`, default `info`, on stderr), keep large buffers for reuse, and turn SIGTERM or
//! ctrl-c into a cancellation.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// How log lines are written: text for people (the lecture's lines as they are), JSON (one
/// object per line) for log shippers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the process's log subscriber.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Keeps freed large buffers in the process for the next step. Every step allocates and frees
/// several 13 MB buffers (messages, decoded tensors, libtorch's tensors); by default glibc
/// often maps them afresh and unmaps them on free, so the kernel zeroes and maps 3,200 pages per
/// buffer every step. With the two settings below the transport benchmark's step took 16% less
/// with one null worker and 17% less with four (README, Performance). Other C libraries:
/// nothing to do.
#[allow(unsafe_code)]
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Allocations from this size on get an `mmap` of their own, unmapped on free (glibc's
        // default starts at 128 KiB and adapts). 32 MiB is the most older glibc accepts, and
        // over twice the seed convnet's 13.1 MB tensors.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // The free top of a heap goes back to the kernel once it is larger than this.
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // The trim setting alone would freeze the mmap threshold at its 128 KiB start, worse
        // than nothing: it is set only once the first one is taken.
        // SAFETY: mallopt only changes two settings of the allocator, under its own lock.
        let taken = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !taken {
            tracing::warn!(
                "glibc refused the allocator settings: large buffers are mapped afresh every step"
            );
        }
    }
}

/// Cancels `token` on SIGTERM or ctrl-c.
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received: stopping");
            token.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("signal received: stopping");
    token.cancel();
}
