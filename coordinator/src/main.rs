//! `coordinator`: parses flags, sets up logging, and runs the server or a subcommand.

use clap::Parser;
use common::process::LogFormat;
use coordinator::args::{Cli, Command};
use coordinator::driver::Outcome;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        None => cli.train.log_format,
        Some(Command::Train(args)) => args.log_format,
        Some(_) => LogFormat::Text,
    };
    common::process::init_logging(format);
    common::process::keep_large_buffers();
    let result = match cli.command {
        None => train(cli.train).await,
        Some(Command::Train(args)) => train(*args).await,
        Some(Command::Summary { model, pool }) => coordinator::toolkit::summary(model.spec(pool)),
        Some(Command::Shape {
            input,
            filter,
            filters,
            stride,
            padding,
        }) => coordinator::toolkit::shape(&input, &filter, filters, stride, &padding),
        Some(Command::Status(args)) => coordinator::status_client::status(args).await,
        Some(Command::Certs(args)) => coordinator::certs::certs(&args),
        Some(Command::Mnist(args)) => coordinator::data::load(&args).await.map(|m| {
            println!(
                "MNIST verified in {}: {} training, {} validation, {} test images",
                args.data_dir.display(),
                m.train.len(),
                m.validation.len(),
                m.test.len()
            )
        }),
        Some(Command::Checkpoints { checkpoint_url }) => {
            coordinator::toolkit::checkpoints(&checkpoint_url).await
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

async fn train(args: coordinator::args::TrainArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let shutdown = CancellationToken::new();
    // A signal checkpoints and stops (see `coordinator::run`).
    tokio::spawn(common::process::cancel_on_signal(shutdown.clone()));
    match coordinator::run(args, listener, shutdown).await? {
        Outcome::Finished { .. } | Outcome::Interrupted { .. } => Ok(()),
    }
}
