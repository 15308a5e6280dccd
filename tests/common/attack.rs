//! What the hostile-input tests share: a request, its outcome, the services `up` started, and the
//! check that every one of them survived an attack with bounded memory.

use std::time::Duration;

use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateRequest, SamplingParams};

use super::{bounded, next_message, pid_alive, MeshProc, PROMPT};

/// Peak resident memory any stage of the tiny model may reach while being attacked. A healthy
/// tiny-model stage peaks around 100–200 MiB; the attacks below once asked for 2–68 GB.
pub const STAGE_PEAK_RSS_BOUND_KIB: u64 = 1 << 20;

pub fn ask(image: Vec<u8>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        image_inputs: vec![],
        images: vec![image.into()],
        prompt: PROMPT.into(),
        params: Some(SamplingParams {
            max_tokens: Some(max_tokens),
            top_p: 1.0,
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    }
}

/// The request's answer (its token count), or the status it failed with.
pub async fn run(mesh: &MeshProc, req: GenerateRequest) -> Result<usize, tonic::Status> {
    let mut client = mesh.client().await;
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(120));
    let mut stream = bounded("the call", client.generate(r)).await?.into_inner();
    let mut tokens = 0;
    while let Some(msg) = next_message(&mut stream).await? {
        if let Some(Kind::Delta(d)) = msg.kind {
            tokens += d.token_ids.len();
        }
    }
    Ok(tokens)
}

/// (label, pid) of every service `up` started.
pub fn services(mesh: &MeshProc) -> Vec<(String, u64)> {
    mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!("{}#{}", s["role"].as_str().unwrap(), s["replica"]),
                s["pid"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Peak resident set size (VmHWM) of a live process, in KiB.
pub fn peak_rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Every service started is still the same live process, and none peaked above the bound.
pub fn assert_all_alive_and_bounded(mesh: &MeshProc, before: &[(String, u64)]) {
    assert_eq!(services(mesh), before, "a service was restarted");
    for (label, pid) in before {
        assert!(pid_alive(*pid), "{label} (pid {pid}) died");
        let peak = peak_rss_kib(*pid);
        eprintln!("{label}: peak RSS {} MiB", peak / 1024);
        assert!(
            peak < STAGE_PEAK_RSS_BOUND_KIB,
            "{label} peaked at {peak} KiB (bound {STAGE_PEAK_RSS_BOUND_KIB} KiB)"
        );
    }
}

/// The decoder's Generate, called directly as a mesh peer would, with this setup; the status it
/// ends with (or OK once it starts answering).
pub async fn decode_setup(
    mesh: &MeshProc,
    setup: vlm_proto::DecodeSetup,
) -> Result<(), tonic::Status> {
    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "gateway");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let url = format!("https://{}", mesh.service_addr("decoder"));
    let channel = vlm_net::connect(&url, Some(tls)).await.unwrap();
    let mut client = vlm_proto::decoder_client::DecoderClient::new(channel);
    let first = vlm_proto::DecodeRequest {
        kind: Some(vlm_proto::decode_request::Kind::Setup(setup)),
    };
    let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
    req.set_timeout(Duration::from_secs(60));
    let mut events = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    next_message(&mut events).await.map(|_| ())
}
