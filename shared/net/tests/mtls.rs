//! Real TLS handshakes against a real tonic server on 127.0.0.1:0. Every
//! negative case is paired with a positive control on the same server, so a
//! failure can only come from the property under test.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vlm_net::certs::{generate_dev_certs, generate_dev_pki};
use vlm_net::{ClientAuth, TlsFiles, TlsPems};

const SERVICE: &str = "vlm.v1.Encoder";

struct Mesh {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

fn mesh() -> Mesh {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(d.path(), &[]).unwrap();
    Mesh {
        dir: d.path().to_path_buf(),
        _dir: d,
    }
}

/// Starts a server with health + reflection as `role`, returning its address
/// once the listener is bound (connections queue from then on, so no sleep).
async fn start(tls: vlm_net::ServerTls) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health, reflection) = vlm_net::health_and_reflection(SERVICE).unwrap();
    reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let router = vlm_net::server_builder(None)
        .unwrap()
        .add_service(health)
        .add_service(reflection);
    // The servers' own TLS path: each connection handshakes with the source's current config.
    let incoming = vlm_net::tls_incoming(TcpIncoming::from(listener), tls);
    tokio::spawn(router.serve_with_incoming(incoming));
    (addr, reporter)
}

/// Connects and runs one health Check; any failure becomes a string.
async fn check(url: &str, tls: Option<ClientTlsConfig>) -> Result<ServingStatus, String> {
    let attempt = async {
        let ch = vlm_net::connect(url, tls)
            .await
            .map_err(|e| e.to_string())?;
        let resp = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: SERVICE.into(),
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        Ok(resp.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

async fn mesh_client_works(m: &Mesh, addr: SocketAddr) {
    let tls = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "encoder").unwrap();
    assert_eq!(
        check(&https(addr), Some(tls)).await,
        Ok(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn mesh_client_certificate_is_accepted() {
    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    mesh_client_works(&m, addr).await;
    // Services are clients of each other with their own leaves.
    let tls = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "gateway"), "localhost").unwrap();
    assert_eq!(
        check(&https(addr), Some(tls)).await,
        Ok(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn plaintext_client_is_rejected() {
    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let got = check(&format!("http://{addr}"), None).await;
    assert!(got.is_err(), "plaintext got {got:?}");
    mesh_client_works(&m, addr).await;
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let tls = vlm_net::client_tls_without_identity(&m.dir.join("ca.pem"), "encoder").unwrap();
    let got = check(&https(addr), Some(tls)).await;
    let err = got.expect_err("anonymous client was served");
    assert!(
        err.contains("CertificateRequired"),
        "unexpected failure reason: {err}"
    );
    mesh_client_works(&m, addr).await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let foreign = generate_dev_pki(&[]).unwrap().tls_pems("client").unwrap();
    // Trusts the right CA for the server, but presents a foreign identity.
    let pems = TlsPems {
        ca: std::fs::read(m.dir.join("ca.pem")).unwrap(),
        ..foreign
    };
    let got = check(&https(addr), Some(pems.client_config("encoder"))).await;
    let err = got.expect_err("client with a foreign certificate was served");
    assert!(
        err.contains("UnknownCA") || err.contains("BadCertificate"),
        "unexpected failure reason: {err}"
    );
    mesh_client_works(&m, addr).await;
}

#[tokio::test]
async fn server_without_the_requested_name_is_rejected() {
    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let files = TlsFiles::for_role(&m.dir, "client");
    // The encoder's certificate does not name the decoder.
    let got = check(
        &https(addr),
        Some(vlm_net::client_tls(&files, "decoder").unwrap()),
    )
    .await;
    let err = got.expect_err("client accepted a server certificate without the requested name");
    assert!(
        err.to_lowercase().contains("certificate"),
        "unexpected failure reason: {err}"
    );
    mesh_client_works(&m, addr).await;
}

#[tokio::test]
async fn server_from_another_ca_is_rejected() {
    let m = mesh();
    let other = tempfile::tempdir().unwrap();
    generate_dev_certs(other.path(), &[]).unwrap();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(other.path(), "encoder")).unwrap()).await;
    let ours = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "encoder").unwrap();
    assert!(check(&https(addr), Some(ours)).await.is_err());
    let theirs =
        vlm_net::client_tls(&TlsFiles::for_role(other.path(), "client"), "encoder").unwrap();
    assert_eq!(
        check(&https(addr), Some(theirs)).await,
        Ok(ServingStatus::Serving)
    );
}

#[tokio::test]
async fn public_port_takes_anonymous_clients_but_not_foreign_certificates() {
    let m = mesh();
    let pki =
        vlm_net::server_tls_client_auth_optional(&TlsFiles::for_role(&m.dir, "gateway")).unwrap();
    let (addr, _r) = start(pki).await;
    let anon = vlm_net::client_tls_without_identity(&m.dir.join("ca.pem"), "gateway").unwrap();
    assert_eq!(
        check(&https(addr), Some(anon)).await,
        Ok(ServingStatus::Serving)
    );
    let mesh_client =
        vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "gateway").unwrap();
    assert_eq!(
        check(&https(addr), Some(mesh_client)).await,
        Ok(ServingStatus::Serving)
    );
    let foreign = generate_dev_pki(&[]).unwrap().tls_pems("client").unwrap();
    let pems = TlsPems {
        ca: std::fs::read(m.dir.join("ca.pem")).unwrap(),
        ..foreign
    };
    assert!(check(&https(addr), Some(pems.client_config("gateway")))
        .await
        .is_err());
    // Still TLS only.
    assert!(check(&format!("http://{addr}"), None).await.is_err());
}

#[tokio::test]
async fn in_memory_pki_serves_with_required_client_auth() {
    let pki = generate_dev_pki(&["encoder.vlm.svc".to_string()]).unwrap();
    let server = pki.tls_pems("encoder").unwrap();
    server.validate().unwrap();
    let (addr, _r) = start(server.server_config(ClientAuth::Required).unwrap()).await;
    let client = pki.tls_pems("client").unwrap();
    // The extra host is in the SANs.
    assert_eq!(
        check(&https(addr), Some(client.client_config("encoder.vlm.svc"))).await,
        Ok(ServingStatus::Serving)
    );
    assert!(
        check(&https(addr), Some(client.client_config("other.vlm.svc")))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn wait_until_serving_follows_health_status() {
    let m = mesh();
    let (addr, reporter) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let tls = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "encoder").unwrap();
    let ch: Channel = vlm_net::connect_lazy(&https(addr), Some(tls)).unwrap();

    reporter
        .set_service_status("vlm.v1.Decoder", tonic_health::ServingStatus::NotServing)
        .await;
    let r2 = reporter.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        r2.set_service_status("vlm.v1.Decoder", tonic_health::ServingStatus::Serving)
            .await;
    });
    let t0 = Instant::now();
    vlm_net::wait_until_serving(
        ch.clone(),
        "vlm.v1.Decoder",
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "returned before the service was SERVING"
    );

    // An unknown service never becomes ready; the wait ends at the deadline
    // with the last answer in the error.
    let t0 = Instant::now();
    let err = vlm_net::wait_until_serving(
        ch,
        "vlm.v1.Nope",
        Instant::now() + Duration::from_millis(400),
    )
    .await
    .unwrap_err();
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("vlm.v1.Nope") && msg.contains("NotFound"),
        "{msg}"
    );
}

