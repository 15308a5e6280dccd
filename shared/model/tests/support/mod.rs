//! Helpers every parity test binary shares.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// The repository's `models/` directory (fixtures and their references).
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// A fixture's references, as its generator wrote them: `reference/reference.safetensors` (the
/// tensors, by name) and `reference/reference.json` (the rest).
pub fn references(dir: &Path) -> (HashMap<String, Tensor>, serde_json::Value) {
    let refs = candle_core::safetensors::load(
        dir.join("reference/reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference/reference.json")).unwrap(),
    )
    .unwrap();
    (refs, meta)
}

/// Largest absolute element difference of two equally shaped tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// An i64 id tensor (as transformers writes them) as token ids.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}
