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

/// glibc serves an allocation of `MMAP_THRESHOLD` bytes or more with a fresh `mmap` (the
/// default starts at 128 KiB) ...
const MMAP_THRESHOLD: i32 = 64 << 20;
/// ... and gives the top of its heap back to the kernel once this much of it is free.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Keeps freed large buffers in the process for the next step. Every step allocates and frees
/// several 13 MB buffers (messages, decoded tensors, libtorch's tensors); by default glibc
/// often maps them afresh and unmaps them on free, so the kernel zeroes and maps 3,200 pages per
/// buffer every step. With these two settings the transport benchmark's step took 19 % less
/// with one worker and 29 % less with four (README, Performance). A process keeps at most
/// `TRIM_THRESHOLD` of freed memory per arena. Other C libraries: nothing to do.
#[allow(unsafe_code)]
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes two settings of the allocator, under its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
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
