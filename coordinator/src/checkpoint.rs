//! Checkpoints in object storage (local directory, S3, GCS or Azure through `object_store`).
//!
//! A checkpoint is a folder `step-NNNNNNNNNN/` holding `model.safetensors` (PyTorch names and
//! layouts), `optimizer.safetensors` (the momentum buffers, same names) and `manifest.json`
//! (step, data position, config, metrics, input normalisation and the SHA-256 of each blob).
//! Writes go blobs first, then the manifest, then the small `latest` pointer, each a single
//! atomic put: a reader that follows `latest` never sees a torn checkpoint, and a checkpoint
//! whose blobs fail their checksum is refused in favour of the one before it.

use common::model::ModelSpec;
use common::sgd::Sgd;
use common::train::{TrainConfig, TrainState};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Errors of checkpoint storage.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("object store error at {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("checkpoint {name} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    #[error(
        "checkpoint {name} cannot be resumed by this job: {reason} (start with --fresh, or use the flags it was made with)"
    )]
    Incompatible { name: String, reason: String },
}

/// Input normalisation: `x = (pixel * scale - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputNorm {
    pub scale: f32,
    pub mean: f32,
    pub std: f32,
}

/// Metrics at the time of the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: Option<f64>,
    pub validation_accuracy: Option<f64>,
    pub test_accuracy: Option<f64>,
}

/// A blob's size and checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blob {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Steps applied; training resumes with step `step` (0-based).
    pub step: u64,
    /// Epoch (0-based) and batch position within it of the next step.
    pub epoch: u64,
    pub position_in_epoch: u64,
    /// The seed every random choice derives from (init, shuffles, dropout masks).
    pub seed: u64,
    pub model: String,
    pub config: TrainConfig,
    pub metrics: Metrics,
    pub input: InputNorm,
    pub blobs: BTreeMap<String, Blob>,
    pub created: String,
}

/// Where checkpoints live.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

const MODEL_BLOB: &str = "model.safetensors";
const OPTIMIZER_BLOB: &str = "optimizer.safetensors";
const MANIFEST: &str = "manifest.json";
const LATEST: &str = "latest";
/// Written when a job failed for good under a launcher whose Job would re-create the
/// coordinator; see [`CheckpointStore::mark_failed`].
const FAILED: &str = "FAILED";

impl CheckpointStore {
    /// Opens `url`: a plain path or `file://` (created if missing), `s3://bucket/prefix`
    /// (credentials and endpoint from the `AWS_*` variables; `AWS_ALLOW_HTTP=true` for a
    /// plain-http local server), `gs://bucket/prefix`, `az://container/prefix`.
    pub fn open(url: &str) -> Result<Self, CheckpointError> {
        let bad = |reason: String| CheckpointError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).ok().filter(|u| u.scheme().len() > 1);
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed {
            Some(u) if matches!(u.scheme(), "s3" | "gs" | "az" | "abfs" | "abfss") => {
                let store: Arc<dyn ObjectStore> = match u.scheme() {
                    "s3" => Arc::new(
                        object_store::aws::AmazonS3Builder::from_env()
                            .with_url(url)
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    "gs" => Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env()
                            .with_url(url)
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    _ => Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env()
                            .with_url(url)
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                };
                let prefix = Path::from(u.path().trim_matches('/'));
                (store, prefix)
            }
            Some(u) if u.scheme() == "file" => {
                let dir = u
                    .to_file_path()
                    .map_err(|_| bad("not a local path".into()))?;
                (local(&dir).map_err(bad)?, Path::default())
            }
            Some(u) => return Err(bad(format!("unsupported scheme {}", u.scheme()))),
            None => (
                local(std::path::Path::new(url)).map_err(bad)?,
                Path::default(),
            ),
        };
        Ok(CheckpointStore {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/') {
            p = p.child(part);
        }
        p
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), CheckpointError> {
        let path = self.path(rel);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| CheckpointError::Store {
                path: path.to_string(),
                source,
            })
    }

    async fn get(&self, rel: &str) -> Result<Vec<u8>, CheckpointError> {
        let path = self.path(rel);
        let store_err = |source| CheckpointError::Store {
            path: path.to_string(),
            source,
        };
        let res = self.store.get(&path).await.map_err(store_err)?;
        Ok(res.bytes().await.map_err(store_err)?.to_vec())
    }

