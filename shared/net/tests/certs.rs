//! Dev certificate files: layout, permissions, idempotence, and load errors.

use std::path::Path;

use vlm_net::certs::{ensure_dev_certs, generate_dev_certs, ROLES};
use vlm_net::{NetError, TlsFiles};

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_ca_and_every_role_with_private_keys() {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(
        d.path(),
        &["decoder.vlm.svc.cluster.local".into(), "10.0.0.7".into()],
    )
    .unwrap();
    let mut want = vec!["ca.key".to_string(), "ca.pem".to_string()];
    for r in ROLES {
        want.push(format!("{r}.key"));
        want.push(format!("{r}.pem"));
    }
    want.sort();
    assert_eq!(files_in(d.path()), want, "no stray temporary files either");
    for r in ROLES {
        TlsFiles::for_role(d.path(), r).load().unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in files_in(d.path()) {
            let mode = std::fs::metadata(d.path().join(&f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            if f.ends_with(".key") {
                assert_eq!(mode, 0o600, "{f}");
            } else {
                assert_eq!(mode & 0o077, 0o044, "{f} should be readable: {mode:o}");
            }
        }
    }
}

#[test]
fn bad_extra_host_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let err = generate_dev_certs(d.path(), &["not a hostname".into()]).unwrap_err();
    assert!(err.to_string().contains("not a hostname"), "{err}");
}

#[test]
fn ensure_is_idempotent_and_reissues_only_missing_leaves() {
    let d = tempfile::tempdir().unwrap();
    assert!(
        ensure_dev_certs(d.path(), &[]).unwrap(),
        "first call generates"
    );
    let ca = std::fs::read(d.path().join("ca.pem")).unwrap();
    let enc = std::fs::read(d.path().join("encoder.pem")).unwrap();
    assert!(
        !ensure_dev_certs(d.path(), &[]).unwrap(),
        "second call is a no-op"
    );
    assert_eq!(std::fs::read(d.path().join("encoder.pem")).unwrap(), enc);

    std::fs::remove_file(d.path().join("decoder.key")).unwrap();
    assert!(ensure_dev_certs(d.path(), &[]).unwrap());
    assert_eq!(
        std::fs::read(d.path().join("ca.pem")).unwrap(),
        ca,
        "CA kept"
    );
    assert_eq!(
        std::fs::read(d.path().join("encoder.pem")).unwrap(),
        enc,
        "other leaves kept"
    );
    TlsFiles::for_role(d.path(), "decoder").load().unwrap();
}

#[tokio::test]
async fn reissued_leaf_chains_to_the_existing_ca() {
    let d = tempfile::tempdir().unwrap();
    ensure_dev_certs(d.path(), &[]).unwrap();
    std::fs::remove_file(d.path().join("projector.pem")).unwrap();
    ensure_dev_certs(d.path(), &[]).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health, _) = vlm_net::health_and_reflection("vlm.v1.Encoder").unwrap();
    let tls = vlm_net::server_tls(&TlsFiles::for_role(d.path(), "projector")).unwrap();
    let router = vlm_net::server_builder(None).unwrap().add_service(health);
    let incoming =
        vlm_net::tls_incoming(tonic::transport::server::TcpIncoming::from(listener), tls);
    tokio::spawn(router.serve_with_incoming(incoming));

    let client = vlm_net::client_tls(&TlsFiles::for_role(d.path(), "client"), "projector").unwrap();
    let ch = vlm_net::connect(&format!("https://{addr}"), Some(client))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    vlm_net::wait_until_serving(ch, "", deadline).await.unwrap();
}

#[test]
fn foreign_ca_key_is_refused_when_reissuing() {
    let d = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    ensure_dev_certs(d.path(), &[]).unwrap();
    ensure_dev_certs(other.path(), &[]).unwrap();
    std::fs::copy(other.path().join("ca.key"), d.path().join("ca.key")).unwrap();
    std::fs::remove_file(d.path().join("client.pem")).unwrap();
    let err = ensure_dev_certs(d.path(), &[]).unwrap_err();
    assert!(matches!(err, NetError::DevCerts { .. }), "{err}");
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn load_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(d.path(), &[]).unwrap();

    let mut files = TlsFiles::for_role(d.path(), "encoder");
    files.key = d.path().join("missing.key");
    let err = files.load().unwrap_err();
    assert!(
        err.to_string().contains("missing.key") && err.to_string().contains("private key"),
        "{err}"
    );

    let garbage = d.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let mut files = TlsFiles::for_role(d.path(), "encoder");
    files.ca = garbage.clone();
    let err = files.load().unwrap_err();
    assert!(
        err.to_string().contains("garbage.pem") && err.to_string().contains("CA certificate"),
        "{err}"
    );

    // A certificate where the key should be.
    let mut files = TlsFiles::for_role(d.path(), "encoder");
    files.key = d.path().join("encoder.pem");
    let err = files.load().unwrap_err();
    assert!(err.to_string().contains("encoder.pem"), "{err}");

    let err = vlm_net::client_tls_without_identity(&d.path().join("nope.pem"), "x").unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

/// The role `role`'s leaf in `dir` names in its URI SAN.
fn role_in(dir: &Path, role: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der =
        rustls_pki_types::CertificateDer::from_pem_file(dir.join(format!("{role}.pem"))).unwrap();
    vlm_net::roles::role_of_certificate(&der).unwrap()
}

#[test]
fn every_leaf_names_its_role() {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(d.path(), &[]).unwrap();
    for r in ROLES {
        assert_eq!(role_in(d.path(), r).as_deref(), Some(r));
    }
}

#[test]
fn leaves_made_before_roles_are_reissued_from_the_same_ca() {
    let d = tempfile::tempdir().unwrap();
    ensure_dev_certs(d.path(), &[]).unwrap();
    // A decoder leaf as issued before roles: same CA, same names, no URI SAN.
    let ca_pem = std::fs::read_to_string(d.path().join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(d.path().join("ca.key")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".into(), "decoder".into()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let old = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(d.path().join("decoder.pem"), old.pem()).unwrap();
    std::fs::write(d.path().join("decoder.key"), key.serialize_pem()).unwrap();
    assert_eq!(role_in(d.path(), "decoder"), None);
    let encoder = std::fs::read(d.path().join("encoder.pem")).unwrap();

    assert!(ensure_dev_certs(d.path(), &[]).unwrap(), "reissued");
    assert_eq!(role_in(d.path(), "decoder").as_deref(), Some("decoder"));
    assert_eq!(
        std::fs::read_to_string(d.path().join("ca.pem")).unwrap(),
        ca_pem,
        "CA kept"
    );
    assert_eq!(
        std::fs::read(d.path().join("encoder.pem")).unwrap(),
        encoder,
        "leaves with roles kept"
    );
    TlsFiles::for_role(d.path(), "decoder").load().unwrap();
    assert!(!ensure_dev_certs(d.path(), &[]).unwrap(), "then a no-op");
}
