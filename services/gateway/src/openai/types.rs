//! OpenAI's chat-completion request and response bodies as serde types.
//!
//! Requests are read tolerantly, as this endpoint always did: unknown fields are ignored at every
//! level (SDKs send `detail`, `response_format` and the like, which this server has no use
//! for), and `null` is the same as an absent field. What is required or supported is checked
//! in [`super::convert`], with messages that name the field; a wrong JSON type is refused here, and
//! [`ApiError::from_json`] names the field's path. Objects must be JSON objects (serde's derived
//! structs would also take an array of their fields in order, see [`Obj`]).

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// A request body: the JSON object, or the error that names what is wrong with it.
pub(super) fn parse_request(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let Obj(req) = serde_path_to_error::deserialize(&mut de).map_err(ApiError::from_json)?;
    de.end().map_err(|e| ApiError::not_json(&e))?;
    Ok(req)
}

/// `T` read from a JSON object only.
#[derive(Debug)]
pub struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Obj)
    }
}

/// `POST /v1/chat/completions`: the fields this server reads.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Obj<Message>>>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    /// Only an empty list is accepted (the elements are not read).
    pub tools: Option<Vec<IgnoredAny>>,
    /// Wins over the older `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub max_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as vLLM and others do.
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    /// OpenAI's penalties, applied by the decoder's sampler with vLLM's semantics.
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<Obj<StreamOptions>>,
    /// The routing affinity key (a session's requests go to the decoder that holds its
    /// prefix); `user` when it is absent.
    pub prompt_cache_key: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: Option<String>,
    pub content: Option<Content>,
}

/// A message's content: a string, or a list of parts.
#[derive(Debug)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

/// An `image_url` part's image: `{"url": …}`, or the URL itself as some clients send it.
#[derive(Debug)]
pub enum ImageUrl {
    Bare(String),
    Object(ImageUrlObject),
}

#[derive(Debug, Deserialize)]
pub struct ImageUrlObject {
    pub url: Option<String>,
    /// vlm-mesh extension: regions of interest of this image, `[x0, y0, x1, y1]` in relative
    /// coordinates 0–1000 (README, "Regions of interest").
    pub regions: Option<Vec<[u32; 4]>>,
}

/// `stop`: one string or a list of them.
#[derive(Debug)]
pub struct Stop(pub Vec<String>);

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of parts")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(Obj(p)) = seq.next_element()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with a url, or a URL string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ImageUrl, E> {
                Ok(ImageUrl::Bare(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ImageUrl, A::Error> {
                ImageUrlObject::deserialize(MapAccessDeserializer::new(map)).map(ImageUrl::Object)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Stop, E> {
                Ok(Stop(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut stops = Vec::new();
                while let Some(s) = seq.next_element()? {
                    stops.push(s);
                }
                Ok(Stop(stops))
            }
        }
        d.deserialize_any(V)
    }
}

/// OpenAI's `usage`, with the decoder's prefix-cache hits as `prompt_tokens_details.cached_tokens`.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<&vlm_proto::Usage> for Usage {
    fn from(u: &vlm_proto::Usage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_prompt_tokens,
            },
        }
    }
}

/// Always `null` here (`logprobs`, `refusal`, `system_fingerprint`).
pub type Null = Option<()>;

/// A whole (non-streamed) answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: [Choice; 1],
    pub usage: Usage,
    pub system_fingerprint: Null,
    /// Not part of OpenAI's schema (clients ignore it): what the gRPC API reports.
    pub vlm: VlmExtra,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Null,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    pub refusal: Null,
}

#[derive(Debug, Serialize)]
pub struct VlmExtra {
    pub token_ids: Vec<u32>,
    pub trace_id: String,
}

/// One `chat.completion.chunk` of a streamed answer.
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: Null,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless the client asked for usage; then `null` in every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds: the role (first chunk), text, or nothing (the chunk with the finish reason).
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `GET /v1/models/{id}`, and each entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct Model<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<Model<'a>>,
}
