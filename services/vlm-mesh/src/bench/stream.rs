//! How fast tensors move: an Encode response stream of feature chunks over mTLS gRPC (the
//! services' own server and channel set-up, chunking, CRC-32C and reassembly) vs a raw TLS byte
//! stream of the same payload on the same loopback (the limit), interleaved.
//!
//! The gRPC side is a stand-in encoder that answers every Encode call with a tensor chunked once in
//! advance, so the time is the transport's, not the vision tower's. The receiver verifies every
//! chunk (order, CRC-32C, sizes) without decoding it, as the gateway does when it relays features.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tonic::{Request, Response, Status};
use vlm_proto::encode_response::Kind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncodeStats, EncoderInfo, EncoderInfoRequest};
use vlm_tensor::{TensorAssembler, TensorChunk, TensorChunker, TensorLimits, WireDType};

use super::{print_ratio, print_rows, Spread};

#[derive(Args, Debug)]
pub struct StreamBenchArgs {
    /// Interleaved gRPC/raw pairs per tensor size.
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// Smoke run: 3 rounds (for CI; its times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The tensors LLaVA-1.5 moves between stages: CLIP ViT-L/336 features and their projection to
/// LLaMA-7B's width, in f16.
const CASES: [(usize, usize); 2] = [(576, 1024), (576, 4096)];

#[derive(serde::Serialize, Debug)]
pub struct StreamReport {
    bench: &'static str,
    rounds: usize,
    /// Largest chunk payload (the services' default).
    chunk_bytes: usize,
    cases: Vec<StreamCase>,
}

#[derive(serde::Serialize, Debug)]
struct StreamCase {
    shape: [usize; 2],
    dtype: &'static str,
    bytes: usize,
    chunks: usize,
    /// Request sent → last chunk received and verified.
    grpc_mtls_ms: Spread,
    /// Request sent → last payload byte read.
    raw_tls_ms: Spread,
    /// GB/s (10⁹ bytes) at the p50 times.
    grpc_gb_per_s: f64,
    raw_gb_per_s: f64,
    /// gRPC throughput / raw TLS throughput (raw p50 / gRPC p50).
    grpc_over_raw_p50: f64,
}

impl StreamReport {
    pub fn print(&self) {
        println!(
            "rounds: {} per size (interleaved), chunks of up to {} KiB",
            self.rounds,
            self.chunk_bytes / 1024
        );
        for c in &self.cases {
            let name = format!(
                "{}x{} {} ({} B, {} chunks)",
                c.shape[0], c.shape[1], c.dtype, c.bytes, c.chunks
            );
            println!("{name}");
            print_rows(
                "ms",
                &[
                    ("  chunk stream, gRPC over mTLS".to_string(), c.grpc_mtls_ms),
                    ("  raw TLS byte stream".to_string(), c.raw_tls_ms),
                ],
            );
            println!(
                "  {:<42} {:>10.2} {:>10.2}",
                "GB/s at p50: gRPC, raw", c.grpc_gb_per_s, c.raw_gb_per_s
            );
            print_ratio("  gRPC / raw TLS throughput (p50)", c.grpc_over_raw_p50);
        }
    }
}

/// Answers each Encode call with the pre-chunked tensor named by the request's `image` bytes
/// (`"ROWSxDIM"`).
#[derive(Clone)]
struct CannedEncoder {
    tensors: Arc<HashMap<Vec<u8>, Vec<TensorChunk>>>,
}

type EncodeStream =
    Pin<Box<dyn futures::Stream<Item = Result<EncodeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Encoder for CannedEncoder {
    type EncodeStream = EncodeStream;

    async fn encode(&self, req: Request<EncodeRequest>) -> Result<Response<EncodeStream>, Status> {
        let chunks = self
            .tensors
            .get(req.get_ref().image.as_ref())
            .ok_or_else(|| Status::invalid_argument("unknown benchmark tensor"))?
            .clone();
        let out = chunks
            .into_iter()
            .map(|c| {
                Ok(EncodeResponse {
                    kind: Some(Kind::Chunk(c)),
                })
            })
            .chain(std::iter::once(Ok(EncodeResponse {
                kind: Some(Kind::Stats(EncodeStats::default())),
            })));
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn plan(
        &self,
        _: Request<EncodeRequest>,
    ) -> Result<Response<vlm_proto::ImagePlan>, Status> {
        Err(Status::unimplemented("the benchmark encoder only streams"))
    }

    async fn info(&self, _: Request<EncoderInfoRequest>) -> Result<Response<EncoderInfo>, Status> {
        Ok(Response::new(EncoderInfo::default()))
    }
}

fn key(rows: usize, dim: usize) -> Vec<u8> {
    format!("{rows}x{dim}").into_bytes()
}

/// One Encode call: the reassembled payload's size and chunk count.
async fn grpc_once(
    client: &mut EncoderClient<tonic::transport::Channel>,
    rows: usize,
    dim: usize,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = client
        .encode(EncodeRequest {
            region: None,
            views: vec![],
            image: key(rows, dim).into(),
            options: None,
            layout_only: false,
        })
        .await?
        .into_inner();
    let mut asm = TensorAssembler::new(TensorLimits::default());
    while let Some(msg) = stream.message().await? {
        if let Some(Kind::Chunk(c)) = msg.kind {
            asm.verify(&c)?;
        }
    }
    asm.finish()?;
    Ok((asm.bytes_received(), asm.chunks_received()))
}

/// Asks the raw server for `buf.len()` bytes and reads them all.
async fn raw_once(
    conn: &mut tokio_rustls::client::TlsStream<TcpStream>,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    conn.write_all(&(buf.len() as u64).to_le_bytes()).await?;
    conn.flush().await?;
    conn.read_exact(buf).await?;
    Ok(())
}

/// Serves raw TLS connections: for each 8-byte little-endian length read, writes that many bytes.
async fn raw_server(
    listener: TcpListener,
    acceptor: vlm_net::HttpTlsAcceptor,
    payload: Arc<Vec<u8>>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, payload) = (acceptor.clone(), payload.clone());
        tokio::spawn(async move {
            tcp.set_nodelay(true)?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut len = [0u8; 8];
            while tls.read_exact(&mut len).await.is_ok() {
                let n = u64::from_le_bytes(len) as usize;
                if n > payload.len() {
                    break;
                }
                tls.write_all(&payload[..n]).await?;
                tls.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        });
    }
}

/// A rustls client presenting `files`' identity and trusting only its CA: what tonic's channel
/// does, without HTTP/2 and gRPC on top.
fn raw_connector(files: &vlm_net::TlsFiles) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pems = files.load()?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pems.ca) {
        roots.add(ca?)?;
    }
    let certs = CertificateDer::pem_slice_iter(&pems.cert).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&pems.key)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

