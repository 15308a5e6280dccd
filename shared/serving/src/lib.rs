//! What the three model-serving stages share: turning [`ModelError`]s into gRPC statuses, running
//! model calls off the async runtime under a concurrency limit, and converting between wire tensors
//! and model tensors. Transport concerns (TLS, health, retries) live in `vlm-net`; model math in
//! `vlm-model`.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::Status;
use vlm_model::{Cancel, DType, Device, ModelError, Tensor};
use vlm_tensor::{F32Tensor, WireDType};

/// The gRPC status for a model error: the caller's mistakes are INVALID_ARGUMENT, size limits
/// RESOURCE_EXHAUSTED, everything else INTERNAL (and logged, since it is our fault).
/// A region of interest from the wire, checked (INVALID_ARGUMENT naming the box).
pub fn region_from_proto(r: &vlm_proto::Region) -> Result<vlm_model::Region, Status> {
    vlm_model::Region::new(r.x0, r.y0, r.x1, r.y1).map_err(model_status)
}

/// An image layout for the wire.
pub fn layout_to_proto(l: &vlm_model::ImageLayout) -> vlm_proto::ImageLayout {
    let (grid_rows, grid_cols) = l.grid.map_or((0, 0), |g| (g.rows, g.cols));
    let (token_rows, token_cols) = l.tokens.map_or((0, 0), |g| (g.rows, g.cols));
    vlm_proto::ImageLayout {
        height: l.height,
        width: l.width,
        grid_rows,
        grid_cols,
        token_rows,
        token_cols,
    }
}

/// Most token rows or columns one image may claim (GLM-4.1V's default pixel bound gives at most
/// a few hundred per side), and most tokens in all.
pub const MAX_TOKEN_SIDE: u32 = 4096;
pub const MAX_TOKEN_GRID: u64 = 1 << 20;

/// A token grid from the wire (`ImageLayout.token_*`, `ImageSlot.token_*`): 0 x 0 is none;
/// otherwise both sides 1..=4096 and at most 2^20 tokens (INVALID_ARGUMENT).
pub fn token_grid_from_proto(rows: u32, cols: u32) -> Result<Option<vlm_model::TileGrid>, Status> {
    match (rows, cols) {
        (0, 0) => Ok(None),
        (r, c)
            if (1..=MAX_TOKEN_SIDE).contains(&r)
                && (1..=MAX_TOKEN_SIDE).contains(&c)
                && r as u64 * c as u64 <= MAX_TOKEN_GRID =>
        {
            Ok(Some(vlm_model::TileGrid { rows: r, cols: c }))
        }
        (r, c) => Err(Status::invalid_argument(format!(
            "token grid {r}x{c} is not a grid (both sides 1..{MAX_TOKEN_SIDE}, at most \
             {MAX_TOKEN_GRID} tokens, or 0x0)"
        ))),
    }
}

/// An image layout from the wire; a grid needs both sides, and a size.
pub fn layout_from_proto(l: &vlm_proto::ImageLayout) -> Result<vlm_model::ImageLayout, Status> {
    let grid = match (l.grid_rows, l.grid_cols) {
        (0, 0) => None,
        (r, c) if r > 0 && c > 0 && r <= 64 && c <= 64 => {
            Some(vlm_model::TileGrid { rows: r, cols: c })
        }
        (r, c) => {
            return Err(Status::invalid_argument(format!(
                "image layout grid {r}x{c} is not a tile grid (both sides 1..64, or 0x0)"
            )))
        }
    };
    if l.height == 0 || l.width == 0 {
        return Err(Status::invalid_argument(format!(
            "image layout size {}x{} has no pixels",
            l.width, l.height
        )));
    }
    Ok(vlm_model::ImageLayout {
        height: l.height,
        width: l.width,
        grid,
        tokens: token_grid_from_proto(l.token_rows, l.token_cols)?,
    })
}

pub fn model_status(e: ModelError) -> Status {
    if matches!(e, ModelError::Cancelled) {
        Status::cancelled(e.to_string())
    } else if e.is_invalid_input() {
        Status::invalid_argument(e.to_string())
    } else if e.is_too_large() {
        Status::resource_exhausted(e.to_string())
    } else {
        tracing::error!(error = %e, "model failure");
        Status::internal(e.to_string())
    }
}

/// Runs a model call on the blocking pool while holding one of `permits`, so the async runtime keeps
/// serving health checks and streams while the CPU computes, and at most N calls compute at once.
///
/// `f` gets a [`Cancel`] token that is set when the returned future is dropped (the RPC was
/// cancelled: the client went away or the gateway retried elsewhere); it should check it between
/// steps so abandoned work stops, and its permit is freed, within one step.
pub async fn run_model<T, F>(permits: &Arc<Semaphore>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Cancel) -> Result<T, ModelError> + Send + 'static,
{
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Status::unavailable("the service is shutting down"))?;
    let cancel = Cancel::never();
    let _cancel_when_dropped = cancel.on_drop();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        cancel.check()?;
        f(&cancel)
    })
    .await
    .map_err(|e| Status::internal(format!("model task failed: {e}")))?
    .map_err(model_status)
}

/// The wire dtype matching a compute dtype (the default when a caller does not ask for one).
pub fn wire_dtype_for(dtype: DType) -> WireDType {
    match dtype {
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::BF16,
        _ => WireDType::F32,
    }
}

/// A received tensor as a model tensor on `device` (f32; stages convert to their compute dtype).
pub fn to_model_tensor(t: F32Tensor, device: &Device) -> Result<Tensor, Status> {
    let F32Tensor { shape, values } = t;
    Tensor::from_vec(values, shape, device).map_err(|e| Status::internal(e.to_string()))
}

