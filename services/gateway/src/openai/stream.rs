//! The gateway's response stream as OpenAI answers: [`pieces`] is the one adapter that drains the
//! gRPC stream; [`completion`] folds it into one `chat.completion`, [`sse`] turns it into
//! Server-Sent Events of `chat.completion.chunk`s ending with `data: [DONE]`.
//!
//! Nothing is spawned: the stream is polled as the response is written, so a client that goes
//! away drops the response, which drops the gRPC stream and so cancels the generation.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use futures::{stream, Stream, StreamExt};
use serde::Serialize;
use tonic::Status;
use vlm_proto::generate_response::Kind;
use vlm_proto::{FinishReason, GenerateFinal, GenerateResponse, TextDelta};

use super::error::ApiError;
use super::tools::{Tools, CALL_OPEN};
use super::types::{
    AssistantMessage, ChatCompletion, Choice, Chunk, ChunkChoice, Delta, FunctionOut, ToolCallOut,
    Usage, VlmExtra,
};

/// What the gateway's stream says, in order: text, then exactly one final message, or an error.
pub(super) enum Piece {
    Text(TextDelta),
    Final(GenerateFinal),
}

/// The gateway's stream as [`Piece`]s. It ends after the final message or the first error (a
/// stream that ends without a final message ends with an error), dropping the gRPC stream.
pub(super) fn pieces<S>(grpc: S) -> impl Stream<Item = Result<Piece, ApiError>> + Send
where
    S: Stream<Item = Result<GenerateResponse, Status>> + Send + 'static,
{
    stream::unfold(Some(Box::pin(grpc)), |grpc| async move {
        let mut grpc = grpc?;
        loop {
            let last = match grpc.next().await {
                Some(Ok(GenerateResponse {
                    kind: Some(Kind::Delta(d)),
                })) => return Some((Ok(Piece::Text(d)), Some(grpc))),
                Some(Ok(GenerateResponse {
                    kind: Some(Kind::Final(f)),
                })) => Ok(Piece::Final(f)),
                Some(Ok(GenerateResponse { kind: None })) => continue,
                Some(Err(s)) => Err(ApiError::from_status(&s)),
                None => Err(ApiError::no_final()),
            };
            return Some((last, None));
        }
    })
}

fn finish_reason(r: i32) -> &'static str {
    match FinishReason::public_name_of(r) {
        "length" => "length",
        // OpenAI has no "unspecified": a final message always ends the answer.
        _ => "stop",
    }
}

/// What an answer is written with: the served name, its time, and the request's tools when the
/// answer may be calls.
pub(super) struct Answer {
    pub model: String,
    pub created: u64,
    pub tools: Option<Tools>,
}

/// `calls` as OpenAI's `tool_calls`, each with an id of its own (`index` set for chunks).
fn tool_calls(calls: Vec<(String, String)>, indexed: bool) -> Vec<ToolCallOut> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, (name, arguments))| ToolCallOut {
            index: indexed.then_some(i as u32),
            id: format!("call_{}", vlm_net::new_request_id()),
            kind: "function",
            function: FunctionOut { name, arguments },
        })
        .collect()
}

/// The whole answer, once the final message has arrived.
pub(super) async fn completion(
    pieces: impl Stream<Item = Result<Piece, ApiError>>,
    answer: Answer,
) -> Result<ChatCompletion, ApiError> {
    let mut text = String::new();
    let mut token_ids = Vec::new();
    let mut pieces = std::pin::pin!(pieces);
    while let Some(piece) = pieces.next().await {
        match piece? {
            Piece::Text(d) => {
                text.push_str(&d.text);
                token_ids.extend(d.token_ids);
            }
            Piece::Final(f) => {
                let calls = answer.tools.as_ref().and_then(|t| t.parse(&text));
                let (content, calls, reason) = match calls {
                    Some(c) => (None, Some(tool_calls(c, false)), "tool_calls"),
                    None => (Some(text), None, finish_reason(f.finish_reason)),
                };
                return Ok(ChatCompletion {
                    id: format!("chatcmpl-{}", f.trace_id),
                    object: "chat.completion",
                    created: answer.created,
                    model: answer.model,
                    choices: [Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content,
                            refusal: None,
                            tool_calls: calls,
                        },
                        logprobs: None,
                        finish_reason: reason,
                    }],
                    usage: Usage::from(&f.usage.unwrap_or_default()),
                    system_fingerprint: None,
                    vlm: VlmExtra {
                        token_ids,
                        trace_id: f.trace_id,
                    },
                });
            }
        }
    }
    Err(ApiError::no_final())
}

