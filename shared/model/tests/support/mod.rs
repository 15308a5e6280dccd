//! Helpers every parity test binary shares.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// The repository's `models/` directory (fixtures and their references).
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
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
