//! Live frame streams (`Gateway/Watch`). Per stream, three parts share a small state:
//! - the intake ([`WatchStream::run`]) reads the client's messages and never waits on work: a
//!   frame goes into a one-frame slot (a frame still waiting there is dropped, newest wins), a
//!   question gets its own task;
//! - the frame worker ([`frames`]) takes the waiting frame, compares it block by block with the
//!   frame whose features are current ([`vlm_frames::compare`]) and reuses those features when no
//!   block changed beyond `--frame-threshold`; otherwise it encodes the frame through the normal
//!   image pipeline into the stream's own feature cache, where a tiled model's per-view keys make
//!   an unchanged tile a hit (a partial encode);
//! - each question ([`questions`]) is an ordinary generation over the latest frames' bytes: their
//!   features are in the stream's cache, so a reused frame costs no encoder call and its answer
//!   is exactly what a fresh encode would give.
//!
//! Everything the stream holds is bounded: one waiting frame, the current frame (bytes and
//! pixels), the last `--max-images` frames' bytes, the stream's cache (`--watch-cache-bytes`), at
//! most `--max-watch-questions` questions and a fixed event queue. And everything it holds is
//! charged to the gateway's memory budget (`--max-bytes-in-flight`) before it is held: each
//! client message from its header on (the admission layer's ledger; a frame keeps its charge
//! while its bytes are kept), decoded pixels from the frame's header before decoding, and the
//! stream's cache as it fills.

mod budgeted_cache;
mod frames;
mod questions;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::Instrument;
use vlm_proto::watch_request::Kind as RequestKind;
use vlm_proto::watch_response::Kind as ResponseKind;
use vlm_proto::{FrameEvent, Region, WatchAnswer, WatchError, WatchRequest, WatchResponse};
use vlm_telemetry::metrics::labels::{NoLabels, WatchFrame, WatchFrameLabels};
use vlm_telemetry::MeshMetrics;

use crate::service::Generator;

/// Events a stream queues for its client; frame events beyond it are discarded (and counted)
/// rather than stall the intake. A question's outcome (its answer, error or refusal) is never
/// discarded: it waits for room.
const EVENT_QUEUE: usize = 64;

/// Question refusals (beyond --max-watch-questions) waiting for the client to read them before
/// the stream stops reading its messages.
const PENDING_REFUSALS: usize = 64;

/// Limits and thresholds of live frame streams.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Streams open at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// Questions of one stream being answered at once; more get a RESOURCE_EXHAUSTED answer.
    pub max_questions: usize,
    /// A block counts as changed when its mean absolute difference exceeds this (8-bit levels).
    pub frame_threshold: f32,
    /// Side of the comparison blocks, in pixels.
    pub block: u32,
    /// Bounds on a frame's decoded size.
    pub frame_limits: vlm_frames::FrameLimits,
    /// Bytes of features each stream's own cache keeps.
    pub cache_bytes: usize,
    /// A stream with no client message and no question being answered for this long ends with
    /// DEADLINE_EXCEEDED (an idle stream would otherwise hold one of `max_streams` forever). A
    /// stream's first message must come sooner: within [`vlm_net::FIRST_MESSAGE_TIMEOUT`], as
    /// a unary call's does.
    pub idle_timeout: std::time::Duration,
    /// Most of `max_streams` one peer may hold (`--max-peer-share`).
    pub peer_share: f64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            max_streams: 16,
            max_questions: 4,
            frame_threshold: 2.0,
            block: 32,
            frame_limits: vlm_frames::FrameLimits::default(),
            cache_bytes: 64 << 20,
            idle_timeout: std::time::Duration::from_secs(300),
            peer_share: 1.0,
        }
    }
}

/// The gateway's Watch streams: their limit, and how one opens.
pub(crate) struct Watches {
    cfg: Arc<WatchConfig>,
    open: Arc<Semaphore>,
    peers: vlm_net::PeerShare,
}

