//! `vlm-mesh`: the command line of the vision-language model mesh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod ask;
mod bench;
mod bundled;
mod certs;
mod chat;
mod eval;
mod generate;
mod listen_arg;
mod mesh;
mod region_arg;
mod serve;
mod supervise;
mod watch;

#[derive(Parser)]
#[command(
    name = "vlm-mesh",
    version,
    about = "Serve LLaVA-style vision-language models as a gRPC mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process; boxing variants would only add noise to every match.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Start the local mesh with the bundled model, ask it about the bundled image, stop it.
    Demo(DemoArgs),
    /// Start every service as its own process on loopback with dev mTLS; Ctrl-C stops all.
    Up(UpArgs),
    /// Ask a running gateway about image(s); streams the answer.
    Ask(ask::AskArgs),
    /// Wait until the mesh `up` starts with this state directory is ready (for scripts: `up &`
    /// then `wait`), and print its gateway URL. Files a killed `up` left are not taken for a
    /// running mesh.
    Wait(WaitArgs),
    /// Feed a frame sequence (a folder of images, or a pattern) to a running gateway as a live
    /// stream and ask about it as it goes; prints the answers (and, with --json, every frame's
    /// fate).
    Watch(watch::WatchArgs),
    /// Run image(s) + prompt through the whole model in this process (no network): the reference
    /// the mesh must equal token for token.
    Generate(generate::GenerateArgs),
    /// Run one service.
    #[command(subcommand)]
    Serve(serve::ServeRole),
    /// Write a development CA and per-service certificates.
    Certs(certs::CertsArgs),
    /// Benchmarks that print ratios measured side by side in one run; with no subcommand, all of
    /// them as one report.
    Bench(bench::BenchArgs),
    /// Exact-match accuracy on a question set (models/shapes/dataset.py), in process or through a mesh.
    Eval(eval::EvalArgs),
}

