//! The endpoint's routes and layers, with a gateway the test drives: each `generate` hands the
//! test its request and a channel for the answer, so requests stay open exactly as long as the
//! test wants (no sleeps).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tower::ServiceExt;
use vlm_proto::generate_response::Kind;
use vlm_proto::{
    FinishReason, GenerateFinal, GenerateResponse, GetModelInfoRequest, ModelInfo, TextDelta, Usage,
};

use super::*;

type Reply = Result<GenerateResponse, Status>;

/// One generation the test answers.
struct Call {
    request: GenerateRequest,
    reply: mpsc::Sender<Reply>,
}

struct FakeGateway {
    calls: mpsc::UnboundedSender<Call>,
}

#[tonic::async_trait]
impl Gateway for FakeGateway {
    type GenerateStream = ReceiverStream<Reply>;
    type WatchStream = ReceiverStream<Result<vlm_proto::WatchResponse, Status>>;

    async fn watch(
        &self,
        _: tonic::Request<tonic::Streaming<vlm_proto::WatchRequest>>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "the OpenAI endpoint never opens a Watch stream",
        ))
    }

    async fn generate(
        &self,
        request: tonic::Request<GenerateRequest>,
    ) -> Result<tonic::Response<Self::GenerateStream>, Status> {
        let (reply, rx) = mpsc::channel(16);
        let request = request.into_inner();
        self.calls.send(Call { request, reply }).unwrap();
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn get_model_info(
        &self,
        _: tonic::Request<GetModelInfoRequest>,
    ) -> Result<tonic::Response<ModelInfo>, Status> {
        Ok(tonic::Response::new(ModelInfo {
            model_id: "tiny-llava".into(),
            // What a decoder serving a checkpoint without a template reports.
            chat_template: Some(vlm_proto::ChatTemplate {
                template: include_str!(
                    "../../../../../shared/model/src/llava_1_5_chat_template.jinja"
                )
                .into(),
                source: "built-in LLaVA-1.5 template".into(),
                image_token: "<image>".into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

struct Harness {
    app: NormalizePath<Router>,
    /// The endpoint's admission (what a gRPC port beside it would share).
    gate: vlm_net::AdmissionGate,
    calls: mpsc::UnboundedReceiver<Call>,
}

impl Harness {
    /// An endpoint (LLaVA-1.5 template) with these limits (`max_concurrent_requests` slots, no
    /// queue, a 1 GiB memory budget); `tweak` may change it further.
    async fn with(
        max_body_bytes: usize,
        max_concurrent_requests: usize,
        tweak: impl FnOnce(&mut OpenAiEndpoint<FakeGateway>),
    ) -> Self {
        Self::with_budget(max_body_bytes, max_concurrent_requests, 1 << 30, tweak).await
    }

    async fn with_budget(
        max_body_bytes: usize,
        max_concurrent_requests: usize,
        memory_bytes: u64,
        tweak: impl FnOnce(&mut OpenAiEndpoint<FakeGateway>),
    ) -> Self {
        let gate = vlm_net::AdmissionGate::new(
            "vlm.v1.Gateway",
            vlm_net::AdmissionLimits {
                max_in_flight: max_concurrent_requests,
                max_queue: 0,
            },
            vlm_net::ByteBudget::new("vlm.v1.Gateway", memory_bytes, 0),
        );
        let (tx, calls) = mpsc::unbounded_channel();
        let cfg = OpenAiConfig {
            model_id: "tiny-llava".into(),
            aliases: vec![],
            api_key: None,
            allow_image_urls: false,
            allow_private_image_urls: false,
            max_images: 8,
            max_body_bytes,
            max_image_bytes: 1 << 20,
            templates: Default::default(),
            admission: gate.clone(),
            strict_openai: false,
        };
        let mut endpoint = OpenAiEndpoint::new(Arc::new(FakeGateway { calls: tx }), cfg).unwrap();
        tweak(&mut endpoint);
        Harness {
            app: Arc::new(endpoint).app(),
            gate,
            calls,
        }
    }

    async fn new() -> Self {
        Self::with(1 << 20, 8, |_| {}).await
    }

    async fn send(&self, req: Request<Body>) -> Response {
        self.app.clone().oneshot(req).await.unwrap()
    }

    /// Sends `req` in the background and returns once the gateway has it.
    async fn start(&mut self, req: Request<Body>) -> (tokio::task::JoinHandle<Response>, Call) {
        let app = self.app.clone();
        let pending = tokio::spawn(async move { app.oneshot(req).await.unwrap() });
        let call = self.calls.recv().await.unwrap();
        (pending, call)
    }

    /// Sends `req`, which must be answered without starting a generation (a request that
    /// wrongly reaches the gateway fails the test instead of waiting for an answer).
    async fn refused(&mut self, req: Request<Body>) -> Response {
        let app = self.app.clone();
        tokio::select! {
            resp = app.oneshot(req) => resp.unwrap(),
            call = self.calls.recv() => panic!("the gateway was called: {:?}", call.map(|c| c.request.prompt)),
        }
    }
}

fn chat(body: Value) -> Request<Body> {
    let body = body.to_string();
    Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}

fn hello(extra: Value) -> Value {
    let mut body = json!({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

async fn text_of(resp: Response) -> String {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The status and JSON body; an error must be in OpenAI's shape.
async fn json_of(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let content_type = resp.headers()[header::CONTENT_TYPE].clone();
    assert_eq!(content_type, "application/json");
    let body: Value = serde_json::from_str(&text_of(resp).await).unwrap();
    if status >= 400 {
        let error = body["error"].as_object().unwrap();
        for key in ["message", "type", "param", "code"] {
            assert!(error.contains_key(key), "no {key} in {body}");
        }
    }
    (status, body)
}

fn delta(text: &str, token_ids: &[u32]) -> Reply {
    Ok(GenerateResponse {
        kind: Some(Kind::Delta(TextDelta {
            text: text.into(),
            token_ids: token_ids.to_vec(),
        })),
    })
}

fn last(reason: FinishReason) -> Reply {
    Ok(GenerateResponse {
        kind: Some(Kind::Final(GenerateFinal {
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cached_prompt_tokens: 4,
            }),
            trace_id: "ab".repeat(16),
            finish_reason: reason as i32,
            ..Default::default()
        })),
    })
}

async fn answer(call: &Call, replies: Vec<Reply>) {
    for r in replies {
        call.reply.send(r).await.unwrap();
    }
}

/// Waits (bounded, so a failure does not hang the suite) until the generation's stream is dropped.
async fn cancelled(call: &Call) {
    tokio::time::timeout(Duration::from_secs(10), call.reply.closed())
        .await
        .expect("the generation was not cancelled");
}

mod answers;
mod auth;
mod limits;
mod structured;
