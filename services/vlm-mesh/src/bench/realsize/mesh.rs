//! One request through a whole mesh (`up --quantize MODE`, cache off): time to first token split
//! into the stages the gateway reports, inter-token latency, and each service's peak RSS.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use vlm_model::Quantization;

use super::super::cache::variant;
use super::super::{greedy_request, stream, BenchMesh};

#[derive(Serialize, Debug)]
pub struct MeshRun {
    pub quantize: String,
    pub prompt_tokens: u32,
    /// Prompt tokens the decoder's prefix cache served (the chat template's opening at most).
    pub cached_prompt_tokens: u32,
    /// At the client, from sending the request to the first token.
    pub ttft_ms: f64,
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub project_ms: f64,
    pub prefill_ms: f64,
    /// Mean time between tokens at the client.
    pub inter_token_ms: f64,
    /// VmHWM of every service after the request, MiB.
    pub peak_rss_mib: BTreeMap<String, f64>,
}

/// A warm-up request, then the measured one (the gateway's feature cache is off: both encode).
pub async fn run(
    model: &Path,
    image: &[u8],
    mode: Quantization,
    tokens: u32,
) -> anyhow::Result<MeshRun> {
    let base = image::load_from_memory(image)?.to_rgb8();
    let mesh = BenchMesh::start_quantized(model, vec!["--no-cache".into()], [mode; 3]).await?;
    // Two variants of the image (one pixel apart): the measured request's image rows are not in
    // the decoder's prefix cache from the warm-up.
    once(&mesh, &variant(&base, 1)?, 2).await?;
    let (ttft_ms, inter_token_ms, f) = once(&mesh, &variant(&base, 2)?, tokens).await?;
    let t = f.timings.context("no timings in the final message")?;
    let mut peak_rss_mib = BTreeMap::new();
    for s in &mesh.mesh.info.services {
        peak_rss_mib.insert(s.label(), super::super::mesh::status_mib(s.pid, "VmHWM")?);
    }
    Ok(MeshRun {
        quantize: mode.to_string(),
        prompt_tokens: f.usage.map_or(0, |u| u.prompt_tokens),
        cached_prompt_tokens: f.usage.map_or(0, |u| u.cached_prompt_tokens),
        ttft_ms,
        preprocess_ms: t.preprocess_ms,
        encode_ms: t.encode_ms,
        project_ms: t.project_ms,
        prefill_ms: t.prefill_ms,
        inter_token_ms,
        peak_rss_mib,
    })
}

async fn once(
    mesh: &BenchMesh,
    image: &[u8],
    tokens: u32,
) -> anyhow::Result<(f64, f64, vlm_proto::GenerateFinal)> {
    let mut req = greedy_request(image.to_vec(), String::new(), tokens);
    req.question = "What is shown in this image?".into();
    let mut client = mesh.gateway.clone();
    let s = stream(&mut client, req).await?;
    let n = s.ids.len();
    let itl = if n > 1 {
        (s.last_ms - s.first_ms) / (n - 1) as f64
    } else {
        0.0
    };
    Ok((s.first_ms, itl, s.fin.context("no final message")?))
}
