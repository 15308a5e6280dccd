//! The vision encode of `bench realsize`: our vision tower and projector in process at each
//! precision vs transformers' (f32, `scripts/bench_vision.py`) on the same threads and the same
//! input size, interleaved. CLIP towers (LLaVA) only so far.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use vlm_model::{Checkpoint, DType, Device, Projector, Quantization, Tensor, VisionEncoder};

use super::super::driver::LineDriver;
use super::super::{cores, Spread};

#[derive(Serialize, Debug)]
pub struct VisionRow {
    pub precision: String,
    /// Image rows out of the projector.
    pub features: usize,
    pub ours_ms: Spread,
    /// transformers' f32 encode (the same for every precision of ours).
    pub transformers_ms: Option<Spread>,
    /// Ours over transformers' time: ≤ 1.0 is as fast or faster.
    pub ours_over_transformers: Option<f64>,
}

/// transformers' vision tower and projector in a long-lived Python process.
struct Theirs(LineDriver);

impl Theirs {
    fn start(python: &PathBuf, model: &Path) -> anyhow::Result<Self> {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_vision.py");
        let mut cmd = Command::new(python);
        cmd.arg(script).arg("--model").arg(model).args([
            "--threads",
            &cores().to_string(),
            "--serve",
        ]);
        let mut me = Theirs(LineDriver::start(cmd, "scripts/bench_vision.py")?);
        let ready = me.0.read()?;
        anyhow::ensure!(ready["ready"] == true, "bench_vision.py: {ready}");
        Ok(me)
    }

    fn encode_ms(&mut self) -> anyhow::Result<f64> {
        self.0.ask("encode")?["ms"].as_f64().context("no ms")
    }
}

/// Ours at every precision in `modes` and transformers' (with `python`), `rounds` interleaved.
pub fn run(
    ckpt: &Checkpoint,
    model: &Path,
    modes: &[Quantization],
    python: Option<&PathBuf>,
    rounds: usize,
) -> anyhow::Result<Result<Vec<VisionRow>, String>> {
    if ckpt.config().glm4v.is_some() {
        return Ok(Err(
            "not measured: only CLIP (LLaVA) towers are timed so far".into(),
        ));
    }
    let dev = Device::Cpu;
    let ours: Vec<(Quantization, VisionEncoder, Projector)> = modes
        .iter()
        .map(|&m| {
            Ok((
                m,
                VisionEncoder::load_quantized(ckpt, DType::F32, &dev, m)?,
                Projector::load_quantized(ckpt, DType::F32, &dev, m)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let size = ckpt.config().vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, size, size), &dev)?;
    let encode = |v: &VisionEncoder, p: &Projector| -> anyhow::Result<(f64, usize)> {
        let t = Instant::now();
        let rows = p.forward(&v.forward(&pixels)?.squeeze(0)?)?;
        Ok((t.elapsed().as_secs_f64() * 1e3, rows.dim(0)?))
    };
    let mut theirs = python.map(|py| Theirs::start(py, model)).transpose()?;
    // Warm-up.
    for (_, v, p) in &ours {
        encode(v, p)?;
    }
    let mut times: Vec<Vec<f64>> = vec![vec![]; ours.len()];
    let mut their_times = vec![];
    let mut features = 0;
    for r in 0..rounds {
        if r % 2 == 1 {
            if let Some(t) = theirs.as_mut() {
                their_times.push(t.encode_ms()?);
            }
        }
        for (i, (_, v, p)) in ours.iter().enumerate() {
            let (ms, n) = encode(v, p)?;
            times[i].push(ms);
            features = n;
        }
        if r % 2 == 0 {
            if let Some(t) = theirs.as_mut() {
                their_times.push(t.encode_ms()?);
            }
        }
    }
    let transformers_ms = if their_times.is_empty() {
        None
    } else {
        Some(Spread::of(&mut their_times)?)
    };
    let rows = ours
        .iter()
        .zip(times.iter_mut())
        .map(|((m, _, _), t)| {
            let ours_ms = Spread::of(t)?;
            Ok(VisionRow {
                precision: m.to_string(),
                features,
                ours_over_transformers: transformers_ms.as_ref().map(|x| ours_ms.p50 / x.p50),
                ours_ms,
                transformers_ms,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Ok(rows))
}
