//! One tiled (LLaVA-NeXT) image's way to the decoder. The encoder's `Plan` has cut it into views
//! (base view + tiles) and digested each view's pixels; every view is a cacheable unit keyed by
//! its digest, position and grid, so an image that changed in one corner costs the encoder only
//! the tiles that changed. The missing views are encoded in one call, the views are stacked in
//! order and the projector projects and packs them (`image_newline`, unpad) into the image's
//! rows.
//!
//! Unlike the single-view relay ([`crate::images`]), a view set is buffered whole between the
//! stages: the encoder answers after all views ran and the projector packs after the last one
//! arrived, so streaming within the image would save nothing. Each call is bounded by its stage's
//! adaptive timeout for the work it carries (views, row blocks) and retried on another replica
//! when it fails or is too slow, as for every stage call.

use std::sync::Arc;

use tonic::Status;
use vlm_cache::{feature_key, Fill, Outcome};
use vlm_net::{fingerprint_of, with_deadline};
use vlm_proto::encode_response::Kind as EncodeKind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::projector_client::ProjectorClient;
use vlm_proto::{
    CacheStatus, EncodeOptions, EncodeRequest, EncodeStats, ImageLayout, ImagePlan, TensorChunk,
};
use vlm_tensor::{TensorLimits, TensorValue, TensorValueBuilder, DEFAULT_CHUNK_BYTES};

use crate::identity::encoder_info;
use crate::images::{ChunkTx, ImageJob, ImageTimings};
use crate::stage::Failure;
use crate::Stages;

/// Asks an encoder how it cuts the image (or region) of `job` into views; with `layout_only`,
/// only its layout and row counts, read from the image's header (no view digests).
pub(crate) async fn plan(
    stages: &Stages,
    job: &ImageJob,
    layout_only: bool,
) -> Result<ImagePlan, Status> {
    let deadline = job.deadline;
    let req = EncodeRequest {
        image: job.image.clone(),
        options: None,
        region: job.region,
        views: vec![],
        layout_only,
    };
    stages
        .encoder
        .call(deadline)
        .unary(|lease| {
            let mut client = EncoderClient::new(lease.channel());
            let req = req.clone();
            async move {
                Ok(client
                    .plan(with_deadline(req, deadline))
                    .await?
                    .into_inner())
            }
        })
        .await
}

/// Runs one planned image through the per-view cache, the encoder and the projector; its packed
/// rows go to `out`.
pub(crate) async fn view_pipeline(
    stages: Arc<Stages>,
    job: ImageJob,
    plan: ImagePlan,
    out: ChunkTx,
) -> Result<ImageTimings, Status> {
    let layout = plan.layout.unwrap_or_default();
    let n = plan.view_digests.len();
    let mut timings = ImageTimings {
        cache: CacheStatus::Off,
        preprocess_ms: plan.preprocess_ms,
        views: n as u32,
        grid: (layout.grid_rows, layout.grid_cols),
        ..Default::default()
    };
    let Cached {
        mut parts,
        mut fills,
        fingerprint,
    } = lookup_views(&stages, &job, &plan, &layout, &mut timings).await?;
    let missing: Vec<u32> = (0..n as u32)
        .filter(|&i| parts[i as usize].is_none())
        .collect();
    if !missing.is_empty() {
        let (encoded, stats, fp) = encode_views(&stages, &job, &missing).await?;
        let encoded = encoded.unstack().map_err(internal)?;
        if encoded.len() != missing.len() {
            return Err(Status::internal(format!(
                "encoder: {} views asked for, {} returned",
                missing.len(),
                encoded.len()
            )));
        }
        for (&i, value) in missing.iter().zip(encoded) {
            // Stored only under the key of the weights that produced the features.
            if let Some(mut fill) = fills[i as usize].take() {
                if fp.is_some() && fp == fingerprint {
                    for c in value.chunks(DEFAULT_CHUNK_BYTES) {
                        fill.push(&c);
                    }
                    fill.finish();
                }
            }
            parts[i as usize] = Some(value);
        }
        timings.encode_ms = stats.encode_ms;
        timings.encoded_views = missing;
        timings.preprocess_ms += stats.preprocess_ms;
        timings.layers = stats.layers;
    }
    let parts: Vec<TensorValue> = parts.into_iter().flatten().collect();
    let features = TensorValue::stack(&parts)
        .map_err(internal)?
        .with_layout(Some(layout));
    let started = std::time::Instant::now();
    project(&stages, &job, &features, &out).await?;
    timings.project_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(timings)
}

/// What the cache holds of an image's views.
struct Cached {
    /// Per view: its features, on a hit.
    parts: Vec<Option<TensorValue>>,
    /// Per view: the fill this request owes the cache, on a miss it leads.
    fills: Vec<Option<Fill>>,
    /// The encoder weights the keys were made for (`None`: no cache).
    fingerprint: Option<String>,
}