/// Where a streamed answer with tools stands.
enum Held {
    /// No tools: text streams as it comes.
    Off,
    /// Text held back while it may still open a call (all of it when only calls can come).
    Undecided(String),
    /// The answer opens a call: held to the end, then sent as `tool_calls`.
    ToolCalls(String),
    /// The answer is text: streams as it comes.
    Text,
}

/// Writes the chunks of one streamed answer.
struct Chunks {
    /// The id is known only at the end (it carries the trace id); chunks use a request id.
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    tools: Option<Tools>,
    calls: Held,
}

fn data(value: &impl Serialize) -> Event {
    Event::default()
        .json_data(value)
        .expect("chunks and errors serialise to JSON")
}

fn text_delta(text: String) -> Delta {
    Delta {
        content: Some(text),
        ..Delta::default()
    }
}

impl Chunks {
    fn chunk(&self, delta: Delta, finish_reason: Option<&'static str>) -> Event {
        data(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    /// Text that can be sent now (none while it may still be a call).
    fn release(&mut self, text: String) -> Option<String> {
        let calls_only = self.tools.as_ref().is_some_and(Tools::calls_only);
        match &mut self.calls {
            Held::Off | Held::Text => Some(text),
            Held::ToolCalls(held) => {
                held.push_str(&text);
                None
            }
            Held::Undecided(held) => {
                held.push_str(&text);
                if held.starts_with(CALL_OPEN) {
                    self.calls = Held::ToolCalls(std::mem::take(held));
                    None
                } else if calls_only || CALL_OPEN.starts_with(held.as_str()) {
                    None
                } else {
                    let all = std::mem::take(held);
                    self.calls = Held::Text;
                    Some(all)
                }
            }
        }
    }

    /// The events that end the answer: the held text as calls (or as text when it is not
    /// calls), the chunk with the finish reason, usage if asked for, `[DONE]`.
    fn last(&mut self, f: GenerateFinal) -> Vec<Event> {
        let mut events = vec![];
        let mut reason = finish_reason(f.finish_reason);
        let held = match std::mem::replace(&mut self.calls, Held::Text) {
            Held::Undecided(t) | Held::ToolCalls(t) => t,
            Held::Off | Held::Text => String::new(),
        };
        if !held.is_empty() {
            match self.tools.as_ref().and_then(|t| t.parse(&held)) {
                Some(calls) => {
                    let delta = Delta {
                        tool_calls: Some(tool_calls(calls, true)),
                        ..Delta::default()
                    };
                    events.push(self.chunk(delta, None));
                    reason = "tool_calls";
                }
                None => events.push(self.chunk(text_delta(held), None)),
            }
        }
        events.push(self.chunk(Delta::default(), Some(reason)));
        if self.include_usage {
            events.push(data(&Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                system_fingerprint: None,
                choices: vec![],
                usage: Some(Some(Usage::from(&f.usage.unwrap_or_default()))),
            }));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }

    /// The events for one piece: none for empty or held text; after the final message those of
    /// [`Self::last`]. An error after the response has started is one `{"error": …}` event (what
    /// the OpenAI SDKs raise), without `[DONE]`.
    fn events(&mut self, piece: Result<Piece, ApiError>) -> Vec<Event> {
        match piece {
            Ok(Piece::Text(d)) if d.text.is_empty() => vec![],
            Ok(Piece::Text(d)) => match self.release(d.text) {
                Some(text) => vec![self.chunk(text_delta(text), None)],
                None => vec![],
            },
            Ok(Piece::Final(f)) => self.last(f),
            Err(e) => vec![data(&e.body())],
        }
    }
}

/// The answer as Server-Sent Events in OpenAI's `chat.completion.chunk` format.
pub(super) fn sse(
    pieces: impl Stream<Item = Result<Piece, ApiError>> + Send + 'static,
    answer: Answer,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + Send + 'static> {
    let calls = match answer.tools {
        Some(_) => Held::Undecided(String::new()),
        None => Held::Off,
    };
    let mut chunks = Chunks {
        id: format!("chatcmpl-{}", vlm_net::new_request_id()),
        model: answer.model,
        created: answer.created,
        include_usage,
        tools: answer.tools,
        calls,
    };
    let first = chunks.chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        },
        None,
    );
    let rest = pieces.flat_map(move |p| stream::iter(chunks.events(p)));
    Sse::new(stream::once(async { first }).chain(rest).map(Ok))
}