pub async fn run(args: &StreamBenchArgs) -> anyhow::Result<StreamReport> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let dir = tempfile::tempdir()?;
    vlm_net::certs::generate_dev_certs(dir.path(), &[])?;
    let server_files = vlm_net::TlsFiles::for_role(dir.path(), "encoder");
    // The caller a real encoder accepts.
    let client_files = vlm_net::TlsFiles::for_role(dir.path(), "gateway");

    let mut tensors = HashMap::new();
    let mut largest = 0;
    for (rows, dim) in CASES {
        let values: Vec<f32> = (0..rows * dim).map(|i| (i % 251) as f32 * 0.01).collect();
        let chunks: Vec<TensorChunk> =
            TensorChunker::new(values, &[rows, dim], WireDType::F16, 0)?.collect();
        largest = largest.max(chunks.iter().map(|c| c.data.len()).sum::<usize>());
        tensors.insert(key(rows, dim), chunks);
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let server = tokio::spawn(vlm_net::serve_grpc(
        grpc_listener,
        Some(vlm_net::server_tls(&server_files)?),
        EncoderServer::new(CannedEncoder {
            tensors: Arc::new(tensors),
        }),
        async {
            let _ = stop_rx.await;
        },
    ));
    let raw_listener = TcpListener::bind("127.0.0.1:0").await?;
    let raw_addr = raw_listener.local_addr()?;
    let acceptor = vlm_net::HttpTlsAcceptor::new(&server_files, vlm_net::ClientAuth::Required)?;
    let payload: Vec<u8> = (0..largest).map(|i| (i * 7 % 256) as u8).collect();
    let raw = tokio::spawn(raw_server(raw_listener, acceptor, Arc::new(payload)));

    let result = async {
        let channel = vlm_net::connect(
            &format!("https://{grpc_addr}"),
            Some(vlm_net::client_tls(&client_files, "localhost")?),
        )
        .await?;
        let mut client = EncoderClient::new(channel);
        let tcp = TcpStream::connect(raw_addr).await?;
        tcp.set_nodelay(true)?;
        let mut conn = raw_connector(&client_files)?
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("raw TLS handshake")?;

        let mut cases = Vec::new();
        for (rows, dim) in CASES {
            // Warm-up: flow-control windows, allocator, TLS session state.
            let (bytes, chunks) = grpc_once(&mut client, rows, dim).await?;
            let mut buf = vec![0u8; bytes as usize];
            raw_once(&mut conn, &mut buf).await?;
            let (mut grpc, mut raw) = (Vec::new(), Vec::new());
            for round in 0..args.rounds {
                for side in [round % 2, 1 - round % 2] {
                    let t = Instant::now();
                    if side == 0 {
                        let got = grpc_once(&mut client, rows, dim).await?;
                        anyhow::ensure!(got == (bytes, chunks), "stream size changed: {got:?}");
                        grpc.push(t.elapsed().as_secs_f64() * 1e3);
                    } else {
                        raw_once(&mut conn, &mut buf).await?;
                        raw.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            let (grpc, raw) = (Spread::of(&mut grpc)?, Spread::of(&mut raw)?);
            let gbps = |ms: f64| bytes as f64 / ms / 1e6;
            cases.push(StreamCase {
                shape: [rows, dim],
                dtype: WireDType::F16.name(),
                bytes: bytes as usize,
                chunks: chunks as usize,
                grpc_gb_per_s: gbps(grpc.p50),
                raw_gb_per_s: gbps(raw.p50),
                grpc_over_raw_p50: raw.p50 / grpc.p50,
                grpc_mtls_ms: grpc,
                raw_tls_ms: raw,
            });
        }
        Ok(StreamReport {
            bench: "stream",
            rounds: args.rounds,
            chunk_bytes: vlm_tensor::DEFAULT_CHUNK_BYTES,
            cases,
        })
    }
    .await;
    let _ = stop_tx.send(());
    raw.abort();
    let _ = server.await;
    result
}