impl Watches {
    pub fn new(cfg: WatchConfig) -> Self {
        Watches {
            open: Arc::new(Semaphore::new(cfg.max_streams)),
            peers: vlm_net::PeerShare::new(
                "Watch streams",
                "--max-watch-streams",
                cfg.max_streams,
                cfg.peer_share,
            ),
            cfg: Arc::new(cfg),
        }
    }

    /// Opens a stream (RESOURCE_EXHAUSTED beyond `max_streams`) that ends at the client's
    /// `deadline`, if it set one; its events come out of the returned channel.
    pub fn open(
        &self,
        gen: &Generator,
        peer: vlm_net::Peer,
        inbound: Streaming<WatchRequest>,
        ledger: vlm_net::MessageLedger,
        deadline: Option<Instant>,
    ) -> Result<mpsc::Receiver<Result<WatchResponse, Status>>, Status> {
        let share = self.peers.take(&peer)?;
        let permit = self.open.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "gateway: {} Watch streams are open, the most this gateway serves \
                 (--max-watch-streams)",
                self.cfg.max_streams
            ))
        })?;
        let cache = vlm_cache::FeatureCache::new(
            Arc::new(budgeted_cache::BudgetedCache::new(
                self.cfg.cache_bytes,
                &gen.cfg.memory,
                &peer,
            )),
            std::time::Duration::from_secs(3600),
            vlm_tensor::TensorLimits::default(),
        );
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            cfg: self.cfg.clone(),
            gen: gen.with_cache(cache),
            out: Outbox { tx },
            state: Mutex::new(FrameState::default()),
            busy: watch::channel(Busy::default()).0,
            pending: Mutex::new(None),
            wake: Notify::new(),
            questions: Arc::new(Semaphore::new(self.cfg.max_questions)),
            peer,
            session: vlm_net::new_request_id(),
        });
        let stream = WatchStream {
            shared,
            ledger,
            deadline,
            _open: (permit, share),
        };
        let span = tracing::info_span!("vlm.watch", rpc.method = "Watch");
        tokio::spawn(stream.run(inbound).instrument(span));
        Ok(rx)
    }
}

/// What the intake, the frame worker and the questions of one stream share.
pub(super) struct Shared {
    pub cfg: Arc<WatchConfig>,
    /// Generations with the stream's own feature cache.
    pub gen: Generator,
    pub out: Outbox,
    pub state: Mutex<FrameState>,
    /// Which frame the worker is handling, and which one waits for it (questions wait until
    /// every frame they may see has been handled).
    pub busy: watch::Sender<Busy>,
    /// The frame waiting for the worker (newest wins).
    pub pending: Mutex<Option<PendingFrame>>,
    pub wake: Notify,
    /// Room for questions being answered.
    pub questions: Arc<Semaphore>,
    /// Who opened the stream: its questions' serving slots count in this peer's share.
    pub peer: vlm_net::Peer,
    /// The affinity key of the stream's questions: they go to the decoder that answered the
    /// last one (its prefix cache holds the frames' rows).
    pub session: String,
}

/// Frame indices the worker has not finished with.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Busy {
    pub handling: Option<u64>,
    pub pending: Option<u64>,
}

impl Busy {
    /// Every frame up to `index` has been handled (encoded, reused, dropped or failed).
    pub fn done_through(&self, index: u64) -> bool {
        self.handling.is_none_or(|i| i > index) && self.pending.is_none_or(|i| i > index)
    }
}

/// A frame's bytes with their charge to the gateway's memory budget (the message's, taken from
/// the stream's ledger), held as long as any copy is.
#[derive(Clone)]
pub(super) struct FrameData {
    pub bytes: Bytes,
    _charge: Option<Arc<vlm_net::BytePermit>>,
}