/// Row-major f32 values and shape of a model tensor, for a chunker.
pub fn from_model_tensor(t: &Tensor) -> Result<(Vec<usize>, Vec<f32>), Status> {
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok((t.dims().to_vec(), values))
}

/// Converts wire sampling parameters into the model's, applying defaults and validating ranges, so
/// the gateway and the decoder reject the same requests with the same messages.
pub fn params_from_proto(
    p: Option<&vlm_proto::SamplingParams>,
    default_max_tokens: u32,
) -> Result<vlm_model::SamplingParams, Status> {
    let default = vlm_proto::SamplingParams::default();
    let p = p.unwrap_or(&default);
    let params = vlm_model::SamplingParams {
        max_tokens: p.max_tokens.unwrap_or(default_max_tokens),
        temperature: p.temperature,
        // proto3 zero value: unset means disabled.
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        top_k: p.top_k,
        seed: p.seed.unwrap_or_else(random_seed),
        stop: p.stop.clone(),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        logit_bias: {
            // Sorted, so that the parameters (and what they print) do not depend on the map's
            // order.
            let mut b: Vec<(u32, f32)> = p.logit_bias.iter().map(|(&t, &v)| (t, v)).collect();
            b.sort_by_key(|&(t, _)| t);
            b
        },
        format: p.format.as_ref().map(format_from_proto).transpose()?,
    };
    params.validate().map_err(model_status)?;
    Ok(params)
}

/// The wire form of resolved sampling parameters (every default filled in), e.g. for a caller
/// that must send the same parameters to another replica.
pub fn params_to_proto(p: &vlm_model::SamplingParams) -> vlm_proto::SamplingParams {
    vlm_proto::SamplingParams {
        max_tokens: Some(p.max_tokens),
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: Some(p.seed),
        stop: p.stop.clone(),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        logit_bias: p.logit_bias.iter().copied().collect(),
        format: p.format.as_ref().map(format_to_proto),
    }
}

/// The wire's output format as the model's; an empty one is refused naming the field.
pub fn format_from_proto(f: &vlm_proto::OutputFormat) -> Result<vlm_model::OutputFormat, Status> {
    use vlm_model::OutputFormat as M;
    use vlm_proto::output_format::Kind;
    match &f.kind {
        Some(Kind::JsonSchema(s)) => Ok(M::JsonSchema(s.clone())),
        Some(Kind::JsonObject(true)) => Ok(M::JsonObject),
        Some(Kind::JsonObject(false)) => Err(Status::invalid_argument(
            "format.json_object must be true when set",
        )),
        Some(Kind::Regex(s)) => Ok(M::Regex(s.clone())),
        Some(Kind::Lark(s)) => Ok(M::Lark(s.clone())),
        None => Err(Status::invalid_argument(
            "format is set but names no kind (json_schema, json_object, regex or lark)",
        )),
    }
}

pub fn format_to_proto(f: &vlm_model::OutputFormat) -> vlm_proto::OutputFormat {
    use vlm_model::OutputFormat as M;
    use vlm_proto::output_format::Kind;
    let kind = match f {
        M::JsonSchema(s) => Kind::JsonSchema(s.clone()),
        M::JsonObject => Kind::JsonObject(true),
        M::Regex(s) => Kind::Regex(s.clone()),
        M::Lark(s) => Kind::Lark(s.clone()),
    };
    vlm_proto::OutputFormat { kind: Some(kind) }
}

/// A seed for requests that did not bring one.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Per-layer statistics as wire rows for `component` ("vision" or "decoder"), each also recorded
/// as a `layer_stats` event on the current span (the stage span the layers ran in).
pub fn layer_stats_rows(
    component: &str,
    rows: &[vlm_model::LayerStats],
) -> Vec<vlm_proto::LayerStats> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::Span::current();
    rows.iter()
        .map(|r| {
            span.add_event(
                "layer_stats",
                vec![
                    opentelemetry::KeyValue::new("vlm.component", component.to_string()),
                    opentelemetry::KeyValue::new("vlm.layer", r.layer as i64),
                    opentelemetry::KeyValue::new("vlm.mean", r.mean),
                    opentelemetry::KeyValue::new("vlm.std", r.std),
                    opentelemetry::KeyValue::new("vlm.abs_max", r.abs_max),
                    opentelemetry::KeyValue::new("vlm.nan_count", r.nan_count as i64),
                    opentelemetry::KeyValue::new("vlm.inf_count", r.inf_count as i64),
                ],
            );
            vlm_proto::LayerStats {
                component: component.to_string(),
                layer: r.layer as u32,
                mean: r.mean,
                std: r.std,
                abs_max: r.abs_max,
                nan_count: r.nan_count,
                inf_count: r.inf_count,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The gateway gives up on a slow replica by dropping its call; the blocking work behind it
    /// must stop and give its permit back, not run to the end.
    #[tokio::test]
    async fn dropping_the_call_stops_the_blocking_work_and_frees_its_permit() {
        let permits = Arc::new(Semaphore::new(1));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        let call = run_model(&permits, move |cancel| {
            started_tx.send(()).unwrap();
            while !cancel.is_cancelled() {
                std::thread::yield_now();
            }
            stopped_tx.send(()).unwrap();
            cancel.check()
        });
        tokio::select! {
            _ = call => panic!("the call ended before it was dropped"),
            _ = started_rx => {}
        }
        // `call` was dropped by select!.
        stopped_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the blocking work saw the cancellation");
        let permit = tokio::time::timeout(Duration::from_secs(60), permits.acquire())
            .await
            .expect("the permit was given back");
        assert!(permit.is_ok());
    }

    #[test]
    fn a_cancelled_computation_is_cancelled_not_internal() {
        let s = model_status(ModelError::Cancelled);
        assert_eq!(s.code(), tonic::Code::Cancelled);
    }
}
