//! OpenAI's chat-completion request and response bodies as serde types.
//!
//! Every top-level field of OpenAI's request is read, and the rest are collected by name
//! ([`super::fields`] decides what happens to each); inside nested objects unknown keys are
//! ignored (SDKs send `detail` and the like), and `null` is the same as an absent field. What is required or supported is checked
//! in [`super::convert`], with messages that name the field; a wrong JSON type is refused here, and
//! [`ApiError::from_json`] names the field's path. Objects must be JSON objects (serde's derived
//! structs would also take an array of their fields in order, see [`Obj`]).

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// `POST /v1/chat/completions`: every field of OpenAI's request, and the extensions this server
/// reads. What happens to each is in [`super::fields`] and the README's table.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Obj<Message>>>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<Value>,
    pub tools: Option<Vec<Obj<ToolDef>>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Obj<ResponseFormat>>,
    /// vLLM's structured outputs: one of json, regex, grammar (Lark) or choice.
    pub structured_outputs: Option<Obj<StructuredOutputs>>,
    /// vLLM's older names of the same.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// Token id (as a string, OpenAI's shape) → bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
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
    // Fields that only label a request: accepted, not acted on (declared so that they are not
    // taken for unknown fields).
    #[allow(dead_code)]
    pub metadata: Option<Value>,
    #[allow(dead_code)]
    pub store: Option<Value>,
    #[allow(dead_code)]
    pub service_tier: Option<Value>,
    #[allow(dead_code)]
    pub safety_identifier: Option<Value>,
    #[allow(dead_code)]
    pub prompt_cache_retention: Option<Value>,
    // Fields that would change the answer in a way this server cannot: refused when set.
    pub audio: Option<Value>,
    pub modalities: Option<Value>,
    pub prediction: Option<Value>,
    pub reasoning_effort: Option<Value>,
    pub verbosity: Option<Value>,
    pub web_search_options: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    /// Every other field, by name (logged once per name, or refused under `--strict-openai`).
    #[serde(flatten)]
    pub unknown: std::collections::BTreeMap<String, IgnoredAny>,
}

/// One entry of `tools`.
#[derive(Debug, Deserialize)]
pub struct ToolDef {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<Obj<FunctionDef>>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: Option<String>,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    /// Calls are always held to the parameters' schema; `strict` changes nothing.
    #[allow(dead_code)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none" | "auto" | "required"` or `{"type": "function", "function": {"name"}}`.
#[derive(Debug)]
pub enum ToolChoice {
    Mode(String),
    Function(String),
}

/// `response_format`.
#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub json_schema: Option<Obj<JsonSchemaFormat>>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)] // name, description and strict label the schema; the output always follows it
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Value>,
    /// The output is always held to the schema; `strict` changes nothing.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`.
#[derive(Debug, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub grammar: Option<String>,
    pub choice: Option<Vec<String>>,
}

/// One call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<Obj<CalledFunction>>,
}

#[derive(Debug, Deserialize)]
pub struct CalledFunction {
    pub name: Option<String>,
    /// JSON text, as OpenAI sends it.
    pub arguments: Option<String>,
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Named {
            #[serde(rename = "type")]
            kind: Option<String>,
            function: Option<Obj<NamedFn>>,
        }
        #[derive(Deserialize)]
        struct NamedFn {
            name: Option<String>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolChoice;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ToolChoice, E> {
                Ok(ToolChoice::Mode(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ToolChoice, A::Error> {
                let n = Named::deserialize(MapAccessDeserializer::new(map))?;
                match (n.kind.as_deref(), n.function.and_then(|f| f.0.name)) {
                    (Some("function"), Some(name)) => Ok(ToolChoice::Function(name)),
                    _ => Err(de::Error::custom(
                        "an object tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: Option<String>,
    pub content: Option<Content>,
    /// An assistant message's calls.
    pub tool_calls: Option<Vec<Obj<ToolCallIn>>>,
    /// A tool message's answer to this call.
    pub tool_call_id: Option<String>,
    /// A participant's name: a label, not rendered.
    #[allow(dead_code)]
    pub name: Option<String>,
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
    /// `null` when the answer is tool calls.
    pub content: Option<String>,
    pub refusal: Null,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One call of an answer (`message.tool_calls[i]`, and in a chunk's `delta.tool_calls` with its
/// `index`).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionOut {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
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
