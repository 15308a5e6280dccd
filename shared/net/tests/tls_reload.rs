//! Certificate reload over real TLS on 127.0.0.1: a watched [`TlsSource`] behind `serve_grpc`
//! and behind a client channel. Waits poll the source's state with a deadline, never sleep.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vlm_net::certs::{generate_dev_pki, DevPki};
use vlm_net::{ClientAuth, ClientTls, ServerTls, TlsFiles, TlsKind, TlsLabel, TlsSource};
use vlm_proto::encoder_server::EncoderServer;

const POLL: Duration = Duration::from_millis(50);
const DEADLINE: Duration = Duration::from_secs(20);

/// Writes `role`'s files of `pki` into `dir` (`ca.pem` = `ca`), each by rename.
fn write_role(dir: &Path, pki: &DevPki, role: &str, ca: &str) {
    let pems = pki.tls_pems(role).unwrap();
    let put = |name: &str, data: &[u8]| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    };
    put("ca.pem", ca.as_bytes());
    put(&format!("{role}.pem"), &pems.cert);
    put(&format!("{role}.key"), &pems.key);
}

/// Polls `cond` every few milliseconds until it holds or [`DEADLINE`] passes.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // bounded poll of a condition
    }
}

/// The serial of the leaf a fresh TLS connection to `addr` is shown, trusting only `ca_pem`
/// and presenting `client` (cert, key).
async fn served_serial(addr: &str, ca_pem: &str, client: (&[u8], &[u8])) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(client.0)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(client.1).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(vlm_net::tls_source::leaf_facts(&leaf).unwrap().1)
}

fn serial_of(pem: &[u8]) -> String {
    let der = CertificateDer::from_pem_slice(pem).unwrap();
    vlm_net::tls_source::leaf_facts(&der).unwrap().1
}

struct Stub;

#[tonic::async_trait]
impl vlm_proto::encoder_server::Encoder for Stub {
    type EncodeStream = futures::stream::Empty<Result<vlm_proto::EncodeResponse, tonic::Status>>;
    async fn encode(
        &self,
        _: tonic::Request<vlm_proto::EncodeRequest>,
    ) -> Result<tonic::Response<Self::EncodeStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("stub"))
    }
    async fn plan(
        &self,
        _: tonic::Request<vlm_proto::EncodeRequest>,
    ) -> Result<tonic::Response<vlm_proto::ImagePlan>, tonic::Status> {
        Err(tonic::Status::unimplemented("stub"))
    }
    async fn info(
        &self,
        _: tonic::Request<vlm_proto::EncoderInfoRequest>,
    ) -> Result<tonic::Response<vlm_proto::EncoderInfo>, tonic::Status> {
        Err(tonic::Status::unimplemented("stub"))
    }
}

