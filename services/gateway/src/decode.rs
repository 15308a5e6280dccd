//! Decoder calls and the token relay to the client. A decoder that fails before its first token
//! is replaced; one that fails mid-stream is resumed elsewhere from prompt + the tokens already
//! streamed, with the sampling parameters the first decoder resolved (same seed, same stream).
//! Waits are bounded per phase: queueing by the clamp's maximum, prefill by the adaptive
//! per-position timeout, every later token by the adaptive per-step timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use vlm_net::{fingerprint_of, with_deadline, Lease};
use vlm_proto::decode_event::Kind as EventKind;
use vlm_proto::decode_request::Kind as RequestKind;
use vlm_proto::decoder_client::DecoderClient;
use vlm_proto::generate_response::Kind as ResponseKind;
use vlm_proto::{
    DecodeDone, DecodeEvent, DecodeRequest, DecodeSetup, GenerateFinal, GenerateResponse,
    StageTimings, TextDelta, Usage,
};

use vlm_telemetry::metrics::labels::AbandonReason;

use crate::embeddings::{AbortOnDrop, EmbeddingLog, Totals};
use crate::stage::StageCall;
use crate::Stages;

/// How long the gateway waits for a decoder's trailers after its `done` event.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(1);

/// A decoder call in progress on one replica.
pub(crate) struct DecoderAttempt {
    lease: Lease,
    events: Streaming<DecodeEvent>,
    _feeder: AbortOnDrop,
}

/// Opens a decoder call (retried on other replicas while failures are retryable): setup (with the
/// tokens already streamed, when resuming), then every embedding chunk the request has, as they
/// come.
pub(crate) async fn open_decoder(
    stages: &Stages,
    calls: &mut StageCall,
    setup: &DecodeSetup,
    resume: &[u32],
    log: &Arc<EmbeddingLog>,
) -> Result<DecoderAttempt, Status> {
    let deadline = calls.deadline;
    let (lease, (response, feeder)) = calls
        .open(|lease| {
            let (tx, rx) = mpsc::channel::<DecodeRequest>(8);
            let mut setup = setup.clone();
            setup.resume_token_ids = resume.to_vec();
            let log = log.clone();
            let mut client = DecoderClient::new(lease.channel());
            async move {
                let first = DecodeRequest {
                    kind: Some(RequestKind::Setup(setup)),
                };
                let _ = tx.send(first).await;
                let feeder = AbortOnDrop::new(&tokio::spawn(log.feed(tx)));
                let call = client.generate(with_deadline(ReceiverStream::new(rx), deadline));
                Ok((call.await?, feeder))
            }
        })
        .await?;
    stages
        .identity
        .observe("decoder", fingerprint_of(response.metadata()));
    Ok(DecoderAttempt {
        lease,
        events: response.into_inner(),
        _feeder: feeder,
    })
}

/// How one decoder attempt ended.
enum AttemptEnd {
    /// `done` was relayed, or the client went away: the request is over.
    Over,
    /// The request failed for a reason another decoder cannot fix (an image failed for good).
    Fatal(Status),
    /// The replica failed; the request may continue elsewhere.
    Failed(Status),
    /// The replica produced nothing within this limit while its peers were faster; the request
    /// may continue elsewhere.
    TooSlow(Duration, AbandonReason),
}

/// Everything the token relay needs to build the client's stream and final message.
pub(crate) struct Relay {
    pub stages: Arc<Stages>,
    pub calls: StageCall,
    pub setup: DecodeSetup,
    pub log: Arc<EmbeddingLog>,
    pub started: std::time::Instant,
    pub trace_id: String,
    pub tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    pub sequencer: Option<JoinHandle<Totals>>,
    /// Tokens streamed to the client so far (what a replacement decoder resumes from).
    pub produced: Vec<u32>,
}

