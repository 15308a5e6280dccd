//! `vlm-mesh eval`: exact-match accuracy on a question set, in process or through a running mesh.
//!
//! A set is a directory with `questions.jsonl` (one `{"image", "kind", "question", "answer"}` per
//! line, image paths relative to the directory), as `models/shapes/dataset.py` writes it. Every
//! question is asked greedily as `USER: <image>\n<question> ASSISTANT:`; an answer counts when it
//! equals the expected one after [`normalize`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use vlm_model::{Device, ImageLimits, Pipeline, SamplingParams};
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::GenerateRequest;

use crate::mesh::default_state_dir;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory for the in-process run (not used with --gateway).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: PathBuf,
    /// Evaluation set: a directory with questions.jsonl and the images it names
    /// (write a fresh one with `models/shapes/dataset.py --out DIR`).
    #[arg(long, env = "VLM_EVAL_SET")]
    pub set: PathBuf,
    /// Weight quantization of the in-process run: none, q8_0 or q4_k (a mesh runs as `up
    /// --quantize` started it).
    #[arg(long, env = "VLM_QUANTIZE", default_value = "none", value_parser = crate::serve::quantize_parser())]
    pub quantize: vlm_model::Quantization,
    /// Ask this running gateway (e.g. the one `up` printed) instead of running the model in process.
    #[arg(long, env = "VLM_GATEWAY")]
    pub gateway: Option<String>,
    /// The state directory of the local mesh (`up`): its CA and client certificate are used.
    #[arg(long, env = "VLM_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// Maximum number of tokens per answer.
    #[arg(long, env = "VLM_MAX_TOKENS", default_value_t = 16)]
    pub max_tokens: u32,
    /// Requests in flight at once through the mesh.
    #[arg(long, env = "VLM_EVAL_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Evaluate only the first N questions.
    #[arg(long, env = "VLM_EVAL_LIMIT")]
    pub limit: Option<usize>,
    /// Give up on one answer after this many seconds (mesh only).
    #[arg(long, env = "VLM_TIMEOUT", default_value_t = 120)]
    pub timeout: u64,
    /// Print one JSON object: accuracy per kind and every answer.
    #[arg(long, env = "VLM_JSON")]
    pub json: bool,
}

#[derive(Deserialize, Debug, Clone)]
struct Question {
    image: String,
    kind: String,
    question: String,
    answer: String,
}

#[derive(Serialize, Debug, Clone)]
struct Answer {
    image: String,
    kind: String,
    question: String,
    expected: String,
    got: String,
    correct: bool,
    token_ids: Vec<u32>,
}

#[derive(Serialize, Debug, Default, Clone, Copy)]
struct Score {
    correct: usize,
    total: usize,
    accuracy: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    mode: &'a str,
    set: String,
    images: usize,
    questions: usize,
    /// Per question kind (colour, shape, position, …).
    accuracy: BTreeMap<String, Score>,
    overall: Score,
    seconds: f64,
    answers: Vec<Answer>,
}

/// The prompt every question is asked with (LLaVA-1.5).
pub fn prompt(question: &str) -> String {
    format!("USER: <image>\n{question} ASSISTANT:")
}

/// Lower case, single spaces, no surrounding punctuation, and one spelling for words with two
/// (colour/color, centre/center, grey/gray), so that only the content of an answer is compared.
pub fn normalize(s: &str) -> String {
    s.split_whitespace()
        .map(|w| {
            let w = w
                .trim_matches(|c: char| c.is_ascii_punctuation())
                .to_lowercase();
            match w.as_str() {
                "colour" => "color".to_string(),
                "centre" => "center".to_string(),
                "grey" => "gray".to_string(),
                _ => w,
            }
        })
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_set(dir: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Question>> {
    let path = dir.join("questions.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is --set an evaluation set?)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a question object", path.display(), i + 1))?;
        out.push(q);
    }
    if let Some(n) = limit {
        out.truncate(n);
    }
    if out.is_empty() {
        bail!("{} has no questions", path.display());
    }
    Ok(out)
}

fn read_images(
    dir: &Path,
    questions: &[Question],
) -> anyhow::Result<HashMap<String, Arc<Vec<u8>>>> {
    let mut images = HashMap::new();
    for q in questions {
        if !images.contains_key(&q.image) {
            let path = dir.join(&q.image);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read image {}", path.display()))?;
            images.insert(q.image.clone(), Arc::new(bytes));
        }
    }
    Ok(images)
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        seed: 0,
        ..Default::default()
    }
}

fn in_process(
    args: &EvalArgs,
    questions: &[Question],
    images: &HashMap<String, Arc<Vec<u8>>>,
) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let pipeline = Pipeline::load_quantized(
        &args.model,
        vlm_model::DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
        args.quantize,
    )
    .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let params = greedy(args.max_tokens);
    questions
        .iter()
        .map(|q| {
            let bytes = images[&q.image].as_slice();
            let out = pipeline
                .generate(&[bytes], &prompt(&q.question), &params, |_| {})
                .with_context(|| format!("{}: {:?}", q.image, q.question))?;
            Ok((out.text, out.token_ids))
        })
        .collect()
}

async fn connect(url: &str, state_dir: &Path) -> anyhow::Result<Channel> {
    let tls = if url.starts_with("https://") {
        let host = vlm_net::url_host(url)?;
        let files = vlm_net::TlsFiles::for_role(state_dir.join("certs"), "client");
        Some(if files.cert.exists() {
            vlm_net::client_tls(&files, &host)?
        } else {
            vlm_net::client_tls_without_identity(&files.ca, &host)?
        })
    } else {
        None
    };
    vlm_net::connect(url, tls)
        .await
        .with_context(|| format!("cannot reach the gateway at {url} (is `vlm-mesh up` running?)"))
}