async fn health(ch: tonic::transport::Channel) -> Result<(), String> {
    let mut client = HealthClient::new(ch);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(format!("{s:?}")),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn server_reloads_a_rotated_ca_and_leaf_and_refuses_a_bad_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        generate_dev_pki(&[]).unwrap(),
        generate_dev_pki(&[]).unwrap(),
    );
    write_role(dir.path(), &old, "encoder", &old.ca_cert_pem);
    let files = TlsFiles::for_role(dir.path(), "encoder");
    let label = TlsLabel {
        service: "reload-test".into(),
        kind: TlsKind::Mesh,
    };
    let source = TlsSource::load(&files, Some(label)).unwrap();
    source.watch(POLL);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = ServerTls::new(source.clone(), ClientAuth::Required);
    tokio::spawn(vlm_net::serve_grpc(
        listener,
        Some(tls),
        EncoderServer::new(Stub),
        std::future::pending(),
    ));
    let (old_client, new_client) = (
        old.tls_pems("gateway").unwrap(),
        new.tls_pems("gateway").unwrap(),
    );
    let old_id = (&old_client.cert[..], &old_client.key[..]);
    let new_id = (&new_client.cert[..], &new_client.key[..]);
    let old_serial = serial_of(&old.tls_pems("encoder").unwrap().cert);
    assert_eq!(
        served_serial(&addr, &old.ca_cert_pem, old_id).await,
        Ok(old_serial.clone())
    );
    // A connection made before the rotation, kept open through it.
    let url = format!("https://{addr}");
    let kept = vlm_net::connect(&url, Some(old_client.client_config("localhost")))
        .await
        .unwrap();
    health(kept.clone()).await.unwrap();

    // Rotation: new leaf from a new CA, the CA file holding both (the overlap).
    let bundle = format!("{}{}", old.ca_cert_pem, new.ca_cert_pem);
    write_role(dir.path(), &new, "encoder", &bundle);
    wait_until("the reload", || source.current().generation == 2).await;
    let new_serial = serial_of(&new.tls_pems("encoder").unwrap().cert);
    assert_eq!(
        served_serial(&addr, &new.ca_cert_pem, new_id).await,
        Ok(new_serial.clone())
    );
    // Clients of the old CA are still accepted during the overlap, and the kept connection
    // still serves.
    assert_eq!(
        served_serial(&addr, &bundle, old_id).await,
        Ok(new_serial.clone())
    );
    health(kept).await.unwrap();

    // A key that is not the certificate's: refused, the previous pair stays.
    let other_key = new.tls_pems("decoder").unwrap().key;
    std::fs::write(dir.path().join("encoder.key"), other_key).unwrap();
    let refused = || {
        let text = vlm_telemetry::metrics::MeshMetrics::global().encode();
        text.contains(
            "vlm_tls_reloads_total{service=\"reload-test\",kind=\"mesh\",result=\"refused\"} 1",
        )
    };
    wait_until("the refusal", refused).await;
    assert_eq!(source.current().generation, 2);
    assert_eq!(
        served_serial(&addr, &new.ca_cert_pem, new_id).await,
        Ok(new_serial)
    );
    let expiry = vlm_telemetry::metrics::MeshMetrics::global().encode();
    let not_after = source.current().not_after;
    assert!(
        expiry.contains(&format!(
            "vlm_tls_certificate_expiry_seconds{{service=\"reload-test\",kind=\"mesh\"}} {not_after}"
        )),
        "{expiry}"
    );
}

#[tokio::test]
async fn client_channels_present_the_reloaded_identity_on_new_connections() {
    let (old, new) = (
        generate_dev_pki(&[]).unwrap(),
        generate_dev_pki(&[]).unwrap(),
    );
    // A server of the new PKI only: the old identity cannot connect.
    let server =
        ServerTls::from_pems(&new.tls_pems("encoder").unwrap(), ClientAuth::Required).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(vlm_net::serve_grpc(
        listener,
        Some(server),
        EncoderServer::new(Stub),
        std::future::pending(),
    ));
    let dir = tempfile::tempdir().unwrap();
    write_role(dir.path(), &old, "gateway", &old.ca_cert_pem);
    let source = TlsSource::load(&TlsFiles::for_role(dir.path(), "gateway"), None).unwrap();
    source.watch(POLL);
    let tls = ClientTls::Reloading {
        source: source.clone(),
        server_name: "localhost".into(),
    };
    let opts = vlm_net::ChannelOptions::default();
    let channel = vlm_net::lazy_channel(&url, Some(tls), &opts).unwrap();
    assert!(health(channel.clone()).await.is_err());

    write_role(dir.path(), &new, "gateway", &new.ca_cert_pem);
    wait_until("the reload", || source.current().generation == 2).await;
    // The same channel reconnects with the new identity and CA.
    health(channel).await.unwrap();
}

#[test]
fn a_ca_bundle_is_accepted_and_an_unparsable_file_is_named() {
    let (a, b) = (
        generate_dev_pki(&[]).unwrap(),
        generate_dev_pki(&[]).unwrap(),
    );
    let mut pems = a.tls_pems("encoder").unwrap();
    pems.ca = format!("{}{}", a.ca_cert_pem, b.ca_cert_pem).into_bytes();
    TlsSource::from_pems(&pems).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_role(dir.path(), &a, "encoder", "not a certificate");
    let err = TlsSource::load(&TlsFiles::for_role(dir.path(), "encoder"), None).unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");
}
