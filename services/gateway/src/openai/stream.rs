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
use super::types::{
    AssistantMessage, ChatCompletion, Choice, Chunk, ChunkChoice, Delta, Usage, VlmExtra,
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

/// The whole answer, once the final message has arrived.
pub(super) async fn completion(
    pieces: impl Stream<Item = Result<Piece, ApiError>>,
    model: &str,
    created: u64,
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
                return Ok(ChatCompletion {
                    id: format!("chatcmpl-{}", f.trace_id),
                    object: "chat.completion",
                    created,
                    model: model.to_string(),
                    choices: [Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: text,
                            refusal: None,
                        },
                        logprobs: None,
                        finish_reason: finish_reason(f.finish_reason),
                    }],
                    usage: Usage::from(&f.usage.unwrap_or_default()),
                    system_fingerprint: None,
                    vlm: VlmExtra {
                        token_ids,
                        trace_id: f.trace_id,
                    },
                })
            }
        }
    }
    Err(ApiError::no_final())
}

/// Writes the chunks of one streamed answer.
struct Chunks {
    /// The id is known only at the end (it carries the trace id); chunks use a request id.
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

fn data(value: &impl Serialize) -> Event {
    Event::default()
        .json_data(value)
        .expect("chunks and errors serialise to JSON")
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

    /// The events for one piece: none for empty text; after the final message the chunk with
    /// the finish reason, the usage chunk if asked for, and `[DONE]`. An error after the response
    /// has started is one `{"error": …}` event (what the OpenAI SDKs raise), without `[DONE]`.
    fn events(&self, piece: Result<Piece, ApiError>) -> Vec<Event> {
        match piece {
            Ok(Piece::Text(d)) if d.text.is_empty() => vec![],
            Ok(Piece::Text(d)) => vec![self.chunk(
                Delta {
                    role: None,
                    content: Some(d.text),
                },
                None,
            )],
            Ok(Piece::Final(f)) => {
                let reason = finish_reason(f.finish_reason);
                let mut events = vec![self.chunk(Delta::default(), Some(reason))];
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
            Err(e) => vec![data(&e.body())],
        }
    }
}

/// The answer as Server-Sent Events in OpenAI's `chat.completion.chunk` format.
pub(super) fn sse(
    pieces: impl Stream<Item = Result<Piece, ApiError>> + Send + 'static,
    model: &str,
    created: u64,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + Send + 'static> {
    let chunks = Chunks {
        id: format!("chatcmpl-{}", vlm_net::new_request_id()),
        model: model.to_string(),
        created,
        include_usage,
    };
    let first = chunks.chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
    );
    let rest = pieces.flat_map(move |p| stream::iter(chunks.events(p)));
    Sse::new(stream::once(async { first }).chain(rest).map(Ok))
}
