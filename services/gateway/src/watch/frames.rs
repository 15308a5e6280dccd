//! A stream's frames: checked on arrival, then handled one at a time by the stream's worker.
//! The worker compares each frame with the one whose features are current; a still frame reuses
//! them (no encoder call), a changed one is encoded through the ordinary image pipeline into the
//! stream's cache (for tiled models only the views whose pixels changed miss it) and becomes
//! current. The bounding box of the changed blocks is the stream's latest motion.

use std::sync::Arc;

use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;
use vlm_frames::FrameError;
use vlm_proto::{FrameEncode, FrameEvent, Region, WatchFrame};
use vlm_telemetry::metrics::labels::{NoLabels, WatchFrame as Counted};
use vlm_telemetry::MeshMetrics;

use super::{count_frame, watch_error, Current, FrameData, PendingFrame, Shared};

use crate::embeddings;
use crate::slots::Slot;

/// A frame from the client: refused at once when its bytes are over the gateway's image limit,
/// otherwise put in the waiting slot (replacing, and dropping, a frame still waiting there).
pub(super) fn receive(
    shared: &Shared,
    index: u64,
    f: WatchFrame,
    charge: Option<vlm_net::BytePermit>,
) {
    count_frame(Counted::received);
    let max = shared.gen.cfg.max_image_bytes;
    let refused = if f.data.is_empty() {
        Some(Status::invalid_argument(format!(
            "gateway: frame {index} is empty (0 bytes)"
        )))
    } else if f.data.len() > max {
        Some(Status::resource_exhausted(format!(
            "gateway: frame {index} is {} bytes, over the limit of {max} bytes",
            f.data.len()
        )))
    } else {
        None
    };
    if let Some(status) = refused {
        let event = FrameEvent {
            frame: index,
            timestamp: f.timestamp,
            ..Default::default()
        };
        send(shared, failed(event, &status));
        return;
    }
    let frame = PendingFrame {
        index,
        timestamp: f.timestamp,
        data: FrameData::new(f.data, charge),
    };
    // `busy` changes under the slot's lock, so it always names what the slot holds.
    let replaced = {
        let mut slot = shared.pending.lock().expect("pending lock");
        shared.busy.send_modify(|b| b.pending = Some(index));
        slot.replace(frame)
    };
    if let Some(old) = replaced {
        let event = FrameEvent {
            frame: old.index,
            timestamp: old.timestamp,
            encode: FrameEncode::Dropped as i32,
            ..Default::default()
        };
        send(shared, event);
    }
    shared.wake.notify_one();
}

/// No more frames will come: the worker handles the waiting one, then stops.
pub(super) fn close(shared: &Shared) {
    shared.state.lock().expect("state lock").closed = true;
    shared.wake.notify_one();
}

/// Handles waiting frames one at a time until the stream closes.
pub(super) async fn worker(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut slot = shared.pending.lock().expect("pending lock");
            let next = slot.take();
            if let Some(f) = &next {
                shared.busy.send_modify(|b| {
                    b.handling = Some(f.index);
                    b.pending = None;
                });
            }
            next
        };
        match next {
            Some(frame) => {
                let span = tracing::info_span!(
                    "watch.frame",
                    watch.frame = frame.index,
                    watch.encode = tracing::field::Empty,
                );
                let event = handle(&shared, &frame).instrument(span.clone()).await;
                span.record("watch.encode", encode_name(event.encode()));
                send(&shared, event);
                shared.busy.send_modify(|b| b.handling = None);
            }
            None if shared.state.lock().expect("state lock").closed => return,
            None => shared.wake.notified().await,
        }
    }
}

/// Counts the event and queues it for the client.
fn send(shared: &Shared, event: FrameEvent) {
    let m = MeshMetrics::global();
    match event.encode() {
        FrameEncode::Reused => {
            count_frame(Counted::reused);
            m.watch_encoder_calls_saved.get_or_create(&NoLabels).inc();
        }
        FrameEncode::Partial => count_frame(Counted::partial),
        FrameEncode::Full => count_frame(Counted::full),
        FrameEncode::Dropped => count_frame(Counted::dropped),
        FrameEncode::Failed | FrameEncode::Unspecified => count_frame(Counted::failed),
    }
    shared.out.frame(event);
}

fn encode_name(e: FrameEncode) -> &'static str {
    match e {
        FrameEncode::Reused => "reused",
        FrameEncode::Partial => "partial",
        FrameEncode::Full => "full",
        FrameEncode::Dropped => "dropped",
        FrameEncode::Failed | FrameEncode::Unspecified => "failed",
    }
}

/// The status of a frame that cannot be decoded: too large is RESOURCE_EXHAUSTED, anything else
/// INVALID_ARGUMENT.
fn frame_status(index: u64, e: FrameError) -> Status {
    match e {
        FrameError::TooLarge(why) => {
            Status::resource_exhausted(format!("gateway: frame {index}: {why}"))
        }
        e => Status::invalid_argument(format!("gateway: frame {index}: {e}")),
    }
}