impl FrameData {
    pub fn new(bytes: Bytes, charge: Option<vlm_net::BytePermit>) -> Self {
        FrameData {
            bytes,
            _charge: charge.map(Arc::new),
        }
    }
}

/// A frame as received, waiting for the worker.
pub(super) struct PendingFrame {
    pub index: u64,
    pub timestamp: i64,
    pub data: FrameData,
}

/// The frame whose features are current, and the frames a question may look at.
#[derive(Default)]
pub(super) struct FrameState {
    pub current: Option<Current>,
    /// The last accepted frames (reused or encoded), oldest first: their index and the bytes of
    /// the frame whose features they use. At most `max_images` long.
    pub recent: VecDeque<(u64, FrameData)>,
    /// Where the latest change was (relative 0-1000 box).
    pub motion: Option<Region>,
    /// The worker has stopped: no more frames will be handled.
    pub closed: bool,
}

/// The frame whose features are current.
pub(super) struct Current {
    pub data: FrameData,
    pub pixels: Arc<vlm_frames::Frame>,
    /// The pixels' charge to the memory budget.
    pub _pixels_charge: vlm_net::BytePermit,
}

impl FrameState {
    /// A frame accepted: it uses the features of `data`'s frame.
    pub fn accept(&mut self, index: u64, data: FrameData, keep: usize) {
        self.recent.push_back((index, data));
        while self.recent.len() > keep.max(1) {
            self.recent.pop_front();
        }
    }
}

/// The stream's way to its client.
pub(super) struct Outbox {
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
}

impl Outbox {
    /// A frame event, or nothing if the client has fallen a whole queue behind: frame intake
    /// never waits for a client that does not read.
    pub fn frame(&self, event: FrameEvent) {
        self.try_queue(ResponseKind::Frame(event));
    }

