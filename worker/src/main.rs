//! `worker`: parses flags, sets up logging, bounds its threads, and runs until the job ends.

use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = worker::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // The tensor kernels run on rayon's global pool (flex) or libtorch's (tch): --threads
    // bounds both.
    if let Err(e) = common::engine::set_compute_threads(args.threads()) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(steps) = args.local_steps {
        return match worker::run_local(&args, steps) {
            Ok((rate, loss)) => {
                println!(
                    "local loop, {} on {}, {steps} steps: {rate:.1} images/s, final loss {loss:.4}",
                    args.backend, args.device
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(on_signal(shutdown.clone()));
    match runtime.block_on(worker::run(args, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            token.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    token.cancel();
}