/// Looks every view up, keyed by what an encoder replica serves right now.
async fn lookup_views(
    stages: &Stages,
    job: &ImageJob,
    plan: &ImagePlan,
    layout: &ImageLayout,
    timings: &mut ImageTimings,
) -> Result<Cached, Status> {
    let n = plan.view_digests.len();
    let mut parts: Vec<Option<TensorValue>> = vec![None; n];
    let mut fills: Vec<Option<Fill>> = (0..n).map(|_| None).collect();
    let Some(cache) = &stages.cache else {
        return Ok(Cached {
            parts,
            fills,
            fingerprint: None,
        });
    };
    let info = encoder_info(stages, job.deadline).await?;
    stages
        .identity
        .observe("encoder", Some(&info.model_fingerprint));
    let t = std::time::Instant::now();
    let (mut hits, mut errors) = (0, 0);
    for (i, digest) in plan.view_digests.iter().enumerate() {
        let key = feature_key(
            digest,
            &info.model_fingerprint,
            &info.preprocessing,
            &view_options(layout, i, job, stages.wire_dtype),
        );
        let found = cache.lookup(&key).await;
        // Every entry carries the layout it was encoded under; one that names another (which
        // its key already rules out) is not used.
        let features = found
            .features
            .filter(|v| v.meta().layout() == Some(*layout));
        match (found.outcome, &features) {
            (Outcome::Hit, Some(_)) => hits += 1,
            (Outcome::Error, _) => errors += 1,
            _ => {}
        }
        parts[i] = features;
        fills[i] = found.fill;
    }
    timings.cache_ms = t.elapsed().as_secs_f64() * 1e3;
    timings.cache = if errors > 0 {
        CacheStatus::Error
    } else if hits == n {
        CacheStatus::Hit
    } else {
        CacheStatus::Miss
    };
    Ok(Cached {
        parts,
        fills,
        fingerprint: Some(info.model_fingerprint),
    })
}

/// What besides the view's pixels makes its features: where it sits in which grid, the region it
/// was cut from, and the wire dtype the value is stored in.
fn view_options(layout: &ImageLayout, view: usize, job: &ImageJob, wire: i32) -> String {
    let region = job.region.map_or_else(String::new, |r| {
        format!("{},{},{},{}", r.x0, r.y0, r.x1, r.y1)
    });
    format!(
        "view={view};grid={}x{};region={region};wire={wire}",
        layout.grid_rows, layout.grid_cols
    )
}

fn internal(e: vlm_tensor::TensorError) -> Status {
    Status::internal(format!("gateway: view features: {e}"))
}

/// Encodes the `views` of the image in one call (retried on other replicas).
async fn encode_views(
    stages: &Stages,
    job: &ImageJob,
    views: &[u32],
) -> Result<(TensorValue, EncodeStats, Option<String>), Status> {
    let deadline = job.deadline;
    let req = EncodeRequest {
        image: job.image.clone(),
        options: Some(EncodeOptions {
            wire_dtype: stages.wire_dtype,
            chunk_bytes: 0,
            monitor_layers: job.monitor_layers,
        }),
        region: job.region,
        views: views.to_vec(),
        layout_only: false,
    };
    // The encoder's adaptive timeout is per image; each view is one tower input.
    let (lease, answer) = stages
        .encoder
        .call(deadline)
        .open_timed(views.len() as f64, |lease| {
            let mut client = EncoderClient::new(lease.channel());
            let req = req.clone();
            async move {
                let response = client.encode(with_deadline(req, deadline)).await?;
                let fp = fingerprint_of(response.metadata()).map(str::to_owned);
                let mut stream = response.into_inner();
                let mut builder = TensorValueBuilder::new(TensorLimits::default());
                let mut stats = EncodeStats::default();
                while let Some(msg) = stream.message().await? {
                    match msg.kind {
                        Some(EncodeKind::Chunk(c)) => {
                            builder.push(&c)?;
                        }
                        Some(EncodeKind::Stats(s)) => stats = s,
                        None => return Err(Status::internal("encoder sent an empty message")),
                    }
                }
                Ok((builder.finish()?, stats, fp))
            }
        })
        .await?;
    lease.success();
    stages.identity.observe("encoder", answer.2.as_deref());
    Ok(answer)
}

/// Projects and packs the stacked views (retried on other replicas) and relays the packed rows.
async fn project(
    stages: &Stages,
    job: &ImageJob,
    features: &TensorValue,
    out: &ChunkTx,
) -> Result<(), Status> {
    let deadline = job.deadline;
    // The layout travels in the first chunk's header.
    let input: Vec<TensorChunk> = features.chunks(DEFAULT_CHUNK_BYTES).collect();
    // The projector's adaptive timeout is per row block (input chunk).
    let blocks = input.len() as f64;
    let (lease, packed) = stages
        .projector
        .call(deadline)
        .open_timed(blocks, |lease| {
            let mut client = ProjectorClient::new(lease.channel());
            let input = input.clone();
            async move {
                let stream = tokio_stream::iter(input);
                let response = client.project(with_deadline(stream, deadline)).await?;
                let fp = fingerprint_of(response.metadata()).map(str::to_owned);
                let mut stream = response.into_inner();
                let mut chunks = Vec::new();
                while let Some(c) = stream.message().await? {
                    chunks.push(c);
                }
                Ok((chunks, fp))
            }
        })
        .await?;
    lease.success();
    stages.identity.observe("projector", packed.1.as_deref());
    for c in packed.0 {
        if out.send(Ok(c)).await.is_err() {
            return Err(Failure::cancelled().into_status());
        }
    }
    Ok(())
}
