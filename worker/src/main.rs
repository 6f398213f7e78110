//! `worker`: parses flags, sets up logging, bounds its threads, and runs until the job ends.

use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = worker::Args::parse();
    common::process::init_logging(args.log_format);
    common::process::keep_large_buffers();
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
    runtime.spawn(common::process::cancel_on_signal(shutdown.clone()));
    match runtime.block_on(worker::run(args, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
