//! `coordinator`: parses flags, sets up logging, and runs the server or a subcommand.

use clap::Parser;
use coordinator::config::{Cli, Command};
use coordinator::driver::Outcome;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        None => train(cli.train).await,
        Some(Command::Train(args)) => train(*args).await,
        Some(Command::Summary { model, pool }) => coordinator::cli::summary(model.spec(pool)),
        Some(Command::Shape {
            input,
            filter,
            filters,
            stride,
            padding,
        }) => coordinator::cli::shape(&input, &filter, filters, stride, &padding),
        Some(Command::Status(args)) => coordinator::cli::status(args).await,
        Some(Command::Certs(args)) => coordinator::certs::certs(&args),
        Some(Command::Checkpoints { checkpoint_url }) => {
            coordinator::cli::checkpoints(&checkpoint_url).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn train(args: coordinator::config::TrainArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    match coordinator::run(args, listener, shutdown).await? {
        Outcome::Finished { .. } | Outcome::Interrupted { .. } => Ok(()),
    }
}

/// Cancels `token` on SIGTERM or ctrl-c.
async fn on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("signal received: checkpointing and stopping");
    token.cancel();
}
