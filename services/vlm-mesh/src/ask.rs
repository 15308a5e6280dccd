//! `vlm-mesh ask`: a client of the gateway's public API.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::GenerateRequest;

use crate::generate::SamplingArgs;
use crate::mesh::state::{read_state, wait_ready, MeshState};
use crate::mesh::{certs_dir, default_state_dir};

/// Where the gateway is and how to trust it (shared by `ask` and `watch`).
#[derive(Args, Debug, Clone)]
pub struct GatewayConn {
    /// Gateway URL; defaults to the mesh `up` started with the same --state-dir, else https://127.0.0.1:50051.
    #[arg(long, env = "VLM_GATEWAY")]
    pub gateway: Option<String>,
    /// The state directory of a local mesh (`up`): its CA and client certificate are used.
    #[arg(long, env = "VLM_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// CA certificate that signed the gateway's certificate (overrides --state-dir).
    #[arg(long, env = "VLM_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate to present (optional on the public port).
    #[arg(long, env = "VLM_TLS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long, env = "VLM_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl GatewayConn {
    /// The gateway `up` started with `state_dir`.
    pub fn local(gateway: String, state_dir: PathBuf) -> Self {
        GatewayConn {
            gateway: Some(gateway),
            state_dir,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AskArgs {
    #[command(flatten)]
    pub conn: GatewayConn,
    /// Image file; repeat for several images (one image placeholder each in the prompt).
    #[arg(long, env = "VLM_IMAGE")]
    pub image: Vec<PathBuf>,
    /// The question in plain text, e.g. "What is shown in this image?". The gateway renders it
    /// with the model's chat template (as the OpenAI endpoint renders its messages): one user
    /// turn with one image placeholder per --image, then the text. Give this or --prompt.
    #[arg(long, env = "VLM_QUESTION", required_unless_present = "prompt")]
    pub question: Option<String>,
    /// The raw prompt, sent as it is: in the model's chat format, with the checkpoint's image
    /// placeholder where each image goes (LLaVA-1.5: "USER: <image>\nWhat is this? ASSISTANT:";
    /// GLM-4.1V: its own format and `<|image|>`). A prompt without the chat template's turn
    /// markers gets a warning on stderr (the model tends to answer nonsense); use --question for
    /// plain text.
    #[arg(long, env = "VLM_PROMPT", conflicts_with = "question")]
    pub prompt: Option<String>,
    /// A region of interest, `[IMAGE:]x0,y0,x1,y1` in relative coordinates 0–1000 (IMAGE counts
    /// from 0, default the first). Repeatable. Each region is cropped from the image at full
    /// resolution and encoded as one more image; its rows follow the image's at the image's
    /// `<image>` (README, "Regions of interest").
    #[arg(long, env = "VLM_REGION", value_parser = crate::region_arg::parse)]
    pub region: Vec<crate::region_arg::RegionArg>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Give up after this many seconds (sent to the gateway as the request deadline).
    #[arg(long, env = "VLM_TIMEOUT", default_value_t = 300)]
    pub timeout: u64,
    /// Print one JSON object instead of streaming text.
    #[arg(long, env = "VLM_JSON")]
    pub json: bool,
}

#[derive(Serialize, Default)]
struct Timings {
    preprocess_ms: f64,
    encode_ms: f64,
    project_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
    total_ms: f64,
    cache_ms: f64,
    /// Per image: "hit", "miss", "error" or "off".
    cache: Vec<&'static str>,
    /// Per image slot (each image, then its regions): grid, views, the views encoded (the rest came
    /// from the cache), rows.
    images: Vec<ImageReport>,
}

#[derive(Serialize, Default)]
struct ImageReport {
    image: u32,
    region: Option<[u32; 4]>,
    grid: [u32; 2],
    views: u32,
    encoded_views: Vec<u32>,
    rows: u32,
}

#[derive(Serialize, Default)]
struct JsonOutput {
    text: String,
    token_ids: Vec<u32>,
    prompt_tokens: u32,
    finish_reason: String,
    seed: u64,
    timings: Timings,
    trace_id: String,
}

/// The gateway of the mesh `up` runs with `state_dir`: at once when it is ready; after waiting
/// (at most `wait`, saying so on stderr) when it is starting; the default address when the state
/// directory describes no mesh; an error when it describes one whose `up` has exited.
async fn local_gateway(state_dir: &std::path::Path, wait: Duration) -> anyhow::Result<String> {
    match read_state(state_dir)? {
        MeshState::Ready(info) => Ok(info.gateway_url),
        MeshState::Starting(s) => {
            eprintln!(
                "ask: the mesh is starting (`vlm-mesh up`, pid {}, gateway on {}); waiting up to {} s for it to be ready",
                s.launcher_pid,
                s.gateway_listen,
                wait.as_secs()
            );
            Ok(wait_ready(state_dir, wait, false).await?.gateway_url)
        }
        MeshState::Stale { file, pid } => anyhow::bail!(
            "{} describes a mesh whose `vlm-mesh up` (pid {pid}) is no longer running: start one \
             with `vlm-mesh up`, or pass --gateway URL",
            file.display()
        ),
        MeshState::Absent => Ok("https://127.0.0.1:50051".to_string()),
    }
}

/// The gateway URL and TLS settings `ask` uses; a local mesh that is starting is waited for, at
/// most `wait`.
pub async fn connect(args: &GatewayConn, wait: Duration) -> anyhow::Result<(String, Channel)> {
    let url = match &args.gateway {
        Some(u) => u.clone(),
        None => local_gateway(&args.state_dir, wait).await?,
    };
    if !url.contains("://") {
        anyhow::bail!(
            "--gateway {url:?} needs a scheme: use https://{url} (the gateway speaks TLS; \
             http:// reaches only a gateway started with VLM_PLAINTEXT=true)"
        );
    }
    let tls = if url.starts_with("https://") {
        let certs = certs_dir(&args.state_dir);
        let ca = args.ca.clone().unwrap_or_else(|| certs.join("ca.pem"));
        if !ca.exists() {
            anyhow::bail!("{}", missing_ca_message(args, &ca));
        }
        let host = vlm_net::url_host(&url)?;
        let (cert, key) = match (&args.cert, &args.key) {
            (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
            _ if args.ca.is_none() && certs.join("client.pem").exists() => (
                Some(certs.join("client.pem")),
                Some(certs.join("client.key")),
            ),
            _ => (None, None),
        };
        Some(match (cert, key) {
            (Some(cert), Some(key)) => {
                vlm_net::client_tls(&vlm_net::TlsFiles { ca, cert, key }, &host)?
            }
            _ => vlm_net::client_tls_without_identity(&ca, &host)?,
        })
    } else {
        None
    };
    match vlm_net::connect(&url, tls).await {
        Ok(channel) => Ok((url, channel)),
        Err(e) => Err(explain_plaintext(&url, anyhow::Error::new(e))
            .await
            .context(format!(
                "cannot reach the gateway at {url} (is `vlm-mesh up` running?)"
            ))),
    }
}

/// What to do when the CA file `ask` would use does not exist.
fn missing_ca_message(args: &GatewayConn, ca: &std::path::Path) -> String {
    match &args.ca {
        Some(_) => format!(
            "the CA certificate given with --ca, {}, does not exist",
            ca.display()
        ),
        None => format!(
            "no CA certificate at {}: the gateway speaks TLS and ask verifies it. Start a local \
             mesh with `vlm-mesh up` (it writes its CA there), pass the --state-dir your mesh was \
             started with, or give the CA that signed the gateway's certificate with --ca FILE",
            ca.display()
        ),
    }
}

/// `err` from a plaintext (`http://`) URL, replaced by a clear message when the port answers
/// TLS instead of plaintext HTTP/2: a TLS gateway reached with http:// otherwise fails with
/// `Unknown: transport error`.
pub(crate) async fn explain_plaintext(url: &str, err: anyhow::Error) -> anyhow::Error {
    if !url.starts_with("http://") || speaks_plaintext_h2(url).await != Some(false) {
        return err;
    }
    let https = url.replacen("http://", "https://", 1);
    anyhow::anyhow!(
        "the gateway at {url} does not speak plaintext HTTP/2: it speaks TLS; use {https}"
    )
}

/// Sends the HTTP/2 connection preface and an empty SETTINGS frame to `url`'s port: `Some(true)`
/// if it answers with an HTTP/2 SETTINGS frame, `Some(false)` if it answers anything else or
/// closes (a TLS server sends an alert or hangs up), `None` if it cannot be reached at all.
async fn speaks_plaintext_h2(url: &str) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: tonic::codegen::http::Uri = url.parse().ok()?;
    let addr = format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(80));
    let limit = Duration::from_secs(3);
    let mut tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, no parameters
    tcp.write_all(&hello).await.ok()?;
    let mut head = [0u8; 9];
    let read = tokio::time::timeout(limit, tcp.read_exact(&mut head)).await;
    // A frame header: 24-bit length, then type 4 (SETTINGS).
    Some(matches!(read, Ok(Ok(_)) if head[3] == 4))
}

pub async fn ask(args: AskArgs) -> anyhow::Result<()> {
    let images = args
        .image
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(Into::into)
                .with_context(|| format!("cannot read image {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<tonic::codegen::Bytes>>>()?;
    let regions = crate::region_arg::per_image(&args.region, images.len())?;
    let (url, channel) = connect(&args.conn, Duration::from_secs(args.timeout)).await?;
    let mut client = GatewayClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(256 << 20);
    let unchecked = match &args.prompt {
        Some(prompt) => crate::chat::check_raw_prompt(&mut client, prompt).await,
        None => None,
    };
    let params = args.sampling.to_request_params();
    let seed = params.seed.unwrap_or_default();
    let mut req = tonic::Request::new(GenerateRequest {
        // Regions need `image_inputs`; plain images keep the older field.
        image_inputs: if args.region.is_empty() {
            vec![]
        } else {
            images
                .iter()
                .zip(&regions)
                .map(|(data, rs)| vlm_proto::ImageInput {
                    data: data.clone(),
                    regions: rs
                        .iter()
                        .map(|r| vlm_proto::Region {
                            x0: r.x0,
                            y0: r.y0,
                            x1: r.x1,
                            y1: r.y1,
                        })
                        .collect(),
                })
                .collect()
        },
        images: if args.region.is_empty() {
            images
        } else {
            vec![]
        },
        prompt: args.prompt.clone().unwrap_or_default(),
        question: args.question.clone().unwrap_or_default(),
        params: Some(params),
        monitor_layers: false,
    });
    req.set_timeout(Duration::from_secs(args.timeout));
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(explain_plaintext(&url, status_error(s)).await),
    };
    if let Some(w) = unchecked {
        eprintln!("{w}");
    }
    let mut out = JsonOutput {
        seed,
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                if !args.json {
                    stdout.write_all(d.text.as_bytes())?;
                    stdout.flush()?;
                }
                out.text.push_str(&d.text);
                out.token_ids.extend(d.token_ids);
            }
            Some(Kind::Final(f)) => {
                let usage = f.usage.unwrap_or_default();
                let t = f.timings.unwrap_or_default();
                out.prompt_tokens = usage.prompt_tokens;
                out.finish_reason = finish_reason_name(f.finish_reason).to_string();
                out.trace_id = f.trace_id;
                out.timings = Timings {
                    preprocess_ms: t.preprocess_ms,
                    encode_ms: t.encode_ms,
                    project_ms: t.project_ms,
                    prefill_ms: t.prefill_ms,
                    decode_ms: t.decode_ms,
                    total_ms: t.total_ms,
                    cache_ms: t.cache_ms,
                    cache: t.cache.iter().map(|&c| cache_status_name(c)).collect(),
                    images: t
                        .images
                        .iter()
                        .map(|r| ImageReport {
                            image: r.image,
                            region: r.region.map(|b| [b.x0, b.y0, b.x1, b.y1]),
                            grid: [r.grid_rows, r.grid_cols],
                            views: r.views,
                            encoded_views: r.encoded_views.clone(),
                            rows: r.rows,
                        })
                        .collect(),
                };
            }
            None => {}
        }
    }
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout)?;
        let t = &out.timings;
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}, cache: {}] preprocess {:.1} ms, encode {:.1} ms, project {:.1} ms, prefill {:.1} ms, decode {:.1} ms, total {:.1} ms, trace {}",
            out.prompt_tokens,
            out.token_ids.len(),
            out.finish_reason,
            t.cache.join(","),
            t.preprocess_ms,
            t.encode_ms,
            t.project_ms,
            t.prefill_ms,
            t.decode_ms,
            t.total_ms,
            out.trace_id
        );
    }
    Ok(())
}

pub fn cache_status_name(v: i32) -> &'static str {
    match vlm_proto::CacheStatus::try_from(v) {
        Ok(vlm_proto::CacheStatus::Off) => "off",
        Ok(vlm_proto::CacheStatus::Hit) => "hit",
        Ok(vlm_proto::CacheStatus::Miss) => "miss",
        Ok(vlm_proto::CacheStatus::Error) => "error",
        _ => "unspecified",
    }
}

pub fn finish_reason_name(v: i32) -> &'static str {
    vlm_proto::FinishReason::public_name_of(v)
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