    /// Queues `kind` if there is room; otherwise it is discarded and counted.
    fn try_queue(&self, kind: ResponseKind) {
        let msg = WatchResponse { kind: Some(kind) };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Ok(msg)) {
            let m = MeshMetrics::global();
            m.watch_events_discarded.get_or_create(&NoLabels).inc();
        }
    }

    /// Part of an answer; waits for room (only the question's own task waits). False once the
    /// client is gone.
    pub async fn answer(&self, answer: WatchAnswer) -> bool {
        let msg = WatchResponse {
            kind: Some(ResponseKind::Answer(answer)),
        };
        self.tx.send(Ok(msg)).await.is_ok()
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Counts a frame in `vlm_watch_frames{result}`.
pub(super) fn count_frame(result: WatchFrame) {
    let m = MeshMetrics::global();
    m.watch_frames
        .get_or_create(&WatchFrameLabels { result })
        .inc();
}

/// A failure of one frame or question, as sent to the client.
pub(super) fn watch_error(status: &Status) -> WatchError {
    WatchError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One open stream: its intake, and the tasks it started (aborted when it ends).
struct WatchStream {
    shared: Arc<Shared>,
    /// The charges of the client's messages (see `vlm_net::MeteredMessages`).
    ledger: vlm_net::MessageLedger,
    deadline: Option<Instant>,
    _open: (OwnedSemaphorePermit, vlm_net::PeerPermit),
}

impl WatchStream {
    async fn run(self, mut inbound: Streaming<WatchRequest>) {
        let m = MeshMetrics::global();
        // A handle on the gauge, not the family's lock guard (which must not be held across awaits).
        let open = m.watch_streams.get_or_create(&NoLabels).clone();
        open.inc();
        let mut tasks = JoinSet::new();
        let worker = frames::worker(self.shared.clone());
        tasks.spawn(worker.in_current_span());
        let mut received = 0u64;
        let refusals = Arc::new(Semaphore::new(PENDING_REFUSALS));
        let idle = self.shared.cfg.idle_timeout;
        // Idle from the start, and the first message within the bound a unary call has.
        let first_within = idle.min(vlm_net::FIRST_MESSAGE_TIMEOUT);
        let mut active = Instant::now();
        let mut any_message = false;
        let ended_well = loop {
            // Idle only while no question is being answered (the worker is always in the set).
            let bound = if any_message { idle } else { first_within };
            let idle_at = (tasks.len() <= 1).then_some(active + bound);
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = self.shared.out.closed() => break false,
                // Finished questions leave the set, so a long stream holds only live ones.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                    active = Instant::now();
                    continue;
                }
                _ = sleep_until_some(idle_at) => {
                    let why = if any_message {
                        format!(
                            "gateway: no frame or question for {} s (--watch-idle-timeout)",
                            idle.as_secs_f64()
                        )
                    } else {
                        format!(
                            "gateway: the Watch stream sent no message within {} s of opening",
                            bound.as_secs_f64()
                        )
                    };
                    let _ = self.shared.out.tx.send(Err(Status::deadline_exceeded(why))).await;
                    break false;
                }
                _ = sleep_until_some(self.deadline) => {
                    let why = "gateway: the Watch stream's deadline passed";
                    let _ = self.shared.out.tx.send(Err(Status::deadline_exceeded(why))).await;
                    break false;
                }
            };
            active = Instant::now();
            any_message = true;
            match msg {
                Ok(Some(req)) => match self.accept(req, &mut received, &mut tasks) {
                    Ok(None) => {}
                    // A question's refusal is its outcome: it waits for room like an answer, in
                    // a task of its own. The intake waits only when PENDING_REFUSALS are
                    // undelivered (a client that asks and never reads), at most the idle timeout.
                    Ok(Some(refusal)) => {
                        let room = tokio::select! {
                            room = refusals.clone().acquire_owned() => room.ok(),
                            _ = tokio::time::sleep(idle) => None,
                            _ = sleep_until_some(self.deadline) => None,
                        };
                        let Some(room) = room else {
                            break false;
                        };
                        let shared = self.shared.clone();
                        tasks.spawn(async move {
                            let _room = room;
                            shared.out.answer(refusal).await;
                        });
                    }
                    Err(status) => {
                        let _ = self.shared.out.tx.send(Err(status)).await;
                        break false;
                    }
                },
                Ok(None) => break true,
                // The client went away, broke the stream, or sent a message over its memory
                // share: it gets the status if it is still there.
                Err(status) => {
                    let _ = self.shared.out.tx.try_send(Err(status));
                    break false;
                }
            }
        };
        if ended_well {
            // Half-closed: the waiting frame and the questions asked are still answered.
            frames::close(&self.shared);
            tokio::select! {
                _ = async { while tasks.join_next().await.is_some() {} } => {}
                _ = self.shared.out.closed() => {}
            }
        }
        tasks.abort_all(); // a client that went away stops every encode and decode it started
        open.dec();
    }

    /// One client message: a frame into the slot, a question into its own task (or, beyond
    /// `max_questions`, the refusal to send).
    fn accept(
        &self,
        req: WatchRequest,
        received: &mut u64,
        tasks: &mut JoinSet<()>,
    ) -> Result<Option<WatchAnswer>, Status> {
        // The message's charge: a frame keeps it as long as its bytes are kept; anything else
        // gives it back now.
        let charge = self.ledger.take();
        match req.kind {
            Some(RequestKind::Frame(f)) => {
                let index = *received;
                *received += 1;
                frames::receive(&self.shared, index, f, charge);
                Ok(None)
            }
            Some(RequestKind::Question(q)) => {
                match self.shared.questions.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let task = questions::ask(self.shared.clone(), q, *received, permit);
                        tasks.spawn(task.in_current_span());
                        Ok(None)
                    }
                    Err(_) => Ok(Some(questions::busy(&self.shared, &q, *received))),
                }
            }
            None => Err(Status::invalid_argument(
                "gateway: a Watch message must set `frame` or `question`",
            )),
        }
    }
}
