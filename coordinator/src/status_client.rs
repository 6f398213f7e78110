//! `coordinator status`: the gRPC status client (one-shot text or JSON, `--watch`, `--plot`).

use crate::args::StatusArgs;
use crate::plot::plot_svg;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::status_client::StatusClient;
use proto::transport::{AuthChannel, ClientSecurity, Role};
use proto::{GetHistoryRequest, GetStatusRequest, StatusReply, WatchStatusRequest};
use std::io::IsTerminal;
use std::time::Duration;

async fn connect(args: &StatusArgs) -> anyhow::Result<StatusClient<AuthChannel>> {
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let security = ClientSecurity::new(&args.security.load(Role::Reader)?)?;
    let channel = security
        .endpoint(&args.coordinator)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "cannot reach the coordinator at {}",
                args.coordinator
            ))
        })?;
    Ok(StatusClient::new(security.authorize(channel)))
}

fn state_name(s: i32) -> &'static str {
    match proto::JobState::try_from(s) {
        Ok(proto::JobState::WaitingForWorkers) => "waiting for workers",
        Ok(proto::JobState::Running) => "running",
        Ok(proto::JobState::Checkpointing) => "checkpointing",
        Ok(proto::JobState::Finished) => "finished",
        Ok(proto::JobState::Failed) => "failed",
        _ => "unknown",
    }
}

/// The status as JSON for scripts.
pub fn status_json(r: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "state": state_name(r.state),
        "reason": r.reason,
        "model": r.model,
        "epoch": r.epoch,
        "step": r.step,
        "total_steps": r.total_steps,
        "examples_seen": r.examples_seen,
        "progress": r.progress,
        "eta_secs": r.eta_secs,
        "loss": r.last_loss,
        "validation_accuracy": r.last_validation_accuracy,
        "test_accuracy": r.test_accuracy,
        "learning_rate": r.learning_rate,
        "images_per_sec": r.images_per_sec,
        "live_workers": r.live_workers,
        "last_checkpoint": r.last_checkpoint,
        "checkpoint_error": r.checkpoint_error,
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "bad_inputs": r.bad_inputs,
        "warning": r.warning,
        "last_grad_norm": r.last_grad_norm,
        "refused_handshakes": r.refused_handshakes,
        "refused_calls": r.refused_calls,
        "workers": r.workers.iter().map(|w| serde_json::json!({
            "id": w.id, "name": w.name, "address": w.address, "backend": w.backend,
            "device": w.device, "threads": w.threads, "state": w.state,
            "last_heartbeat_secs_ago": w.last_heartbeat_secs_ago,
            "steps_done": w.steps_done, "mean_step_ms": w.mean_step_ms, "failures": w.failures,
            "bad_inputs": w.bad_inputs, "last_bad_input": w.last_bad_input,
            "shard_failures": w.shard_failures, "last_failure": w.last_failure,
        })).collect::<Vec<_>>(),
        "launcher": r.launcher,
        "pods": r.pods.iter().map(|p| serde_json::json!({
            "name": p.name, "slot": p.slot, "phase": p.phase, "restarts": p.restarts,
            "last_reason": p.last_reason,
        })).collect::<Vec<_>>(),
    })
}

/// A value that may not be measured yet ("-").
fn shown(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// The ETA, once a step's time is measured ("-" before).
fn eta(r: &StatusReply) -> String {
    r.eta_secs.map_or("-".to_string(), |t| format!("{t:.0}s"))
}

fn status_text(r: &StatusReply) -> String {
    let mut out = format!(
        "{}{} model {} | epoch {} step {}/{} ({:.1}%) | loss {} | validation {} | {:.0} images/s | ETA {} | {} live workers\n",
        state_name(r.state),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        },
        r.model,
        r.epoch,
        r.step,
        r.total_steps,
        r.progress * 100.0,
        shown(r.last_loss),
        shown(r.last_validation_accuracy),
        r.images_per_sec,
        eta(r),
        r.live_workers
    );
    if let Some(acc) = r.test_accuracy {
        out.push_str(&format!("test accuracy {acc:.4}\n"));
    }
    if !r.warning.is_empty() {
        out.push_str(&format!("warning: {}\n", r.warning));
    }
    if r.refused_handshakes + r.refused_calls > 0 {
        out.push_str(&format!(
            "refused: {} connections (TLS handshake), {} calls (unauthenticated)\n",
            r.refused_handshakes, r.refused_calls
        ));
    }
    for w in &r.workers {
        out.push_str(&format!(
            "  worker {} {} {} {}/{} x{} threads {} | heard {:.1}s ago | {} shards, {:.0} ms each | {} failures\n",
            w.id, w.name, w.address, w.backend, w.device, w.threads, w.state, w.last_heartbeat_secs_ago, w.steps_done, w.mean_step_ms, w.failures
        ));
        if w.bad_inputs > 0 {
            out.push_str(&format!(
                "    {} bad inputs, last: {}\n",
                w.bad_inputs, w.last_bad_input
            ));
        }
        if w.shard_failures > 0 {
            out.push_str(&format!(
                "    {} shards it could not compute, last: {}\n",
                w.shard_failures, w.last_failure
            ));
        }
    }
    for p in &r.pods {
        out.push_str(&format!(
            "  pod {} (slot {}) {} | {} restarts{}\n",
            p.name,
            p.slot,
            p.phase,
            p.restarts,
            if p.last_reason.is_empty() {
                String::new()
            } else {
                format!(" | last: {}", p.last_reason)
            }
        ));
    }
    out
}

/// `status`: one-shot, `--json`, `--watch` or `--plot FILE`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    if let Some(path) = &args.plot {
        let history = client.get_history(GetHistoryRequest {}).await?.into_inner();
        let svg = plot_svg(&history.points)?;
        std::fs::write(path, svg)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        println!("wrote {} ({} points)", path.display(), history.points.len());
        return Ok(());
    }
    if args.watch {
        let mut stream = client
            .watch_status(WatchStatusRequest {
                max_per_second: 4.0,
            })
            .await?
            .into_inner();
        // On a terminal a bar redraws in place; piped, one line per update.
        let piped = !std::io::stdout().is_terminal();
        let bar = if piped || args.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout())
        };
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] step {pos}/{len} | {msg}")?
                .progress_chars("#>-"),
        );
        while let Some(r) = stream.message().await? {
            if args.json {
                println!("{}", status_json(&r));
                continue;
            }
            let line = format!(
                "epoch {} | loss {} | validation {} | ETA {} | {} workers | {}",
                r.epoch,
                shown(r.last_loss),
                shown(r.last_validation_accuracy),
                eta(&r),
                r.live_workers,
                state_name(r.state)
            );
            bar.set_length(r.total_steps);
            bar.set_position(r.step);
            if piped {
                println!("step {}/{} | {line}", r.step, r.total_steps);
            } else {
                bar.set_message(line);
            }
        }
        bar.finish();
        return Ok(());
    }
    let r = client.get_status(GetStatusRequest {}).await?.into_inner();
    if args.json {
        println!("{}", status_json(&r));
    } else {
        print!("{}", status_text(&r));
    }
    Ok(())
}