async fn ask_one(
    mut client: GatewayClient<Channel>,
    image: Arc<Vec<u8>>,
    question: String,
    max_tokens: u32,
    timeout: Duration,
) -> anyhow::Result<(String, Vec<u32>)> {
    let mut req = tonic::Request::new(GenerateRequest {
        image_inputs: vec![],
        images: vec![image.as_slice().to_vec().into()],
        prompt: prompt(&question),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(max_tokens),
            top_p: 1.0,
            seed: Some(0),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    });
    req.set_timeout(timeout);
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    let mut stream = client.generate(req).await.map_err(status)?.into_inner();
    let (mut text, mut ids, mut finished) = (String::new(), Vec::new(), false);
    while let Some(msg) = stream.message().await.map_err(status)? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                text.push_str(&d.text);
                ids.extend(d.token_ids);
            }
            Some(Kind::Final(_)) => finished = true,
            None => {}
        }
    }
    if !finished {
        bail!("the answer stream ended without its final message");
    }
    Ok((text, ids))
}

async fn through_mesh(
    args: &EvalArgs,
    url: &str,
    questions: &[Question],
    images: &HashMap<String, Arc<Vec<u8>>>,
) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let client = GatewayClient::new(connect(url, &args.state_dir).await?)
        .max_encoding_message_size(256 << 20);
    let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, q) in questions.iter().enumerate() {
        let permit = permits.clone().acquire_owned().await?;
        let call = ask_one(
            client.clone(),
            images[&q.image].clone(),
            q.question.clone(),
            args.max_tokens,
            Duration::from_secs(args.timeout),
        );
        let what = format!("{}: {:?}", q.image, q.question);
        tasks.spawn(async move {
            let r = call.await.with_context(|| what);
            drop(permit);
            (i, r)
        });
    }
    let mut out = vec![None; questions.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined?;
        out[i] = Some(r?);
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every question answered"))
        .collect())
}

fn score<'a>(answers: impl Iterator<Item = &'a Answer>) -> Score {
    let (mut correct, mut total) = (0, 0);
    for a in answers {
        total += 1;
        correct += a.correct as usize;
    }
    Score {
        correct,
        total,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
    }
}

pub fn run(mut args: EvalArgs) -> anyhow::Result<()> {
    if args.gateway.is_none() {
        args.model = crate::bundled::model_dir(&args.model)?;
    }
    let questions = load_set(&args.set, args.limit)?;
    let images = read_images(&args.set, &questions)?;
    let started = Instant::now();
    let (mode, raw) = match &args.gateway {
        None => ("in-process", in_process(&args, &questions, &images)?),
        Some(url) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            (
                "mesh",
                rt.block_on(through_mesh(&args, url, &questions, &images))?,
            )
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let answers: Vec<Answer> = questions
        .into_iter()
        .zip(raw)
        .map(|(q, (got, token_ids))| Answer {
            correct: normalize(&got) == normalize(&q.answer),
            image: q.image,
            kind: q.kind,
            question: q.question,
            expected: q.answer,
            got: got.trim().to_string(),
            token_ids,
        })
        .collect();
    let mut accuracy = BTreeMap::new();
    for a in &answers {
        accuracy
            .entry(a.kind.clone())
            .or_insert_with(Score::default);
    }
    for (kind, s) in accuracy.iter_mut() {
        *s = score(answers.iter().filter(|a| &a.kind == kind));
    }
    let report = Report {
        mode,
        set: args.set.display().to_string(),
        images: images.len(),
        questions: answers.len(),
        overall: score(answers.iter()),
        accuracy,
        seconds,
        answers,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    let source = match &args.gateway {
        Some(url) => format!("through the mesh at {url}"),
        None => format!("in process, model {}", args.model.display()),
    };
    writeln!(
        stdout,
        "{} questions about {} images from {}, {source}, in {seconds:.1} s",
        report.questions, report.images, report.set
    )?;
    writeln!(
        stdout,
        "{:<10} {:>8} {:>6} {:>9}",
        "kind", "correct", "total", "accuracy"
    )?;
    let rows = report
        .accuracy
        .iter()
        .map(|(k, s)| (k.as_str(), s))
        .chain([("overall", &report.overall)]);
    for (kind, s) in rows {
        writeln!(
            stdout,
            "{kind:<10} {:>8} {:>6} {:>8.1}%",
            s.correct,
            s.total,
            100.0 * s.accuracy
        )?;
    }
    let wrong: Vec<&Answer> = report.answers.iter().filter(|a| !a.correct).collect();
    for a in wrong.iter().take(10) {
        writeln!(
            stdout,
            "  wrong: {} {:?} expected {:?}, got {:?}",
            a.image, a.question, a.expected, a.got
        )?;
    }
    if wrong.len() > 10 {
        writeln!(stdout, "  … and {} more", wrong.len() - 10)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_compares_content_only() {
        assert_eq!(normalize(" Top  Left."), "top left");
        assert_eq!(normalize("red"), normalize(" Red!"));
        assert_eq!(normalize("centre"), normalize("center"));
        assert_eq!(normalize("grey"), "gray");
        assert_ne!(normalize("top left"), normalize("top"));
        assert_ne!(
            normalize("a red star"),
            normalize("a red star and a blue circle")
        );
    }

    #[test]
    fn a_set_without_questions_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_set(dir.path(), None).is_err());
        std::fs::write(dir.path().join("questions.jsonl"), "\n").unwrap();
        let err = load_set(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("no questions"), "{err}");
        std::fs::write(dir.path().join("questions.jsonl"), "{\"image\": 1}\n").unwrap();
        let err = format!("{:#}", load_set(dir.path(), None).unwrap_err());
        assert!(err.contains(":1:"), "{err}");
    }
}
