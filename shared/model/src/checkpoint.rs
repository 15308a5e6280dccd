//! Checkpoint access in the llava-hf layout, split by service seam.
//!
//! Each stage opens a [`CheckpointPart`]: a view that memory-maps only the safetensors files holding
//! that stage's tensors, resolves the naming variants found in the wild (Hub `vision_tower.vision_model.…`,
//! the prefix-less `vision_tower.…` that transformers 5 writes, `model.language_model.…`) and records
//! which tensors were actually read, so tests can prove that the encoder never touches decoder weights.

mod quantized;
mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::{read_json, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::quant::{QuantPlan, Quantization};

/// Which stage's tensors a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// `vision_tower.*`
    Vision,
    /// `multi_modal_projector.*`
    Projector,
    /// `language_model.*` (and a top-level `lm_head.*`)
    Decoder,
}

impl PartKind {
    pub fn name(self) -> &'static str {
        match self {
            PartKind::Vision => "vision_tower",
            PartKind::Projector => "multi_modal_projector",
            PartKind::Decoder => "language_model",
        }
    }

    /// (logical prefix the model code asks for, physical candidates, probe tensor that must exist
    /// under the candidate, whether the alias is required).
    /// GLM-4.1V (`glm4v`) keeps its vision tower and merger under `model.visual.`: the encoder
    /// reads the tower, the projector the merger.
    fn aliases(
        self,
        glm4v: bool,
    ) -> &'static [(&'static str, &'static [&'static str], &'static str, bool)] {
        match (self, glm4v) {
            (PartKind::Vision, true) => &[(
                "",
                &["model.visual.", "visual."],
                "patch_embed.proj.weight",
                true,
            )],
            (PartKind::Projector, true) => &[(
                "",
                &["model.visual.merger.", "visual.merger."],
                "proj.weight",
                true,
            )],
            (PartKind::Vision, false) => &[(
                "",
                &[
                    "vision_tower.vision_model.",
                    "vision_tower.",
                    "model.vision_tower.vision_model.",
                    "model.vision_tower.",
                ],
                "embeddings.patch_embedding.weight",
                true,
            )],
            (PartKind::Projector, false) => &[
                (
                    "",
                    &["multi_modal_projector.", "model.multi_modal_projector."],
                    "linear_1.weight",
                    true,
                ),
                // LLaVA-NeXT's row separator: the projector packs the tile grid.
                (
                    "image_newline",
                    &["image_newline", "model.image_newline"],
                    "",
                    false,
                ),
            ],
            (PartKind::Decoder, _) => &[
                (
                    "model.",
                    &[
                        "language_model.model.",
                        "model.language_model.",
                        "language_model.",
                    ],
                    "embed_tokens.weight",
                    true,
                ),
                (
                    "lm_head.",
                    &["language_model.lm_head.", "lm_head."],
                    "weight",
                    false,
                ),
            ],
        }
    }
}

