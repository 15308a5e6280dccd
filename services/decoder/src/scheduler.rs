//! The decoder's step loop: one OS thread owns the model's [`Engine`] and runs it step after step
//! while sequences run. gRPC handlers hand it [`Job`]s; it queues them (FIFO) until their KV fits,
//! streams each sequence's events back on its own channel, and stops sequences whose caller went
//! away or whose deadline passed. Events go out on unbounded channels (bounded in practice by
//! `max_tokens`), so a slow reader never stalls the batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;
use vlm_model::{Admission, Engine, EngineConfig, SeqId, SeqRequest, StepEvent};
use vlm_proto::decode_event::Kind as EventKind;
use vlm_proto::{DecodeDone, DecodeEvent, DecodeStarted, TokenEvent};
use vlm_serving::model_status;
use vlm_telemetry::metrics::labels::QueueOutcome;

use crate::{finish_reason, metrics, Model};

pub(crate) type EventTx = mpsc::UnboundedSender<Result<DecodeEvent, Status>>;

/// How long before the caller's deadline a queued request is refused, so the refusal reaches the
/// caller before it times out by itself: a tenth of the time it had when it was queued, at least
/// 50 ms and at most 500 ms (on a loaded machine a step, and the way back, can take a while).
fn deadline_margin(queued: Instant, deadline: Instant) -> Duration {
    (deadline.saturating_duration_since(queued) / 10)
        .clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// One request for the step loop.
pub(crate) struct Job {
    pub req: SeqRequest,
    /// Prompt positions after image expansion (without resumed tokens).
    pub prompt_tokens: usize,
    pub tx: EventTx,
    /// Until when it may wait in the queue and run.
    pub deadline: Option<Instant>,
    /// The gRPC call's span: parent of the prefill and decode spans.
    pub span: tracing::Span,
    pub queued: Instant,
    /// The request's embeddings held against the decoder's memory budget, until it ends.
    pub memory: vlm_net::BytePermit,
}

/// Handle to the step loop's thread.
#[derive(Clone)]
pub(crate) struct Scheduler {
    jobs: std_mpsc::Sender<Job>,
}

impl Scheduler {
    pub fn start(
        model: Arc<Model>,
        cfg: EngineConfig,
        max_queue_wait: Duration,
        fault_delay: Option<Duration>,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("decoder-steps".into())
            .spawn(move || {
                let engine = Engine::new(&model.decoder, &model.prompt, cfg);
                StepLoop {
                    engine,
                    model_name: model.name.clone(),
                    jobs: rx,
                    queue: VecDeque::new(),
                    live: HashMap::new(),
                    next_id: 0,
                    max_queue_wait,
                    fault_delay,
                }
                .run()
            })?;
        Ok(Scheduler { jobs })
    }

    pub fn submit(&self, job: Job) -> Result<(), Status> {
        self.jobs
            .send(job)
            .map_err(|_| Status::unavailable("decoder: the step loop has stopped"))
    }
}

/// Decode-span bookkeeping of a running sequence.
struct Live {
    tx: EventTx,
    _memory: vlm_net::BytePermit,
    deadline: Option<Instant>,
    /// What was left of the call's deadline (its `grpc-timeout`) when it was queued, in ms;
    /// -1 without one. Logged when decoding stops.
    budget_ms: i64,
    call: tracing::Span,
    prefill: Option<(tracing::Span, Instant)>,
    decode: Option<(tracing::Span, Instant)>,
    prefill_ms: f64,
    prompt_tokens: usize,
    cached_tokens: usize,
    /// Generated tokens including resumed ones.
    tokens: usize,
    layers: Vec<vlm_proto::LayerStats>,
    batch_min: usize,
    batch_max: usize,
    batch_sum: usize,
}

struct StepLoop<'a> {
    engine: Engine<'a>,
    model_name: Arc<str>,
    jobs: std_mpsc::Receiver<Job>,
    queue: VecDeque<Job>,
    live: HashMap<SeqId, Live>,
    next_id: SeqId,
    max_queue_wait: Duration,
    fault_delay: Option<Duration>,
}