impl Relay {
    /// Relays `current`, then any replacement, until the request is over.
    pub async fn run(mut self, mut current: DecoderAttempt) {
        let deadline = self.calls.deadline;
        let result = tokio::time::timeout_at(deadline, async {
            loop {
                let end = self.relay(&mut current).await;
                let DecoderAttempt { lease, events, .. } = current;
                drop(events); // cancels the call on that replica
                let failure = match end {
                    AttemptEnd::Over => return Ok(()),
                    AttemptEnd::Fatal(status) => return Err(status),
                    AttemptEnd::Failed(status) => self.calls.failed(lease, status),
                    AttemptEnd::TooSlow(limit, reason) => {
                        self.calls
                            .too_slow(lease, limit, "produced no token", reason)
                    }
                };
                if self.all_produced() && vlm_net::is_retryable(&failure.status) {
                    // It died after the last token but before `done`: nothing is left to
                    // generate, so finish here.
                    self.finish(DecodeDone {
                        finish_reason: vlm_proto::FinishReason::Length as i32,
                        completion_tokens: self.produced.len() as u32,
                        ..Default::default()
                    })
                    .await;
                    return Ok(());
                }
                let reason = failure.status.message().to_string();
                self.calls.again(failure, "failover").await?;
                tracing::warn!(
                    tokens = self.produced.len(),
                    "decoder failed mid-stream; resuming on another replica: {reason}"
                );
                current = open_decoder(
                    &self.stages,
                    &mut self.calls,
                    &self.setup,
                    &self.produced,
                    &self.log,
                )
                .await?;
            }
        })
        .await;
        let result = result.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "request deadline exceeded while generating",
            ))
        });
        if let Some(s) = self.sequencer.take() {
            s.abort();
        }
        if let Err(status) = result {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    /// Whether the tokens streamed already reach the max_tokens the decoder resolved.
    fn all_produced(&self) -> bool {
        let max = self.setup.params.as_ref().and_then(|p| p.max_tokens);
        max.is_some_and(|m| self.produced.len() >= m as usize)
    }

    /// The wait for the next event: queueing says little about the replica, so it is bounded only
    /// by the clamp's maximum; then the prefill per position, then each step.
    fn next_due(
        &self,
        a: &DecoderAttempt,
        started: Instant,
        prefill: Option<(Instant, f64)>,
        last_token: Option<Instant>,
    ) -> (Instant, Duration) {
        match (last_token, prefill) {
            (Some(t), _) => {
                let (timeout, units) = self.step_budget(a);
                let l = self.calls.limit(&a.lease, timeout, units);
                (t + l, l)
            }
            (None, Some((t, units))) => {
                let l = self
                    .calls
                    .limit(&a.lease, &self.stages.prefill, queued(a, units));
                (t + l, l)
            }
            (None, None) => {
                let l = self.calls.max_limit(&a.lease, &self.stages.prefill);
                (started + l, l)
            }
        }
    }

    /// What the next token may take on `a`'s replica: one decode step, or, while calls this
    /// gateway sent there are prefilling, their positions at the prefill's pace (the decoder runs
    /// a prefill chunk beside the decode rows of each step, so a token waits behind it; without
    /// this, the stream that shares a replica with a long prompt's prefill looked stuck and was
    /// moved, its own prefill redone elsewhere: the amplification routing avoids).
    fn step_budget(&self, a: &DecoderAttempt) -> (&vlm_net::AdaptiveTimeout, f64) {
        match a.lease.replica().prefilling() {
            0 => (&self.stages.decoder.timeout, 1.0),
            pending => (&*self.stages.prefill, pending as f64),
        }
    }

    /// Why the phase whose limit just passed should be abandoned, or `None` to keep waiting:
    /// the prefill and each step are compared with the peers ([`StageCall::is_outlier`]);
    /// queueing (before `started`) says nothing about the replica and is abandoned at its limit.
    fn slow_phase(
        &self,
        a: &DecoderAttempt,
        prefill: Option<(Instant, f64)>,
        last_token: Option<Instant>,
    ) -> Option<AbandonReason> {
        let (timeout, since, units, reason) = match (last_token, prefill) {
            (Some(t), _) => {
                let (timeout, units) = self.step_budget(a);
                (timeout, t, units, AbandonReason::slow_token)
            }
            (None, Some((t, units))) => (
                &*self.stages.prefill,
                t,
                queued(a, units),
                AbandonReason::slow,
            ),
            (None, None) => return Some(AbandonReason::slow),
        };
        self.calls
            .is_outlier(&a.lease, timeout, since.elapsed(), units)
            .then_some(reason)
    }

    /// Relays one attempt's tokens until `done`, the client leaving, or a failure.
    async fn relay(&mut self, a: &mut DecoderAttempt) -> AttemptEnd {
        let log = self.log.clone();
        let image_failure = log.failed();
        tokio::pin!(image_failure);
        let started = Instant::now();
        // When prefill began on the replica, and how many positions it prefills.
        let mut prefill: Option<(Instant, f64)> = None;
        let mut last_token: Option<Instant> = None;
        // Set while waiting past a limit because every replica is as slow (see below).
        let mut patience: Option<Instant> = None;
        // This call's prefill, counted on its replica from `started` to its first token.
        let mut prefilling: Option<vlm_net::PrefillGuard> = None;
        loop {
            let (due, limit) = self.next_due(a, started, prefill, last_token);
            let due = patience.map_or(due, |p| p.max(due));
            let event = tokio::select! {
                status = &mut image_failure => return AttemptEnd::Fatal(status),
                // The client hung up: ending here drops the decoder call (which stops decoding)
                // and, through the sequencer, the image pipelines.
                _ = self.tx.closed() => return AttemptEnd::Over,
                r = tokio::time::timeout_at(due, a.events.message()) => r,
            };
            let event = match event {
                Err(_) if Instant::now() >= self.calls.deadline => {
                    return AttemptEnd::Fatal(Status::deadline_exceeded(
                        "request deadline exceeded while generating",
                    ))
                }
                Err(_) => match self.slow_phase(a, prefill, last_token) {
                    // Abandoned only when this replica is slower than its peers: when all are
                    // as slow, redoing the prefill elsewhere would only add load.
                    Some(reason) => return AttemptEnd::TooSlow(limit, reason),
                    None => {
                        patience = Some(Instant::now() + limit);
                        continue;
                    }
                },
                Ok(Err(status)) => return AttemptEnd::Failed(status),
                Ok(Ok(None)) => {
                    let status = Status::unavailable("decoder stream ended without `done`");
                    return AttemptEnd::Failed(status);
                }
                Ok(Ok(Some(e))) => e,
            };
            patience = None;
            match event.kind {
                Some(EventKind::Started(s)) => {
                    // The positions it computes: those its prefix cache did not hold.
                    let computed = s.prefill_tokens.saturating_sub(s.cached_tokens).max(1);
                    prefill = Some((Instant::now(), f64::from(computed)));
                    let guard = a.lease.replica().begin_prefill(u64::from(computed));
                    drop(prefilling.replace(guard)); // a second `started` replaces the first
                    if s.resolved_params.is_some() {
                        // A replacement decoder resumes with exactly these (seed included).
                        self.setup.params = s.resolved_params;
                    }
                }
                Some(EventKind::Token(t)) => {
                    drop(prefilling.take()); // prefilled: no longer delays its peers
                    let now = Instant::now();
                    self.observe_token(a, started, prefill, last_token, now);
                    last_token = Some(now);
                    self.produced.push(t.id);
                    let delta = TextDelta {
                        text: t.text_delta,
                        token_ids: vec![t.id],
                    };
                    let msg = GenerateResponse {
                        kind: Some(ResponseKind::Delta(delta)),
                    };
                    if self.tx.send(Ok(msg)).await.is_err() {
                        return AttemptEnd::Over; // the client went away; dropping the call cancels it
                    }
                }
                Some(EventKind::Done(d)) => {
                    self.finish(d).await;
                    // Read the call to its end (the decoder's OK trailers follow `done` at once):
                    // dropping it first would cancel it, and both sides would record CANCELLED.
                    let _ = tokio::time::timeout(DRAIN_AFTER_DONE, a.events.message()).await;
                    return AttemptEnd::Over;
                }
                None => return AttemptEnd::Fatal(Status::internal("decoder sent an empty event")),
            }
        }
    }

    /// Feeds a token's timing to the adaptive timeouts, the balancer and the metrics.
    fn observe_token(
        &self,
        a: &DecoderAttempt,
        started: Instant,
        prefill: Option<(Instant, f64)>,
        last: Option<Instant>,
        now: Instant,
    ) {
        let ttft = self.produced.is_empty().then(|| self.started.elapsed());
        let itl = last.filter(|_| ttft.is_none()).map(|prev| now - prev);
        vlm_telemetry::metrics::token_streamed(ttft, itl);
        match (last, prefill) {
            (Some(prev), _) => {
                let timeout = &self.stages.decoder.timeout;
                timeout.observe(a.lease.id(), now - prev, 1.0);
            }
            (None, p) => {
                // Time to first token is this replica's latency sample for balancing.
                a.lease.observe(now - started);
                if let Some((t, units)) = p {
                    self.stages.prefill.observe(a.lease.id(), now - t, units);
                }
            }
        }
    }

    async fn finish(&mut self, d: DecodeDone) {
        let mut totals = match self.sequencer.take() {
            Some(s) => s.await.unwrap_or_default(),
            None => Totals::default(),
        };
        if let Some(reason) = self.calls.reason {
            crate::routing::cached_tokens(reason, d.cached_prompt_tokens);
        }
        let fin = GenerateFinal {
            usage: Some(Usage {
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                cached_prompt_tokens: d.cached_prompt_tokens,
            }),
            timings: Some(StageTimings {
                images: std::mem::take(&mut totals.images),
                preprocess_ms: totals.preprocess_ms,
                encode_ms: totals.encode_ms,
                project_ms: totals.project_ms,
                prefill_ms: d.prefill_ms,
                decode_ms: d.decode_ms,
                total_ms: self.started.elapsed().as_secs_f64() * 1e3,
                cache: std::mem::take(&mut totals.cache),
                cache_ms: totals.cache_ms,
            }),
            trace_id: self.trace_id.clone(),
            finish_reason: d.finish_reason,
            // Vision rows per image in request order, then the prefill's decoder rows.
            layer_stats: std::mem::take(&mut totals.layers)
                .into_iter()
                .chain(d.layers)
                .collect(),
        };
        let _ = self
            .tx
            .send(Ok(GenerateResponse {
                kind: Some(ResponseKind::Final(fin)),
            }))
            .await;
    }
}

/// The positions a call's first token waits for on its replica: its own prefill's, or all this
/// gateway's calls still prefilling there when more (a decoder prefills the oldest first).
fn queued(a: &DecoderAttempt, own: f64) -> f64 {
    own.max(a.lease.replica().prefilling() as f64)
}