#[derive(Args, Debug)]
struct WaitArgs {
    /// The state directory `up` was given.
    #[arg(long, env = "VLM_STATE_DIR", default_value_os_t = mesh::default_state_dir())]
    state_dir: PathBuf,
    /// Give up after this many seconds (a large checkpoint takes a while to load).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// `vlm-mesh wait`: see [`Command::Wait`].
async fn wait(a: WaitArgs) -> anyhow::Result<()> {
    let limit = std::time::Duration::from_secs(a.timeout);
    let info = mesh::state::wait_ready(&a.state_dir, limit, true).await?;
    println!("{}", info.gateway_url);
    Ok(())
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Checkpoint directory in the Hugging Face llava-hf layout; `bundled:shapes-llava` is the
    /// demo model compiled into this binary (unpacked once into ~/.cache/vlm-mesh, or $VLM_CACHE_DIR).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    model: PathBuf,
    /// Where certificates and the mesh description (mesh.json, read by `ask`) live.
    #[arg(long, env = "VLM_STATE_DIR", default_value_os_t = mesh::default_state_dir())]
    state_dir: PathBuf,
    /// Public gateway address.
    #[arg(long, env = "VLM_LISTEN", default_value = "127.0.0.1:50051", value_parser = listen_arg::listen_addr)]
    listen: SocketAddr,
    /// Compute dtype: f32 or f16. This build computes on the CPU only, where bf16 has no matmul;
    /// `bf16` is refused at start-up with that reason.
    #[arg(long, env = "VLM_DTYPE", default_value = "f32")]
    dtype: String,
    /// Processes per stage, e.g. `encoder=2,projector=1,decoder=2` (unnamed stages: 1). The
    /// gateway balances over them and routes around replicas that fail.
    #[arg(long, env = "VLM_REPLICAS", default_value = "")]
    replicas: String,
    /// Weight quantization: `none`, `q8_0` or `q4_k` for every stage, or per stage, e.g.
    /// `decoder=q4_k,encoder=q8_0` (stages not named: none). See `serve <stage> --quantize`.
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = mesh::parse_quantize)]
    quantize: [vlm_model::Quantization; 3],
    /// What to do when a stage process dies: start it again on its address with backoff
    /// (1 s doubling to 30 s, as Kubernetes restarts a container), or leave it down. The gateway
    /// routes around it meanwhile; if the gateway itself exits, the mesh stops.
    #[arg(long, env = "VLM_RESTART", value_enum, default_value_t = supervise::RestartPolicy::OnFailure)]
    restart: supervise::RestartPolicy,
    #[command(flatten)]
    cache: serve::CacheArgs,
    #[command(flatten)]
    http: serve::HttpArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Checkpoint directory in the Hugging Face llava-hf layout; `bundled:shapes-llava` is the
    /// demo model compiled into this binary (unpacked once into ~/.cache/vlm-mesh, or $VLM_CACHE_DIR).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    model: PathBuf,
    /// Image to ask about; `bundled:demo.png` is the sample compiled into this binary.
    #[arg(long, env = "VLM_IMAGE", default_value = bundled::BUNDLED_DEMO_IMAGE)]
    image: PathBuf,
    /// The question in plain text, rendered with the model's chat template (one image
    /// placeholder, then the text), so the demo works with every supported model family.
    #[arg(
        long,
        env = "VLM_QUESTION",
        default_value = generate::DEFAULT_DEMO_QUESTION
    )]
    question: String,
    /// A raw prompt instead of --question, sent as it is (in the model's chat format, e.g. the
    /// demo model's "USER: <image>\nDescribe the image. ASSISTANT:"); warned about on stderr when
    /// it lacks the chat template's turn markers.
    #[arg(long, env = "VLM_PROMPT", conflicts_with = "question")]
    prompt: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, env = "VLM_MAX_TOKENS", default_value_t = 24)]
    max_tokens: u32,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    if let Some(key) = &args.http.api_key {
        // The gateway reads its key from the environment it inherits, not from its command line.
        // Set before any thread exists (the runtime starts below).
        std::env::set_var("VLM_API_KEY", key);
    }
    runtime()?.block_on(async {
        let opts = mesh::MeshOptions {
            model: bundled::model_dir(&args.model)?,
            state_dir: args.state_dir.clone(),
            listen: args.listen,
            dtype: args.dtype,
            gateway_args: [args.cache.to_args(), args.http.to_args()].concat(),
            service_log: None,
            replicas: mesh::parse_replicas(&args.replicas)?,
            quantize: args.quantize,
        };
        // Ctrl-C/SIGTERM are a graceful stop from here on, during start-up too.
        let shutdown = vlm_net::shutdown_signal();
        tokio::pin!(shutdown);
        let started = tokio::select! {
            biased;
            _ = &mut shutdown => None,
            m = mesh::Mesh::start(&opts) => Some(m),
        };
        let mut mesh = match started {
            Some(Ok(mesh)) => mesh,
            Some(Err(e)) if !e.is::<mesh::StoppedDuringStartup>() => return Err(e),
            // Dropping the half-started mesh sends SIGTERM to what it launched.
            _ => {
                eprintln!("stopped during start-up");
                return Ok(());
            }
        };
        let pids: Vec<String> = mesh
            .info
            .services
            .iter()
            .map(|s| format!("{}={}", s.label(), s.pid))
            .collect();
        let openai = match &mesh.info.openai_url {
            Some(url) => format!(" openai={url}"),
            None => String::new(),
        };
        println!(
            "ready gateway={}{openai} state-dir={} pids {}",
            mesh.info.gateway_url,
            args.state_dir.display(),
            pids.join(" ")
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let result = supervise::supervise(&mut mesh, args.restart, shutdown).await;
        mesh.shutdown().await;
        result
    })
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let state = tempfile::tempdir()?;
        let image = bundled::image_path(&args.image)?;
        let opts = mesh::MeshOptions {
            model: bundled::model_dir(&args.model)?,
            state_dir: state.path().to_path_buf(),
            listen: "127.0.0.1:0".parse()?,
            dtype: "f32".into(),
            gateway_args: vec![],
            service_log: Some("warn".into()),
            replicas: [1; 3],
            quantize: Default::default(),
        };
        eprintln!("starting the mesh (encoder, projector, decoder, gateway; mTLS on every hop)…");
        let mesh = mesh::Mesh::start(&opts).await?;
        eprintln!(
            "mesh ready at {}; asking about {}",
            mesh.info.gateway_url,
            image.display()
        );
        // A raw --prompt replaces the question.
        let question = match &args.prompt {
            Some(prompt) => {
                eprintln!("prompt: {prompt:?}");
                None
            }
            None => {
                eprintln!("question: {:?}", args.question);
                Some(args.question)
            }
        };
        let ask_args = ask::AskArgs {
            conn: ask::GatewayConn::local(
                mesh.info.gateway_url.clone(),
                state.path().to_path_buf(),
            ),
            image: vec![image],
            region: vec![],
            prompt: args.prompt,
            question,
            sampling: generate::SamplingArgs {
                max_tokens: Some(args.max_tokens),
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: Some(0),
                stop: vec![],
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            timeout: 120,
            json: false,
        };
        let result = ask::ask(ask_args).await;
        mesh.shutdown().await;
        result
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Progress (weights loaded, long prefills) shows by default on a terminal, like llama.cpp.
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ if on_terminal => "warn,vlm_progress=info",
        _ => "warn",
    };
    // `serve` sets telemetry up itself, inside its runtime (per-service name, OTLP export).
    if !matches!(cli.command, Command::Serve(_)) {
        if let Err(e) =
            vlm_telemetry::init("vlm-mesh", vlm_telemetry::LogFormat::Text, default_filter)
        {
            eprintln!("warning: logging not set up: {e:#}");
        }
    }
    let result = match cli.command {
        Command::Demo(args) => demo(args),
        Command::Up(args) => up(args),
        Command::Ask(args) => runtime().and_then(|rt| rt.block_on(ask::ask(args))),
        Command::Wait(args) => runtime().and_then(|rt| rt.block_on(wait(args))),
        Command::Watch(args) => runtime().and_then(|rt| rt.block_on(watch::watch(args))),
        Command::Generate(args) => generate::run(args),
        Command::Serve(role) => serve::run(role),
        Command::Certs(args) => certs::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes joined by `: `, leaving out a cause whose text the message already holds
/// (errors that print their source themselves would otherwise say it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
