//! A stream's questions: each waits until every frame that arrived before it has been handled,
//! then is answered as an ordinary generation over the latest frames' bytes (the stream's cache
//! holds their features), in one of the gateway's serving slots, its messages tagged with the
//! question's id.

use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;
use vlm_proto::generate_response::Kind as GenerateKind;
use vlm_proto::watch_answer::Kind as AnswerKind;
use vlm_proto::{GenerateRequest, ImageInput, Region, WatchAnswer, WatchQuestion};

use super::{watch_error, Shared};

/// The frames a question looks at.
struct Seen {
    /// Their indices, oldest first.
    frames: Vec<u64>,
    /// The region added for dynamic_roi.
    roi: Option<Region>,
}

/// Answers `q`, asked after `received` frames; `_room` is its place among the stream's
/// questions.
pub(super) async fn ask(
    shared: Arc<Shared>,
    q: WatchQuestion,
    received: u64,
    _room: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("watch.question", watch.question = %q.id);
    async {
        if let Some(want) = received.checked_sub(1) {
            let mut busy = shared.busy.subscribe();
            let _ = busy.wait_for(|b| b.done_through(want)).await;
        }
        if let Err(status) = answer(&shared, &q).await {
            let latest = shared
                .state
                .lock()
                .expect("state lock")
                .recent
                .back()
                .map(|f| f.0);
            let end = WatchAnswer {
                question_id: q.id.clone(),
                frame: latest.unwrap_or(0),
                kind: Some(AnswerKind::Error(watch_error(&status))),
                ..Default::default()
            };
            let _ = shared.out.answer(end).await;
        }
    }
    .instrument(span)
    .await
}

/// The refusal of a question beyond --max-watch-questions.
pub(super) fn busy(shared: &Shared, q: &WatchQuestion, received: u64) -> WatchAnswer {
    let status = Status::resource_exhausted(format!(
        "gateway: {} questions of this stream are being answered, the most at once \
         (--max-watch-questions)",
        shared.cfg.max_questions
    ));
    WatchAnswer {
        question_id: q.id.clone(),
        frame: received.saturating_sub(1),
        kind: Some(AnswerKind::Error(watch_error(&status))),
        ..Default::default()
    }
}

/// Generates the answer and relays it; an error before the first message is returned.
async fn answer(shared: &Shared, q: &WatchQuestion) -> Result<(), Status> {
    let started = StdInstant::now();
    let (req, seen) = request(shared, q)?;
    let latest = seen.frames.last().copied().unwrap_or(0);
    let gen = &shared.gen;
    let deadline = Instant::now() + gen.cfg.default_timeout;
    let _slot = match &gen.cfg.admission {
        Some(gate) => Some(gate.admit_peer(&shared.peer, Some(deadline)).await?),
        None => None,
    };
    let mut rx = gen
        .start(req, deadline, started, Some(shared.session.clone()))
        .await?;
    while let Some(msg) = rx.recv().await {
        let mut answer = WatchAnswer {
            question_id: q.id.clone(),
            frame: latest,
            ..Default::default()
        };
        answer.kind = match msg {
            Ok(m) => match m.kind {
                Some(GenerateKind::Delta(d)) => Some(AnswerKind::Delta(d)),
                Some(GenerateKind::Final(f)) => {
                    answer.roi = seen.roi;
                    answer.frames = seen.frames.clone();
                    Some(AnswerKind::Final(f))
                }
                None => continue,
            },
            Err(status) => Some(AnswerKind::Error(watch_error(&status))),
        };
        if !shared.out.answer(answer).await {
            break; // the client is gone; dropping `rx` stops the generation
        }
    }
    Ok(())
}

/// The generation request for `q`: the last frames (each as the bytes of the frame whose
/// features it uses), the motion box as a region of the latest with dynamic_roi, and either the
/// raw prompt with one `<image>` per frame in front unless it places them itself, or the
/// `question`, which the generation renders with one image part per frame.
fn request(shared: &Shared, q: &WatchQuestion) -> Result<(GenerateRequest, Seen), Status> {
    match (q.prompt.is_empty(), q.question.is_empty()) {
        (false, false) => {
            return Err(Status::invalid_argument(format!(
                "gateway: question {:?} sets both `prompt` and `question`; set one: `prompt` is \
                 the raw prompt in the model's chat format, `question` plain text the gateway \
                 renders with the model's chat template",
                q.id
            )))
        }
        _ if q.prompt.trim().is_empty() && q.question.trim().is_empty() => {
            return Err(Status::invalid_argument(format!(
                "gateway: question {:?} has an empty prompt and question",
                q.id
            )))
        }
        _ => {}
    }
    let n = q.last_frames.max(1) as usize;
    let max = shared.gen.cfg.max_images;
    if n > max {
        return Err(Status::invalid_argument(format!(
            "gateway: question {:?} asks for the last {n} frames; at most {max} (--max-images)",
            q.id
        )));
    }
    let state = shared.state.lock().expect("state lock");
    if state.recent.is_empty() {
        return Err(Status::failed_precondition(
            "gateway: no usable frame yet; send a frame before asking",
        ));
    }
    let skip = state.recent.len().saturating_sub(n);
    let frames: Vec<(u64, Bytes)> = state
        .recent
        .iter()
        .skip(skip)
        .map(|(i, d)| (*i, d.bytes.clone()))
        .collect();
    let roi = if q.dynamic_roi { state.motion } else { None };
    drop(state);
    let mut inputs: Vec<ImageInput> = frames
        .iter()
        .map(|(_, data)| ImageInput {
            data: data.clone(),
            regions: vec![],
        })
        .collect();
    if let (Some(r), Some(last)) = (roi, inputs.last_mut()) {
        last.regions.push(r);
    }
    let prompt = if q.prompt.is_empty() || q.prompt.contains("<image>") {
        q.prompt.clone()
    } else {
        "<image>\n".repeat(frames.len()) + &q.prompt
    };
    let req = GenerateRequest {
        prompt,
        question: q.question.clone(),
        params: q.params.clone(),
        image_inputs: inputs,
        ..Default::default()
    };
    let seen = Seen {
        frames: frames.iter().map(|f| f.0).collect(),
        roi,
    };
    Ok((req, seen))
}
