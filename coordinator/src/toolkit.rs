//! The lecture's toolkit and the checkpoint listing, as one-shot subcommands: `summary` (a
//! model's layers), `shape` (one convolution layer's output and parameters) and `checkpoints`.

use crate::checkpoint::CheckpointStore;
use common::model::ModelSpec;
use common::shapes::{Conv, Padding, Volume};

/// `summary`: the model's layers like Keras' `model.summary()`.
pub fn summary(spec: ModelSpec) -> anyhow::Result<()> {
    print!("{}", summary_table(spec)?);
    Ok(())
}

/// The text `summary` prints.
pub fn summary_table(spec: ModelSpec) -> anyhow::Result<String> {
    use std::fmt::Write;
    let rows = spec.summary()?;
    let width = rows.iter().map(|r| r.layer.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    writeln!(out, "Model: {spec}")?;
    writeln!(
        out,
        "{:<width$}  {:>12}  {:>12}",
        "Layer", "Output", "Params"
    )?;
    writeln!(out, "{}", "-".repeat(width + 28))?;
    for r in &rows {
        writeln!(
            out,
            "{:<width$}  {:>12}  {:>12}",
            r.layer,
            r.output,
            group(r.params)
        )?;
    }
    writeln!(out, "{}", "-".repeat(width + 28))?;
    let total: usize = rows.iter().map(|r| r.params).sum();
    writeln!(out, "Total params: {}", group(total))?;
    Ok(out)
}

/// `shape`: the lecture's quiz for one convolution layer.
pub fn shape(
    input: &str,
    filter: &str,
    filters: usize,
    stride: usize,
    padding: &str,
) -> anyhow::Result<()> {
    let input: Volume = input.parse()?;
    let filter: Volume = filter.parse()?;
    let padding: Padding = padding.parse()?;
    let layer = Conv {
        input,
        filter: (filter.height, filter.width),
        filters,
        stride,
        padding,
    };
    let s = layer.shape()?;
    println!("output: {}", s.output);
    println!("parameters with sharing: {}", group(s.params_shared));
    println!("parameters without sharing: {}", group(s.params_unshared));
    Ok(())
}

/// The job folders (holding a `latest`) right under a local folder.
fn job_folders(url: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(url.strip_prefix("file://").unwrap_or(url));
    let mut jobs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("latest").is_file())
        .collect();
    jobs.sort();
    jobs
}

/// 3274634 -> "3,274,634".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `checkpoints`: lists the checkpoints at a URL with their metrics; at a local folder of job
/// folders (the default `./checkpoints`), each job's.
pub async fn checkpoints(url: &str) -> anyhow::Result<()> {
    let store = CheckpointStore::open(url)?;
    let names = store.names().await?;
    if names.is_empty() {
        let jobs = job_folders(url);
        if jobs.is_empty() {
            println!("no checkpoints at {url}");
        }
        for job in jobs {
            println!("{}:", job.display());
            Box::pin(checkpoints(&job.display().to_string())).await?;
        }
        return Ok(());
    }
    for name in names {
        match store.load(&name).await {
            Ok((m, _)) => {
                let size: u64 = m.blobs.values().map(|b| b.bytes).sum();
                println!(
                    "{name}  step {}  epoch {}  loss {}  validation {}  test {}  {} bytes  {}",
                    m.step,
                    m.epoch + 1,
                    m.metrics.loss.map_or("-".into(), |v| format!("{v:.4}")),
                    m.metrics
                        .validation_accuracy
                        .map_or("-".into(), |v| format!("{v:.4}")),
                    m.metrics
                        .test_accuracy
                        .map_or("-".into(), |v| format!("{v:.4}")),
                    size,
                    m.created
                );
            }
            // Blobs without a manifest are a write that never completed (or a deletion that
            // stopped half-way): not a checkpoint, and never what `latest` points to.
            Err(crate::checkpoint::CheckpointError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => println!("{name}  incomplete (no manifest), ignored"),
            Err(e) => println!("{name}  unreadable: {e}"),
        }
    }
    Ok(())
}
