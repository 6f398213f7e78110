//! Finding MNIST: the directory given, or a download from a public mirror into it. Every file
//! is checked against its SHA-256 whichever way it arrived.

use crate::args::MnistArgs;
use common::mnist::{self, FILES, Mnist};
use std::path::Path;
use tracing::info;

/// Loads MNIST from `--data-dir`, first downloading missing files from `--mnist-mirror` when
/// `--download` is set.
pub async fn load(args: &MnistArgs) -> anyhow::Result<Mnist> {
    if args.download {
        fetch_missing(&args.data_dir, &args.mnist_mirror).await?;
    }
    let dir = args.data_dir.clone();
    Ok(tokio::task::spawn_blocking(move || mnist::load(&dir)).await??)
}

async fn fetch_missing(dir: &Path, mirror: &str) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(300))
        .build()?;
    for (name, sha) in FILES {
        if mnist::locate(dir, name).is_some() {
            continue;
        }
        let url = format!("{}/{name}.gz", mirror.trim_end_matches('/'));
        info!(%url, "downloading");
        let body = client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| anyhow::anyhow!("cannot download {url}: {e}"))?
            .bytes()
            .await?;
        // Verified under a name `locate` ignores, so a bad download never looks present.
        let tmp = dir.join(format!("{name}.download.gz"));
        tokio::fs::write(&tmp, &body).await?;
        let check = tmp.clone();
        let verified =
            tokio::task::spawn_blocking(move || mnist::read_verified(&check, sha)).await?;
        if let Err(e) = verified {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(
                anyhow::Error::from(e).context(format!("download of {url} failed its checksum"))
            );
        }
        tokio::fs::rename(&tmp, dir.join(format!("{name}.gz"))).await?;
    }
    Ok(())
}