/// A checkpoint directory: config plus the tensor → file map (no tensor data read yet).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    config: LlavaConfig,
    /// tensor name → file holding it
    weight_map: BTreeMap<String, PathBuf>,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and the safetensors index (or the single file's header).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ModelError::checkpoint(&dir, "not a directory"));
        }
        let config = LlavaConfig::from_file(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut weight_map = BTreeMap::new();
        if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::checkpoint(&index, "no weight_map object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::checkpoint(&index, format!("weight_map[{name}] is not a file name"))
                })?;
                // A shard may be absent: a stage's pod may hold only the shards of its own
                // tensors (the chart's per-stage download); `part` refuses a missing shard that
                // holds tensors it needs.
                weight_map.insert(name.clone(), dir.join(file));
            }
        } else if single.exists() {
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on nobody
            // truncating the checkpoint while it is served.
            let st = unsafe { MmapedSafetensors::multi(&[&single]) }
                .map_err(|e| ModelError::checkpoint(&single, e.to_string()))?;
            for (name, _) in st.tensors() {
                weight_map.insert(name, single.clone());
            }
        } else {
            return Err(ModelError::checkpoint(
                &dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        }
        Ok(Checkpoint {
            dir,
            config,
            weight_map,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// Every tensor name in the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// Maps only the files that hold `kind`'s tensors and returns a tracking view of them.
    pub fn part(&self, kind: PartKind, dtype: DType, device: &Device) -> Result<CheckpointPart> {
        check_compute_dtype(dtype, device)?;
        let mut aliases = Vec::new();
        for (logical, candidates, probe, required) in kind.aliases(self.config.glm4v.is_some()) {
            let found = candidates
                .iter()
                .find(|c| self.weight_map.contains_key(&format!("{c}{probe}")));
            match found {
                Some(c) => aliases.push((logical.to_string(), c.to_string())),
                None if *required => {
                    return Err(ModelError::checkpoint(
                        &self.dir,
                        format!(
                            "no {} tensors: expected one of {} (is this a llava-hf checkpoint?)",
                            kind.name(),
                            candidates
                                .iter()
                                .map(|c| format!("{c}{probe}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ))
                }
                None => {}
            }
        }
        let physical: Vec<&String> = aliases.iter().map(|(_, p)| p).collect();
        let mut files = BTreeSet::new();
        let mut total_bytes = 0u64;
        for (name, file) in &self.weight_map {
            if physical.iter().any(|p| name.starts_with(p.as_str())) {
                files.insert(file.clone());
            }
        }
        let files: Vec<PathBuf> = files.into_iter().collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::checkpoint(
                &self.dir,
                format!(
                    "shard {} (it holds {} tensors) is missing",
                    missing.file_name().unwrap_or_default().to_string_lossy(),
                    kind.name()
                ),
            ));
        }
        // SAFETY: see `open`.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::checkpoint(&self.dir, e.to_string()))?;
        for (name, view) in st.tensors() {
            if physical.iter().any(|p| name.starts_with(p.as_str())) {
                total_bytes += view.data().len() as u64;
            }
        }
        let backend = Arc::new(PartBackend {
            kind,
            st,
            aliases,
            state: Mutex::new(LoadState {
                loaded: BTreeMap::new(),
                bytes: 0,
                next_report: 1,
                started: Instant::now(),
            }),
            total_bytes,
        });
        let vb = VarBuilder::from_backend(
            Box::new(TrackedBackend(backend.clone())),
            dtype,
            device.clone(),
        );
        Ok(CheckpointPart { backend, vb, files })
    }
}

/// Refuses dtypes the device cannot compute in, at load time rather than on the first request.
pub fn check_compute_dtype(dtype: DType, device: &Device) -> Result<()> {
    match (dtype, device) {
        (DType::F32 | DType::F16, _) => Ok(()),
        (DType::BF16, Device::Cpu) => Err(ModelError::Unsupported(
            "bf16 compute on CPU (candle has no CPU bf16 matmul); use --dtype f32 or f16".into(),
        )),
        (DType::BF16, _) => Ok(()),
        (other, _) => Err(ModelError::Unsupported(format!(
            "compute dtype {other:?} (use f32, f16 or bf16)"
        ))),
    }
}

/// One stage's view of a checkpoint.
pub struct CheckpointPart {
    backend: Arc<PartBackend>,
    vb: VarBuilder<'static>,
    files: Vec<PathBuf>,
}

impl CheckpointPart {
    /// The variable builder the stage's `new(vb)` reads from (logical HF names, no stage prefix).
    pub fn vb(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// The stage's quantization under `mode`, reading quantized weights straight from this part.
    pub fn quant_plan(&self, mode: Quantization) -> QuantPlan {
        QuantPlan::streaming(mode, self.backend.clone())
    }

    /// Physical names of the tensors read so far.
    pub fn loaded_tensors(&self) -> Vec<String> {
        self.backend
            .state
            .lock()
            .expect("load state lock")
            .loaded
            .keys()
            .cloned()
            .collect()
    }

    /// The safetensors files this part memory-mapped.
    pub fn mapped_files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Bytes of this part's tensors in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.backend.total_bytes
    }

    /// Hex blake3 digest of every tensor this part has read (name, dtype, shape, and the digest
    /// of its bytes taken while it was read, in name order) plus `extra` (the stage's config and
    /// quantization): identifies the weights actually serving, so two checkpoints, or one
    /// checkpoint quantized two ways, never share cached features however they are labelled.
    pub fn fingerprint(&self, extra: &str) -> Result<String> {
        let s = self.backend.state.lock().expect("load state lock");
        let mut h = blake3::Hasher::new();
        for (name, digest) in &s.loaded {
            let view = self.backend.st.get(name)?;
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", view.dtype(), view.shape()).as_bytes());
            h.update(digest.as_bytes());
        }
        h.update(extra.as_bytes());
        Ok(h.finalize().to_hex().to_string())
    }

    /// Logs a one-line summary once the stage has read its tensors.
    pub fn finish(&self) {
        let s = self.backend.state.lock().expect("load state lock");
        tracing::info!(
            part = self.backend.kind.name(),
            tensors = s.loaded.len(),
            mib = s.bytes as f64 / (1 << 20) as f64,
            ms = s.started.elapsed().as_secs_f64() * 1e3,
            "loaded"
        );
    }
}

struct LoadState {
    /// Physical name → digest of its bytes.
    loaded: BTreeMap<String, blake3::Hash>,
    bytes: u64,
    next_report: u64,
    started: Instant,
}

struct PartBackend {
    kind: PartKind,
    st: MmapedSafetensors,
    aliases: Vec<(String, String)>,
    state: Mutex<LoadState>,
    total_bytes: u64,
}

/// Progress is reported in tenths for parts larger than this; small models load silently.
const PROGRESS_MIN_BYTES: u64 = 256 << 20;

impl PartBackend {
    fn resolve(&self, name: &str) -> Option<String> {
        self.aliases
            .iter()
            .filter(|(logical, _)| name.starts_with(logical.as_str()))
            .max_by_key(|(logical, _)| logical.len())
            .map(|(logical, physical)| format!("{physical}{}", &name[logical.len()..]))
    }

    fn physical(&self, name: &str) -> candle_core::Result<String> {
        self.resolve(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: format!("{}.{name}", self.kind.name()),
            }
            .bt()
        })
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let physical = self.physical(name)?;
        let view = self.st.get(&physical)?;
        let data = view.data();
        let (tensor, digest) = match stream::Dtype::of(view.dtype()) {
            Some(src) if dtype == DType::F32 && dev.is_cpu() => {
                let dims = view.shape().to_vec();
                let len = dims.iter().product();
                let mut digest = None;
                let t = crate::linear::aligned_tensor(
                    |dst| {
                        digest = Some(stream::stream_into(data, src, dst)?);
                        Ok(())
                    },
                    len,
                    &dims,
                )?;
                (t, digest.expect("filled"))
            }
            _ => (view.load(dev)?.to_dtype(dtype)?, blake3::hash(data)),
        };
        self.record(physical, data.len() as u64, digest);
        Ok(tensor)
    }

    /// Books a tensor as read (once per name) and reports progress in tenths of the part.
    fn record(&self, physical: String, bytes: u64, digest: blake3::Hash) {
        let mut s = self.state.lock().expect("load state lock");
        if s.loaded.insert(physical, digest).is_none() {
            s.bytes += bytes;
            if self.total_bytes >= PROGRESS_MIN_BYTES
                && s.bytes * 10 >= s.next_report * self.total_bytes
            {
                s.next_report = s.bytes * 10 / self.total_bytes + 1;
                tracing::info!(
                    target: crate::PROGRESS_TARGET,
                    part = self.kind.name(),
                    "loading {}: {:.0}% of {:.1} GiB",
                    self.kind.name(),
                    100.0 * s.bytes as f64 / self.total_bytes as f64,
                    self.total_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
    }
}

struct TrackedBackend(Arc<PartBackend>);

impl SimpleBackend for TrackedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.0.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {}.{name}", self.0.kind.name()),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .resolve(name)
            .is_some_and(|p| self.0.st.get(&p).is_ok())
    }
}
