//! A request's projected image embeddings in prompt order. Every image pipeline starts at once;
//! a sequencer appends their chunks to an [`EmbeddingLog`] image by image, and every decoder
//! attempt is fed from the log (a replacement decoder gets the same inputs).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::{DecodeRequest, ImagePlan, TensorChunk};

use crate::images::{image_pipeline, ImageJob, ImageTimings};
use crate::slots::Slot;
use crate::views::view_pipeline;
use crate::Stages;

/// Per-image totals of a request.
#[derive(Default)]
pub(crate) struct Totals {
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub project_ms: f64,
    pub cache_ms: f64,
    pub cache: Vec<i32>,
    pub layers: Vec<vlm_proto::LayerStats>,
    pub images: Vec<vlm_proto::ImageReport>,
}

impl Totals {
    fn add(&mut self, t: &ImageTimings, slot: &Slot, rows: u64) {
        self.images.push(vlm_proto::ImageReport {
            image: slot.image_index,
            region: slot.region,
            grid_rows: t.grid.0,
            grid_cols: t.grid.1,
            views: t.views,
            encoded_views: t.encoded_views.clone(),
            rows: rows as u32,
        });
        self.preprocess_ms += t.preprocess_ms;
        self.encode_ms += t.encode_ms;
        self.project_ms += t.project_ms;
        self.cache_ms += t.cache_ms;
        self.cache.push(t.cache as i32);
        self.layers.extend(t.layers.iter().cloned());
    }
}

/// Starts every image's pipeline and the sequencer that logs their output in prompt order. The
/// pipelines live as long as the sequencer: aborting it (the request ended early) stops them.
pub(crate) fn start(
    stages: &Arc<Stages>,
    slots: Vec<(Slot, Option<ImagePlan>)>,
    monitor_layers: bool,
    deadline: Instant,
) -> (Arc<EmbeddingLog>, JoinHandle<Totals>) {
    let mut per_image = Vec::with_capacity(slots.len());
    for (slot, plan) in slots {
        let (tx, rx) = mpsc::channel(4);
        let job = ImageJob {
            image: slot.image.clone(),
            region: slot.region,
            monitor_layers,
            deadline,
        };
        let task = match plan {
            None => tokio::spawn(image_pipeline(stages.clone(), job, tx).in_current_span()),
            Some(plan) => {
                let pipeline = view_pipeline(stages.clone(), job, plan, tx);
                tokio::spawn(pipeline.in_current_span())
            }
        };
        per_image.push((task, rx, slot));
    }
    let log = EmbeddingLog::new(stages.memory.empty());
    let seq_log = log.clone();
    let pipelines: Vec<AbortOnDrop> = per_image
        .iter()
        .map(|(t, _, _)| AbortOnDrop::new(t))
        .collect();
    let sequencer = async move {
        let _pipelines = pipelines;
        let mut totals = Totals::default();
        for (task, mut rx, slot) in per_image {
            let mut rows = 0;
            while let Some(chunk) = rx.recv().await {
                if let Ok(Some(h)) = chunk.as_ref().map(|c| c.header.as_ref()) {
                    rows = h.shape.first().copied().unwrap_or(0);
                }
                match chunk.and_then(|c| seq_log.push(c)) {
                    Ok(()) => {}
                    Err(s) => {
                        seq_log.fail(s);
                        return totals;
                    }
                }
            }
            match task.await {
                Ok(Ok(t)) => totals.add(&t, &slot, rows),
                Ok(Err(s)) => {
                    seq_log.fail(s);
                    return totals;
                }
                Err(e) => {
                    seq_log.fail(Status::internal(format!("image task failed: {e}")));
                    return totals;
                }
            }
        }
        seq_log.finish();
        totals
    };
    (log, tokio::spawn(sequencer.in_current_span()))
}

/// The request's projected image embeddings, in prompt order, as they arrive. The gateway keeps
/// them for the whole request so that a replacement decoder can be sent the same inputs, and
/// holds their bytes against its memory budget for as long (a chunk that does not fit fails the
/// request with RESOURCE_EXHAUSTED: a request that holds part of the budget never waits for
/// more, which could deadlock).
pub(crate) struct EmbeddingLog {
    chunks: Mutex<(Vec<TensorChunk>, vlm_net::BytePermit)>,
    state: watch::Sender<LogState>,
}

#[derive(Clone, Default)]
struct LogState {
    len: usize,
    done: bool,
    error: Option<Status>,
}

impl EmbeddingLog {
    fn new(memory: vlm_net::BytePermit) -> Arc<Self> {
        Arc::new(EmbeddingLog {
            chunks: Mutex::new((Vec::new(), memory)),
            state: watch::channel(LogState::default()).0,
        })
    }

    fn push(&self, c: TensorChunk) -> Result<(), Status> {
        let mut guard = self.chunks.lock().expect("log lock");
        let (chunks, memory) = &mut *guard;
        memory.try_grow(
            c.data.len() as u64,
            "the request's projected image embeddings",
        )?;
        chunks.push(c);
        let len = chunks.len();
        self.state.send_modify(|s| s.len = len);
        Ok(())
    }

    fn finish(&self) {
        self.state.send_modify(|s| s.done = true);
    }

    fn fail(&self, status: Status) {
        self.state.send_modify(|s| s.error = Some(status));
    }

    /// The failure that ended the log, if any.
    pub fn error(&self) -> Option<Status> {
        self.state.borrow().error.clone()
    }

    /// Resolves when an image pipeline has failed for good (never, if none does).
    pub async fn failed(&self) -> Status {
        let mut rx = self.state.subscribe();
        let error = rx
            .wait_for(|s| s.error.is_some())
            .await
            .map(|s| s.error.clone());
        match error {
            Ok(Some(e)) => e,
            _ => std::future::pending().await,
        }
    }

    /// Sends every chunk, current and future, to one decoder attempt's request stream.
    pub async fn feed(self: Arc<Self>, tx: mpsc::Sender<DecodeRequest>) {
        let mut rx = self.state.subscribe();
        let mut next = 0;
        loop {
            let state = rx.borrow_and_update().clone();
            while next < state.len {
                let chunk = self.chunks.lock().expect("log lock").0[next].clone();
                let msg = DecodeRequest {
                    kind: Some(RequestKind::Embeddings(chunk)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                next += 1;
            }
            if state.error.is_some() {
                // Keep the stream open; the relay reports the image's error and ends the call.
                return std::future::pending().await;
            }
            if state.done {
                return; // dropping `tx` ends the decoder's request stream
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Aborts a background task when the owner of this guard is dropped.
pub(crate) struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    pub fn new<T>(task: &JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task.abort_handle()))
    }

    /// Someone else owns the task from now on.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}
