//! Caller roles over real mTLS: a service behind `server_layers` that accepts only the gateway
//! refuses other mesh certificates with PERMISSION_DENIED, and still answers health checks.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use vlm_net::certs::generate_dev_certs;
use vlm_net::{AdmissionLimits, AllowedCallers, TlsFiles};
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncoderInfo, EncoderInfoRequest};

struct StubEncoder;

#[tonic::async_trait]
impl Encoder for StubEncoder {
    type EncodeStream = tokio_stream::Iter<std::vec::IntoIter<Result<EncodeResponse, Status>>>;

    async fn encode(
        &self,
        _req: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn plan(
        &self,
        _req: Request<EncodeRequest>,
    ) -> Result<Response<vlm_proto::ImagePlan>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn info(
        &self,
        _req: Request<EncoderInfoRequest>,
    ) -> Result<Response<EncoderInfo>, Status> {
        Ok(Response::new(EncoderInfo {
            requests_total: 42,
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn only_allowed_roles_get_through() {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(d.path(), &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let tls = vlm_net::server_tls(&TlsFiles::for_role(d.path(), "encoder")).unwrap();
    let limits = AdmissionLimits {
        max_in_flight: 4,
        max_queue: 4,
    };
    let gate = vlm_net::AdmissionGate::new(
        "vlm.v1.Encoder",
        limits,
        vlm_net::ByteBudget::new("vlm.v1.Encoder", 1 << 20, 4),
    );
    let service = vlm_net::server_layers(gate, AllowedCallers::gateway())
        .service(EncoderServer::new(StubEncoder));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vlm_net::serve_grpc(listener, Some(tls), service, async {
        let _ = stop_rx.await;
    }));
    let as_role =
        |role: &str| vlm_net::client_tls(&TlsFiles::for_role(d.path(), role), "encoder").unwrap();

    // Health is exempt: the client certificate may ask.
    vlm_net::wait_until_serving_url(
        &url,
        Some(as_role("client")),
        "vlm.v1.Encoder",
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    let info = |role: &'static str| {
        let tls = as_role(role);
        let url = url.clone();
        async move {
            let ch = vlm_net::connect(&url, Some(tls)).await.unwrap();
            EncoderClient::new(ch).info(EncoderInfoRequest {}).await
        }
    };
    let served = info("gateway").await.unwrap();
    assert_eq!(served.into_inner().requests_total, 42);
    for role in ["client", "decoder", "encoder"] {
        let refused = info(role).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{role}: {refused:?}"
        );
        assert_eq!(
            refused.message(),
            format!(
                "vlm.v1.Encoder accepts calls only from role gateway; \
                 the caller's certificate has role {role}"
            )
        );
    }

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
}