impl StepLoop<'_> {
    fn run(mut self) {
        let mut stalled = false;
        loop {
            if !self.intake(stalled) {
                return;
            }
            self.expire_queued();
            self.admit();
            self.report();
            stalled = self.engine.is_idle() && !self.queue.is_empty();
            if self.engine.is_idle() {
                continue;
            }
            match self.engine.step() {
                Ok(events) => self.dispatch(events),
                Err(e) => {
                    tracing::error!(error = %e, "decode step failed; failing every running sequence");
                    let ids: Vec<SeqId> = self.live.keys().copied().collect();
                    for id in ids {
                        self.engine.cancel(id);
                        if let Some(l) = self.live.remove(&id) {
                            let _ =
                                l.tx.send(Err(Status::internal(format!("decode step: {e}"))));
                        }
                    }
                }
            }
            self.stop_abandoned();
            if self.engine.is_idle() {
                // The gauges must not keep their busy values while the loop waits for work.
                self.report();
            }
            if let Some(d) = self.fault_delay {
                std::thread::sleep(d);
            }
        }
    }

    fn report(&self) {
        let max_batch = self.engine.config().max_batch;
        metrics::engine_state(&self.engine.usage(), self.queue.len(), max_batch);
    }

    /// Takes new jobs: blocks for one when nothing runs and nothing waits, else only drains. When
    /// nothing runs but the queue head still cannot be admitted (`stalled`: it cannot happen with a
    /// budget that fits every admitted request, but must not spin if it does), waits for a new job
    /// up to the first queued deadline. False once every handle to the loop is gone.
    fn intake(&mut self, stalled: bool) -> bool {
        if self.engine.is_idle() && (self.queue.is_empty() || stalled) {
            let first_deadline = self.queue.iter().map(|j| self.queue_deadline(j)).min();
            let job = match first_deadline {
                None => self.jobs.recv().ok(),
                Some(d) => self
                    .jobs
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                    .ok(),
            };
            match job {
                Some(job) => self.queue.push_back(job),
                None if self.queue.is_empty() => return false,
                None => {}
            }
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.queue.push_back(job);
        }
        true
    }

    /// When a queued job gives up: its max queue wait, or just before the caller's deadline, so
    /// the caller hears RESOURCE_EXHAUSTED (the KV budget was full) rather than its own timeout.
    fn queue_deadline(&self, j: &Job) -> Instant {
        let cap = j.queued + self.max_queue_wait;
        let before = |d: Instant| {
            d.checked_sub(deadline_margin(j.queued, d))
                .unwrap_or(d)
                .max(j.queued)
        };
        j.deadline.map_or(cap, |d| before(d).min(cap))
    }

    /// Drops queued jobs whose caller left, and refuses those that waited past their deadline.
    fn expire_queued(&mut self) {
        let now = Instant::now();
        let cfg = self.engine.config();
        let bytes = cfg.blocks * self.engine.kv_shape().block_bytes();
        let mut i = 0;
        while i < self.queue.len() {
            let j = &self.queue[i];
            if j.tx.is_closed() {
                self.queue.remove(i);
            } else if now >= self.queue_deadline(j) {
                let j = self.queue.remove(i).expect("index in range");
                let waited = now.duration_since(j.queued);
                metrics::queue_wait(waited, QueueOutcome::expired);
                tracing::info!(parent: &j.span, waited_ms = waited.as_millis() as u64, "KV cache full until the deadline; not decoding");
                let _ = j.tx.send(Err(Status::resource_exhausted(format!(
                    "decoder: the KV cache budget ({bytes} bytes, {} tokens; --kv-cache-bytes) stayed full for the {} ms this request could wait in the queue",
                    cfg.blocks * cfg.block_size,
                    waited.as_millis()
                ))));
            } else {
                i += 1;
            }
        }
    }

    /// Admits queued jobs in order while they fit.
    fn admit(&mut self) {
        while let Some(mut job) = self.queue.pop_front() {
            let id = self.next_id;
            let resumed = job.req.resume.len();
            let params = job.req.params.clone();
            match self.engine.try_admit(id, job.req) {
                Ok(Admission::Admitted { cached_tokens }) => {
                    self.next_id += 1;
                    metrics::queue_wait(job.queued.elapsed(), QueueOutcome::admitted);
                    let prefill_tokens = job.prompt_tokens + resumed;
                    let prefill = tracing::info_span!(
                        parent: &job.span,
                        "prefill",
                        gen_ai.operation.name = "chat",
                        gen_ai.request.model = %self.model_name,
                        gen_ai.request.temperature = params.temperature as f64,
                        gen_ai.request.top_p = params.top_p as f64,
                        gen_ai.request.max_tokens = params.max_tokens as i64,
                        gen_ai.usage.input_tokens = prefill_tokens as i64,
                        vlm.resume_tokens = resumed as i64,
                        vlm.cached_prompt_tokens = cached_tokens as i64,
                    );
                    let started = DecodeEvent {
                        kind: Some(EventKind::Started(DecodeStarted {
                            prefill_tokens: prefill_tokens as u32,
                            resolved_params: Some(vlm_serving::params_to_proto(&params)),
                            cached_tokens: cached_tokens as u32,
                        })),
                    };
                    let _ = job.tx.send(Ok(started));
                    self.live.insert(
                        id,
                        Live {
                            tx: job.tx,
                            _memory: job.memory,
                            deadline: job.deadline,
                            budget_ms: job.deadline.map_or(-1, |d| {
                                d.saturating_duration_since(job.queued).as_millis() as i64
                            }),
                            call: job.span,
                            prefill: Some((prefill, Instant::now())),
                            decode: None,
                            prefill_ms: 0.0,
                            prompt_tokens: job.prompt_tokens,
                            cached_tokens,
                            tokens: resumed,
                            layers: Vec::new(),
                            batch_min: usize::MAX,
                            batch_max: 0,
                            batch_sum: 0,
                        },
                    );
                }
                Ok(Admission::Wait(req)) => {
                    job.req = req;
                    self.queue.push_front(job);
                    return;
                }
                Err(e) => {
                    let _ = job.tx.send(Err(model_status(e)));
                }
            }
        }
    }

    fn dispatch(&mut self, events: Vec<StepEvent>) {
        if let Some(batch) = events
            .iter()
            .filter_map(|e| match e {
                StepEvent::Token { batch, .. } => Some(*batch),
                _ => None,
            })
            .max()
        {
            metrics::batch_size(batch);
        }
        for ev in events {
            match ev {
                StepEvent::Prefilled {
                    id,
                    cached_tokens,
                    layers,
                } => self.prefilled(id, cached_tokens, layers),
                StepEvent::Token { id, token, batch } => self.token(id, token, batch),
                StepEvent::Failed { id, error } => {
                    if let Some(l) = self.live.remove(&id) {
                        let _ = l.tx.send(Err(model_status(error)));
                    }
                }
            }
        }
    }

    fn prefilled(&mut self, id: SeqId, cached: usize, layers: Vec<vlm_model::LayerStats>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        let (span, t) = l.prefill.take().expect("prefilled once");
        // The rows are also span events of the prefill.
        l.layers = span.in_scope(|| vlm_serving::layer_stats_rows("decoder", &layers));
        drop(span);
        vlm_telemetry::metrics::observe_stage("prefill", t.elapsed());
        l.prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let computed = l.prompt_tokens + l.tokens - cached;
        metrics::prefix_tokens(cached, computed);
        let decode = tracing::info_span!(
            parent: &l.call,
            "decode",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = %self.model_name,
            gen_ai.usage.input_tokens = l.prompt_tokens as i64,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            vlm.batch_size.min = tracing::field::Empty,
            vlm.batch_size.max = tracing::field::Empty,
            vlm.batch_size.mean = tracing::field::Empty,
        );
        l.decode = Some((decode, Instant::now()));
    }

    fn token(&mut self, id: SeqId, token: vlm_model::TokenEvent, batch: usize) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        l.tokens += 1;
        l.batch_min = l.batch_min.min(batch);
        l.batch_max = l.batch_max.max(batch);
        l.batch_sum += batch;
        let event = DecodeEvent {
            kind: Some(EventKind::Token(TokenEvent {
                id: token.id,
                text_delta: token.text,
                index: token.index as u32,
            })),
        };
        if l.tx.send(Ok(event)).is_err() {
            // Noticed by stop_abandoned after this step.
            return;
        }
        let Some(reason) = token.finish else {
            return;
        };
        let l = self.live.remove(&id).expect("live");
        let (span, t) = l.decode.expect("decoding after prefill");
        let emitted = l.tokens; // includes resumed tokens, as completion_tokens does
        span.record("gen_ai.usage.output_tokens", emitted as i64);
        span.record(
            "gen_ai.response.finish_reasons",
            tracing::field::debug(&reason),
        );
        let steps = emitted.max(1);
        span.record("vlm.batch_size.min", l.batch_min as i64);
        span.record("vlm.batch_size.max", l.batch_max as i64);
        span.record("vlm.batch_size.mean", l.batch_sum as f64 / steps as f64);
        vlm_telemetry::metrics::observe_stage("decode", t.elapsed());
        let done = DecodeDone {
            finish_reason: finish_reason(reason) as i32,
            prompt_tokens: l.prompt_tokens as u32,
            completion_tokens: emitted as u32,
            prefill_ms: l.prefill_ms,
            decode_ms: t.elapsed().as_secs_f64() * 1e3,
            layers: l.layers,
            cached_prompt_tokens: l.cached_tokens as u32,
        };
        let _ = l.tx.send(Ok(DecodeEvent {
            kind: Some(EventKind::Done(done)),
        }));
    }

    /// Stops running sequences whose caller went away or whose deadline passed.
    fn stop_abandoned(&mut self) {
        let now = Instant::now();
        let gone: Vec<(SeqId, bool)> = self
            .live
            .iter()
            .filter_map(|(&id, l)| {
                if l.tx.is_closed() {
                    Some((id, false))
                } else if l.deadline.is_some_and(|d| now >= d) {
                    Some((id, true))
                } else {
                    None
                }
            })
            .collect();
        for (id, deadline) in gone {
            self.engine.cancel(id);
            let l = self.live.remove(&id).expect("live");
            let span = l.decode.as_ref().or(l.prefill.as_ref()).map(|(s, _)| s);
            let span = span.unwrap_or(&l.call);
            if deadline {
                tracing::info!(
                    parent: span,
                    deadline_ms = l.budget_ms,
                    tokens = l.tokens,
                    "deadline exceeded; decoding stopped"
                );
                let _ = l.tx.send(Err(Status::deadline_exceeded(
                    "decoder: deadline exceeded while decoding",
                )));
            } else {
                tracing::info!(
                    parent: span,
                    deadline_ms = l.budget_ms,
                    tokens = l.tokens,
                    "generation cancelled by the client; decoding stopped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gives_up_a_tenth_early_within_50_to_500_ms() {
        let t = Instant::now();
        let margin = |ms| deadline_margin(t, t + Duration::from_millis(ms)).as_millis();
        assert_eq!(margin(100), 50);
        assert_eq!(margin(2_000), 200);
        assert_eq!(margin(300_000), 500);
        // A deadline already behind the queueing time: the smallest margin.
        assert_eq!(
            deadline_margin(t + Duration::from_secs(1), t).as_millis(),
            50
        );
    }
}
