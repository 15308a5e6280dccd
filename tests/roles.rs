//! Certificate roles against a real mesh: the encoder, projector and decoder serve only callers
//! whose certificate carries `spiffe://vlm-mesh/gateway`; any other certificate of the mesh CA —
//! the CLI's `client`, another stage's, one without a role — gets PERMISSION_DENIED naming its
//! role. Health checks stay open to every mesh certificate.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ask_json, bounded, image_path, MeshProc, PROMPT};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vlm_proto::decoder_client::DecoderClient;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::projector_client::ProjectorClient;

/// Each stage's `Info` (a cheap unary call), as whoever holds `channel`'s certificate.
async fn info(stage: &str, channel: Channel) -> Result<String, tonic::Status> {
    Ok(match stage {
        "encoder" => {
            EncoderClient::new(channel)
                .info(vlm_proto::EncoderInfoRequest {})
                .await?
                .into_inner()
                .model_fingerprint
        }
        "projector" => {
            ProjectorClient::new(channel)
                .info(vlm_proto::ProjectorInfoRequest {})
                .await?
                .into_inner()
                .model_fingerprint
        }
        "decoder" => {
            DecoderClient::new(channel)
                .info(vlm_proto::DecoderInfoRequest {})
                .await?
                .into_inner()
                .model_fingerprint
        }
        other => panic!("no stage {other}"),
    })
}

/// A server-reflection stream with no request in it: PERMISSION_DENIED at once for a caller the
/// stage does not accept, an empty answer otherwise.
async fn reflection(channel: Channel) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    );
    // Any message types: no request is sent, and a refusal comes before any decoding.
    let codec =
        tonic_prost::ProstCodec::<vlm_proto::EncoderInfoRequest, vlm_proto::EncoderInfo>::default();
    let req = tonic::Request::new(tokio_stream::iter(
        Vec::<vlm_proto::EncoderInfoRequest>::new(),
    ));
    let mut stream = bounded("reflection", grpc.streaming(req, path, codec))
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

fn assert_denied(result: Result<String, tonic::Status>, stage: &str, who: &str) {
    let status = result.expect_err("the call was served");
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{stage}, {who}: {status:?}"
    );
    let service = format!("vlm.v1.{}{}", stage[..1].to_uppercase(), &stage[1..]);
    assert!(
        status
            .message()
            .starts_with(&format!("{service} accepts calls only from role gateway; ")),
        "{stage}: {}",
        status.message()
    );
    assert!(
        status.message().contains(who),
        "{stage}: {:?} does not say {who:?}",
        status.message()
    );
}

/// Writes a certificate signed by the mesh CA in `certs` (same names as the dev leaves) but
/// without a role URI, as certificates were issued before roles; returns its TLS files.
fn roleless_certificate(certs: &Path, out: &Path) -> vlm_net::TlsFiles {
    let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = vlm_net::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: out.join("roleless.pem"),
        key: out.join("roleless.key"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

#[tokio::test]
async fn stages_serve_only_the_gateway() {
    let mesh = MeshProc::start(&[]);
    let stages = ["encoder", "projector", "decoder"];

    for stage in stages {
        let addr = mesh.service_addr(stage);
        // The CLI's certificate: a valid mesh certificate, but not the gateway's.
        let refused = info(stage, mesh.stage_channel(&addr, "client").await).await;
        assert_denied(refused, stage, "has role client");
        // The gateway's: served.
        let fingerprint = info(stage, mesh.stage_channel(&addr, "gateway").await)
            .await
            .unwrap_or_else(|s| panic!("{stage} refused the gateway: {s:?}"));
        assert!(!fingerprint.is_empty(), "{stage}");
        // Health stays open to every mesh certificate (the status says the stage is up).
        let mut health = HealthClient::new(mesh.stage_channel(&addr, "client").await);
        let service = format!("vlm.v1.{}{}", stage[..1].to_uppercase(), &stage[1..]);
        let status = health
            .check(HealthCheckRequest { service })
            .await
            .unwrap_or_else(|s| panic!("{stage} health refused the client: {s:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{stage}");
        // Server reflection answers the same roles as the stage (health alone is open).
        for (role, allowed) in [("client", false), ("gateway", true)] {
            let reflected = reflection(mesh.stage_channel(&addr, role).await).await;
            match (allowed, reflected) {
                (true, Ok(())) => {}
                (false, Err(s)) if s.code() == tonic::Code::PermissionDenied => {}
                (_, other) => panic!("{stage} reflection, role {role}: {other:?}"),
            }
        }
    }

    // A stage's certificate does not make its holder a gateway: the encoder may not decode.
    let decoder = mesh.service_addr("decoder");
    let refused = info("decoder", mesh.stage_channel(&decoder, "encoder").await).await;
    assert_denied(refused, "decoder", "has role encoder");

    // The refusal covers the real methods too, not just Info: a streaming Generate.
    let mut client = DecoderClient::new(mesh.stage_channel(&decoder, "client").await);
    let mut req = tonic::Request::new(tokio_stream::iter(Vec::<vlm_proto::DecodeRequest>::new()));
    req.set_timeout(Duration::from_secs(30));
    let refused = bounded("the call", client.generate(req))
        .await
        .map(|_| String::new());
    assert_denied(refused, "decoder", "has role client");

    // A certificate of the mesh CA with no role at all.
    let dir = tempfile::tempdir().unwrap();
    let files = roleless_certificate(&mesh.certs(), dir.path());
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    for stage in stages {
        let url = format!("https://{}", mesh.service_addr(stage));
        let channel = vlm_net::connect(&url, Some(tls.clone())).await.unwrap();
        assert_denied(info(stage, channel).await, stage, "has no role");
    }

    // The mesh itself works: the gateway (any caller) with the client certificate, and the
    // gateway's own calls to the stages.
    let out = ask_json(
        mesh.state.path(),
        &image_path(),
        PROMPT,
        &["--max-tokens", "4"],
    );
    let tokens = out["token_ids"].as_array().expect("token_ids");
    assert!(!tokens.is_empty(), "{out}");
}

#[tokio::test]
async fn allowed_callers_is_configurable() {
    // VLM_ALLOWED_CALLERS reaches every service `up` starts, the gateway included.
    let mesh = MeshProc::start(&[("VLM_ALLOWED_CALLERS", "gateway,client")]);
    let decoder = mesh.service_addr("decoder");
    let fingerprint = info("decoder", mesh.stage_channel(&decoder, "client").await)
        .await
        .unwrap_or_else(|s| panic!("the decoder refused an allowed client: {s:?}"));
    assert!(!fingerprint.is_empty());
    let refused = info("decoder", mesh.stage_channel(&decoder, "projector").await).await;
    let status = refused.expect_err("the projector was served");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("only from role gateway,client; the caller's certificate has role projector"),
        "{}",
        status.message()
    );
    let out = ask_json(
        mesh.state.path(),
        &image_path(),
        PROMPT,
        &["--max-tokens", "2"],
    );
    assert!(
        !out["token_ids"].as_array().expect("token_ids").is_empty(),
        "{out}"
    );
}