    /// Writes a checkpoint of `state` and points `latest` at it; returns its name.
    pub async fn save(
        &self,
        cfg: &TrainConfig,
        state: &TrainState,
        metrics: Metrics,
        keep_last: usize,
    ) -> Result<String, CheckpointError> {
        let name = checkpoint_name(state.step);
        let model = tensors_blob(cfg.model, &state.params)?;
        let optimizer = tensors_blob(cfg.model, &state.sgd.velocity)?;
        let schedule = cfg.schedule(common::mnist::TRAIN);
        let (epoch, position) = schedule.locate(state.step);
        let blob = |b: &[u8]| Blob {
            bytes: b.len() as u64,
            sha256: hex::encode(Sha256::digest(b)),
        };
        let manifest = Manifest {
            format: 1,
            step: state.step,
            epoch,
            position_in_epoch: position,
            seed: cfg.seed,
            model: cfg.model.kind.to_string(),
            config: cfg.clone(),
            metrics,
            input: InputNorm {
                scale: common::mnist::INPUT_SCALE,
                mean: common::mnist::INPUT_MEAN,
                std: common::mnist::INPUT_STD,
            },
            blobs: BTreeMap::from([
                (MODEL_BLOB.to_string(), blob(&model)),
                (OPTIMIZER_BLOB.to_string(), blob(&optimizer)),
            ]),
            created: chrono::Utc::now().to_rfc3339(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Corrupt {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        self.put(&format!("{name}/{MODEL_BLOB}"), model).await?;
        self.put(&format!("{name}/{OPTIMIZER_BLOB}"), optimizer)
            .await?;
        self.put(&format!("{name}/{MANIFEST}"), json).await?;
        self.put(LATEST, name.clone().into_bytes()).await?;
        if let Err(e) = self.prune(keep_last).await {
            warn!(error = %e, "could not delete old checkpoints");
        }
        Ok(name)
    }

    /// Records why the job failed for good (a worker pod that cannot start, a diverged loss), so
    /// that a re-created coordinator (a Kubernetes Job's retry) stops at once instead of
    /// launching the same failing pods again. `--fresh` starts over and clears it.
    pub async fn mark_failed(&self, why: &str) -> Result<(), CheckpointError> {
        self.put(FAILED, why.as_bytes().to_vec()).await
    }

    /// Why the job failed for good, when [`CheckpointStore::mark_failed`] said so.
    pub async fn failed(&self) -> Result<Option<String>, CheckpointError> {
        match self.get(FAILED).await {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Err(CheckpointError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets a failure (`--fresh`).
    pub async fn clear_failed(&self) -> Result<(), CheckpointError> {
        match self.store.delete(&self.path(FAILED)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(CheckpointError::Store {
                path: FAILED.into(),
                source,
            }),
        }
    }

    /// Names of the checkpoints with a manifest, oldest first.
    pub async fn names(&self) -> Result<Vec<String>, CheckpointError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|source| CheckpointError::Store {
                path: self.prefix.to_string(),
                source,
            })?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn prune(&self, keep_last: usize) -> Result<(), CheckpointError> {
        let names = self.names().await?;
        let excess = names.len().saturating_sub(keep_last);
        for name in &names[..excess] {
            let prefix = self.path(name);
            let objects: Vec<_> =
                self.store
                    .list(Some(&prefix))
                    .try_collect()
                    .await
                    .map_err(|source| CheckpointError::Store {
                        path: prefix.to_string(),
                        source,
                    })?;
            // The manifest goes first: a deletion cut short leaves an incomplete folder, never a
            // manifest whose blobs are gone.
            let mut objects = objects;
            objects.sort_by_key(|o| o.location.filename() != Some(MANIFEST));
            for o in objects {
                let _ = self.store.delete(&o.location).await;
            }
        }
        Ok(())
    }

    /// Reads and verifies one checkpoint.
    pub async fn load(&self, name: &str) -> Result<(Manifest, TrainState), CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            name: name.to_string(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(&self.get(&format!("{name}/{MANIFEST}")).await?)
                .map_err(|e| corrupt(format!("manifest: {e}")))?;
        let mut blobs = BTreeMap::new();
        for (blob, want) in &manifest.blobs {
            let bytes = self.get(&format!("{name}/{blob}")).await?;
            let actual = hex::encode(Sha256::digest(&bytes));
            if actual != want.sha256 {
                return Err(corrupt(format!(
                    "{blob} has SHA-256 {actual}, the manifest says {}",
                    want.sha256
                )));
            }
            blobs.insert(blob.clone(), bytes);
        }
        let read = |blob: &str| {
            let bytes = blobs
                .get(blob)
                .ok_or_else(|| corrupt(format!("{blob} missing")))?;
            read_tensors(manifest.config.model, bytes).map_err(corrupt)
        };
        let params = read(MODEL_BLOB)?;
        let velocity = read(OPTIMIZER_BLOB)?;
        let cfg = &manifest.config;
        let state = TrainState {
            step: manifest.step,
            params,
            sgd: Sgd {
                momentum: cfg.momentum,
                velocity,
            },
        };
        Ok((manifest, state))
    }

    /// The newest checkpoint that verifies, following `latest` first and falling back to older
    /// ones (with a warning) when it is corrupt or unreadable.
    pub async fn load_latest(
        &self,
    ) -> Result<Option<(String, Manifest, TrainState)>, CheckpointError> {
        let latest = match self.get(LATEST).await {
            Ok(b) => Some(String::from_utf8_lossy(&b).trim().to_string()),
            Err(CheckpointError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        let mut candidates = self.names().await?;
        candidates.reverse();
        if let Some(l) = latest {
            candidates.retain(|n| *n <= l);
            if !candidates.contains(&l) {
                candidates.insert(0, l);
            }
        }
        for name in candidates {
            match self.load(&name).await {
                Ok((m, s)) => return Ok(Some((name, m, s))),
                Err(e) => {
                    warn!(checkpoint = name, error = %e, "refusing checkpoint; trying the one before")
                }
            }
        }
        Ok(None)
    }
}

impl Manifest {
    /// Refuses a checkpoint this job cannot continue: another model, or different settings
    /// that would change the result. Epochs and max steps may differ (extend or shorten a run).
    pub fn check_compatible(&self, name: &str, cfg: &TrainConfig) -> Result<(), CheckpointError> {
        // How long to train, the learning rate and clipping may change on resume (the remedy
        // for a diverged job: resume from the last good checkpoint with a lower --lr).
        let reason = if self.config.model != cfg.model {
            Some(format!(
                "it holds model {}, this job trains {}",
                self.config.model, cfg.model
            ))
        } else if self.config.identity() != cfg.identity() {
            Some(format!(
                "it was made with {:?}, this job has {:?}",
                self.config, cfg
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => Err(CheckpointError::Incompatible {
                name: name.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// The one retry policy of checkpoint writes and reads on remote stores: each request is
/// retried with exponential backoff (250 ms doubling to 5 s) for up to 15 s, which rides out a
/// store restarting; the driver does not retry on top of it (a checkpoint that still fails is
/// reported in status, and the next one tries again).
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 8,
        retry_timeout: Duration::from_secs(15),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
    }
}

fn local(dir: &std::path::Path) -> Result<Arc<dyn ObjectStore>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    object_store::local::LocalFileSystem::new_with_prefix(dir)
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| e.to_string())
}

/// The flat vector as safetensors, one tensor per parameter with PyTorch's name and layout.
fn tensors_blob(model: ModelSpec, flat: &[f32]) -> Result<Vec<u8>, CheckpointError> {
    let specs = model.params();
    let pieces =
        common::model::split_flat(&specs, flat).ok_or_else(|| CheckpointError::Corrupt {
            name: "(new)".into(),
            reason: format!(
                "{} values for a model of {} parameters",
                flat.len(),
                model.param_count()
            ),
        })?;
    let mut owned = Vec::with_capacity(specs.len());
    for (p, head) in specs.iter().zip(pieces) {
        owned.push((
            p.name.clone(),
            p.shape.clone(),
            common::codec::encode_f32(&p.convert_layout(head, true)),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| CheckpointError::Corrupt {
            name: "(new)".into(),
            reason: e.to_string(),
        })?;
    safetensors::serialize(views, None).map_err(|e| CheckpointError::Corrupt {
        name: "(new)".into(),
        reason: e.to_string(),
    })
}

/// Reads a safetensors blob back into the flat vector, checking every name, shape and dtype.
pub fn read_tensors(model: ModelSpec, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut flat = Vec::with_capacity(model.param_count());
    for p in model.params() {
        let t = st.tensor(&p.name).map_err(|e| format!("{}: {e}", p.name))?;
        if t.dtype() != Dtype::F32 || t.shape() != p.shape.as_slice() {
            return Err(format!(
                "{} is {:?} {:?}, expected F32 {:?}",
                p.name,
                t.dtype(),
                t.shape(),
                p.shape
            ));
        }
        let values = common::codec::decode_f32(t.data(), p.len()).map_err(|e| e.to_string())?;
        flat.extend(p.convert_layout(&values, false));
    }
    Ok(flat)
}