fn failed(mut event: FrameEvent, status: &Status) -> FrameEvent {
    event.encode = FrameEncode::Failed as i32;
    event.error = Some(watch_error(status));
    event
}

/// Decodes and compares one frame, then reuses the current features or encodes it.
async fn handle(shared: &Shared, f: &PendingFrame) -> FrameEvent {
    let event = FrameEvent {
        frame: f.index,
        timestamp: f.timestamp,
        ..Default::default()
    };
    let reference = {
        let state = shared.state.lock().expect("state lock");
        state.current.as_ref().map(|c| c.pixels.clone())
    };
    let (cfg, data) = (shared.cfg.clone(), f.data.bytes.clone());
    // The decoded pixels are charged to the memory budget, from the header's size, before a
    // pixel is decoded (now or never: a frame never queues for memory ahead of requests, and a
    // newer frame may be waiting anyway); the frame that becomes current keeps the RGB part.
    let header = match vlm_frames::header(&data, &cfg.frame_limits) {
        Ok(h) => h,
        Err(e) => return failed(event, &frame_status(f.index, e)),
    };
    let what = "a Watch frame's decoded pixels";
    let mut charge = shared.gen.cfg.memory.empty_for(&shared.peer);
    if let Err(status) = charge.try_grow(header.decode_peak_bytes(), what) {
        return failed(event, &status);
    }
    let looked = tokio::task::spawn_blocking(move || {
        let frame = vlm_frames::decode(&data, &cfg.frame_limits)?;
        let change =
            reference.map(|r| vlm_frames::compare(&r, &frame, cfg.block, cfg.frame_threshold));
        Ok::<_, FrameError>((frame, change))
    })
    .await;
    let (pixels, change) = match looked {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return failed(event, &frame_status(f.index, e)),
        Err(e) => return failed(event, &Status::internal(format!("frame check failed: {e}"))),
    };
    let rgb = pixels.rgb().len() as u64;
    charge
        .resize(rgb, what)
        .expect("shrinking a charge cannot fail");
    let mut event = event;
    let mut motion = None;
    if let Some(c) = &change {
        event.changed_blocks = c.changed_blocks;
        event.blocks = c.blocks_x * c.blocks_y;
        event.max_diff = c.max_diff;
        if !c.resized {
            motion = c.bbox.map(|b| {
                let [x0, y0, x1, y1] = vlm_frames::relative_box(b, pixels.width(), pixels.height());
                Region { x0, y0, x1, y1 }
            });
        }
        event.motion = motion;
    }
    let keep = shared.gen.cfg.max_images;
    if change.as_ref().is_some_and(|c| c.is_still()) {
        let mut state = shared.state.lock().expect("state lock");
        let current = state.current.as_ref().map(|c| c.data.clone());
        if let Some(data) = current {
            state.accept(f.index, data, keep);
            event.encode = FrameEncode::Reused as i32;
            return event;
        }
    }
    match encode(shared, f).await {
        Err(status) => failed(event, &status),
        Ok(report) => {
            event.views = report.views;
            event.encode_ms = report.encode_ms;
            event.encode = if report.encoded_views.is_empty() {
                FrameEncode::Reused // the same pixels as a frame the stream's cache still holds
            } else if (report.encoded_views.len() as u32) < report.views {
                FrameEncode::Partial
            } else {
                FrameEncode::Full
            } as i32;
            event.encoded_views = report.encoded_views;
            let mut state = shared.state.lock().expect("state lock");
            state.current = Some(Current {
                data: f.data.clone(),
                pixels: Arc::new(pixels),
                _pixels_charge: charge,
            });
            state.accept(f.index, f.data.clone(), keep);
            if motion.is_some() {
                state.motion = motion;
            }
            event
        }
    }
}

/// What encoding one frame cost.
struct EncodeReport {
    views: u32,
    encoded_views: Vec<u32>,
    encode_ms: f64,
}

/// Runs the frame through the image pipeline (cache, encoder, projector) as a request would,
/// which leaves its features in the stream's cache for the questions that follow.
async fn encode(shared: &Shared, f: &PendingFrame) -> Result<EncodeReport, Status> {
    let gen = &shared.gen;
    let deadline = Instant::now() + gen.cfg.default_timeout;
    let slot = Slot {
        image: f.data.bytes.clone(),
        image_index: 0,
        region: None,
    };
    let plans = gen
        .plans(std::slice::from_ref(&slot), false, deadline)
        .await?;
    let jobs = vec![(slot, plans.into_iter().next().flatten())];
    let (log, sequencer) = embeddings::start(&gen.stages, jobs, false, deadline);
    // A stream that ends mid-encode stops the image's pipeline too.
    let _stop = embeddings::AbortOnDrop::new(&sequencer);
    let totals = sequencer
        .await
        .map_err(|e| Status::internal(format!("frame encode failed: {e}")))?;
    if let Some(status) = log.error() {
        return Err(status);
    }
    let image = totals
        .images
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("frame encode reported no image"))?;
    Ok(EncodeReport {
        views: image.views,
        encoded_views: image.encoded_views,
        encode_ms: totals.encode_ms,
    })
}