#[tokio::test]
async fn wait_until_serving_gives_up_on_unreachable_peer() {
    // Bind then drop to get a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ch = vlm_net::connect_lazy(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let t0 = Instant::now();
    let err = vlm_net::wait_until_serving(ch, "", Instant::now() + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, vlm_net::NetError::NotReady { .. }), "{err}");
}

/// Reflection lists what the port serves (its own service, health, reflection), nothing it would
/// answer UNIMPLEMENTED, and every name it lists resolves to a file descriptor.
#[tokio::test]
async fn reflection_lists_exactly_what_the_port_serves() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let m = mesh();
    let (addr, _r) =
        start(vlm_net::server_tls(&TlsFiles::for_role(&m.dir, "encoder")).unwrap()).await;
    let tls = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "encoder").unwrap();
    let ch = vlm_net::connect(&https(addr), Some(tls)).await.unwrap();
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut client = ServerReflectionClient::new(ch);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([ask(MessageRequest::ListServices(
            String::new(),
        ))]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response: {resp:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            SERVICE,
        ]
    );
    for name in names {
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([ask(
                MessageRequest::FileContainingSymbol(name.clone()),
            )]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        assert!(
            matches!(
                resp.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{name} does not resolve: {resp:?}"
        );
    }
}

#[tokio::test]
async fn tls_and_scheme_must_agree() {
    let m = mesh();
    let tls = vlm_net::client_tls(&TlsFiles::for_role(&m.dir, "client"), "encoder").unwrap();
    // A TLS config with http:// would silently be plaintext in tonic.
    let err = vlm_net::connect_lazy("http://127.0.0.1:1", Some(tls)).unwrap_err();
    assert!(err.to_string().contains("use https://"), "{err}");
    let err = vlm_net::connect_lazy("https://127.0.0.1:1", None).unwrap_err();
    assert!(
        err.to_string().contains("needs a TLS configuration"),
        "{err}"
    );
    assert!(vlm_net::connect_lazy("ftp://127.0.0.1:1", None).is_err());
    assert!(vlm_net::connect_lazy("not a url", None).is_err());
}
