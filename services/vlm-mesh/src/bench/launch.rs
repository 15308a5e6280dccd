//! The meshes benchmarks run (`up` on loopback) and one request's stream as the client sees it.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tonic::transport::{Channel, ClientTlsConfig};
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateFinal, GenerateRequest};

use crate::mesh::{certs_dir, Mesh, MeshOptions};

/// A mesh started for a benchmark (`up` on loopback with dev mTLS, f32, one replica per stage,
/// services logging warnings only) and a client of its gateway.
pub(super) struct BenchMesh {
    pub(super) mesh: Mesh,
    /// Certificates and mesh.json; removed when this is dropped.
    _state: tempfile::TempDir,
    /// The gateway's identity, for calling a stage directly (stages accept only the gateway).
    pub(super) stage_tls: ClientTlsConfig,
    pub(super) gateway: GatewayClient<Channel>,
}

impl BenchMesh {
    pub(super) async fn start(
        model: &Path,
        gateway_args: Vec<String>,
    ) -> anyhow::Result<BenchMesh> {
        Self::start_quantized(model, gateway_args, Default::default()).await
    }

    /// [`Self::start`] with each stage's `--quantize`.
    pub(super) async fn start_quantized(
        model: &Path,
        gateway_args: Vec<String>,
        quantize: [vlm_model::Quantization; 3],
    ) -> anyhow::Result<BenchMesh> {
        Self::start_with(model, gateway_args, [1; 3], quantize).await
    }

    /// [`Self::start`] with `replicas` processes per stage (encoder, projector, decoder).
    pub(super) async fn start_replicas(
        model: &Path,
        gateway_args: Vec<String>,
        replicas: [usize; 3],
    ) -> anyhow::Result<BenchMesh> {
        Self::start_with(model, gateway_args, replicas, Default::default()).await
    }

    async fn start_with(
        model: &Path,
        gateway_args: Vec<String>,
        replicas: [usize; 3],
        quantize: [vlm_model::Quantization; 3],
    ) -> anyhow::Result<BenchMesh> {
        let state = tempfile::tempdir()?;
        let opts = MeshOptions {
            model: model.to_path_buf(),
            state_dir: state.path().to_path_buf(),
            listen: "127.0.0.1:0".parse()?,
            dtype: "f32".into(),
            gateway_args,
            service_log: Some("warn".into()),
            replicas,
            quantize,
        };
        let mesh = Mesh::start(&opts).await?;
        let connected = async {
            let tls = |role| {
                let files = vlm_net::TlsFiles::for_role(certs_dir(state.path()), role);
                vlm_net::client_tls(&files, "localhost")
            };
            let channel = vlm_net::connect(&mesh.info.gateway_url, Some(tls("client")?)).await?;
            Ok::<_, anyhow::Error>((tls("gateway")?, GatewayClient::new(channel)))
        }
        .await;
        match connected {
            Ok((stage_tls, gateway)) => Ok(BenchMesh {
                mesh,
                _state: state,
                stage_tls,
                gateway,
            }),
            Err(e) => {
                mesh.shutdown().await;
                Err(e)
            }
        }
    }
}

impl BenchMesh {
    /// A client of the mesh's encoder, called as the gateway calls it (its certificate).
    pub(super) async fn encoder(
        &self,
    ) -> anyhow::Result<vlm_proto::encoder_client::EncoderClient<Channel>> {
        let addr = self
            .mesh
            .info
            .services
            .iter()
            .find(|s| s.role == "encoder")
            .ok_or_else(|| anyhow::anyhow!("the mesh has no encoder"))?
            .addr;
        let url = format!("https://{addr}");
        let channel = vlm_net::connect(&url, Some(self.stage_tls.clone())).await?;
        Ok(vlm_proto::encoder_client::EncoderClient::new(channel)
            .max_decoding_message_size(256 << 20))
    }
}

/// One request's stream at the client: ms from sending it to the first and to the last token,
/// the token ids, and the final message.
pub(super) struct Streamed {
    pub first_ms: f64,
    pub last_ms: f64,
    pub ids: Vec<u32>,
    pub fin: Option<GenerateFinal>,
}

/// Sends `req` and reads its whole stream; an error when no token came.
pub(super) async fn stream(
    client: &mut GatewayClient<Channel>,
    req: GenerateRequest,
) -> anyhow::Result<Streamed> {
    let t = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let (mut first, mut last, mut ids, mut fin) = (None, 0.0, Vec::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Delta(d)) if !d.token_ids.is_empty() => {
                let now = t.elapsed().as_secs_f64() * 1e3;
                first.get_or_insert(now);
                last = now;
                ids.extend(d.token_ids);
            }
            Some(Kind::Final(f)) => fin = Some(f),
            _ => {}
        }
    }
    Ok(Streamed {
        first_ms: first.context("no token")?,
        last_ms: last,
        ids,
        fin,
    })
}
