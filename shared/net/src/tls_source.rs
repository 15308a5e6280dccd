//! TLS material that can change under a running process: a [`TlsSource`] holds the current,
//! validated certificate, key and CA bundle of one identity, with the rustls configurations made
//! from them, and (with [`TlsSource::watch`]) polls the files and swaps in new ones.
//!
//! Every new connection reads the current [`TlsState`]; connections already open keep the session
//! they negotiated, so a reload never drops a call in flight. A change that does not load (an
//! unparsable file, a key that does not match the certificate, half of a non-atomic update) is
//! refused with a warning naming the file and the reason, and the old material stays in use: the
//! next poll tries again. Kubernetes swaps a mounted Secret's files at once (the `..data` symlink),
//! and comparing contents, not modification times, sees that swap like any other write.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

use crate::{ClientAuth, NetError, TlsFiles, TlsPems};

/// Which identity a source is, for its metric and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsKind {
    /// The certificate a service shows its mesh peers (and, by default, the gateway's clients).
    Mesh,
    /// The gateway's public ports, when `--public-cert` gives them their own certificate.
    Public,
}

impl TlsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsKind::Mesh => "mesh",
            TlsKind::Public => "public",
        }
    }
}

/// What a server speaks over TLS (its ALPN protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC.
    H2,
    /// The OpenAI-compatible port.
    Http1,
}

/// One loaded, validated generation of a source's material.
pub struct TlsState {
    /// Counts loads of this source (1 for the first).
    pub generation: u64,
    /// The leaf certificate's notAfter, in unix seconds.
    pub not_after: i64,
    /// The leaf certificate's serial number (hex, as `openssl x509 -serial` without colons).
    pub serial: String,
    /// Servers: [client auth required, optional] × [h2, http/1.1].
    servers: [Arc<ServerConfig>; 4],
    /// This identity as a client of other mesh services (h2), trusting the CA bundle.
    client: Arc<ClientConfig>,
    /// What it was made from: the watcher compares the files with it.
    pems: TlsPems,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("generation", &self.generation)
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl TlsState {
    /// The server configuration for new connections.
    pub fn server_config(&self, auth: ClientAuth, alpn: Alpn) -> Arc<ServerConfig> {
        let i = match auth {
            ClientAuth::Required => 0,
            ClientAuth::Optional => 2,
        } + match alpn {
            Alpn::H2 => 0,
            Alpn::Http1 => 1,
        };
        self.servers[i].clone()
    }

    /// The client configuration (h2, this identity, the CA bundle) for new connections.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// Parses and checks `pems`; `origin` names where each part came from, for errors.
    fn build(pems: &TlsPems, origin: &Origin, generation: u64) -> Result<TlsState, NetError> {
        let bad = |what: &'static str, origin: &str, reason: String| NetError::Pem {
            what,
            origin: origin.to_string(),
            reason,
        };
        let roots = ca_bundle(&pems.ca).map_err(|r| bad("CA certificate", &origin.ca, r))?;
        let chain = CertificateDer::pem_slice_iter(&pems.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &origin.cert, format!("invalid PEM: {e}")))?;
        let leaf = chain.first().ok_or_else(|| {
            bad(
                "certificate",
                &origin.cert,
                "no \"BEGIN CERTIFICATE\" block found".into(),
            )
        })?;
        let (not_after, serial) =
            leaf_facts(leaf).map_err(|r| bad("certificate", &origin.cert, r))?;
        let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|e| {
            bad(
                "private key",
                &origin.key,
                format!("no usable PKCS#8, PKCS#1 or SEC1 private key ({e})"),
            )
        })?;
        let mismatch = |e: rustls::Error| {
            bad(
                "certificate",
                &origin.cert,
                format!("does not go with the private key {} ({e})", origin.key),
            )
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let mut servers = Vec::with_capacity(4);
        for auth in [ClientAuth::Required, ClientAuth::Optional] {
            for alpn in [Alpn::H2, Alpn::Http1] {
                let cfg =
                    server(&provider, &roots, auth, &chain, key.clone_key()).map_err(mismatch)?;
                servers.push(with_alpn(cfg, alpn));
            }
        }
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsState {
            generation,
            not_after,
            serial,
            servers: servers.try_into().expect("four server configs"),
            client: Arc::new(client),
            pems: pems.clone(),
        })
    }
}

fn server(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    roots: &Arc<RootCertStore>,
    auth: ClientAuth,
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    );
    let verifier = match auth {
        ClientAuth::Required => verifier.build(),
        ClientAuth::Optional => verifier.allow_unauthenticated().build(),
    }
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key)
}

fn with_alpn(mut cfg: ServerConfig, alpn: Alpn) -> Arc<ServerConfig> {
    cfg.alpn_protocols = vec![match alpn {
        Alpn::H2 => b"h2".to_vec(),
        Alpn::Http1 => b"http/1.1".to_vec(),
    }];
    Arc::new(cfg)
}

/// Every certificate of a CA file (a bundle of several during a CA rotation), as trust anchors.
fn ca_bundle(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let cert = cert.map_err(|e| format!("invalid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} of the bundle: {e}", i + 1))?;
    }
    if roots.is_empty() {
        return Err("no \"BEGIN CERTIFICATE\" block found".into());
    }
    Ok(roots)
}

/// The leaf's notAfter (unix seconds) and serial (hex).
pub fn leaf_facts(leaf: &[u8]) -> Result<(i64, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Ok((cert.validity().not_after.timestamp(), serial))
}

/// Where each part of a source's material comes from, for messages.
#[derive(Debug, Clone)]
struct Origin {
    ca: String,
    cert: String,
    key: String,
}

impl Origin {
    fn of(files: &TlsFiles) -> Origin {
        Origin {
            ca: files.ca.display().to_string(),
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
        }
    }

    fn memory() -> Origin {
        let m = || "(in memory)".to_string();
        Origin {
            ca: m(),
            cert: m(),
            key: m(),
        }
    }
}

/// The series a source reports in `vlm_tls_certificate_expiry_seconds` and `vlm_tls_reloads_total`.
#[derive(Debug, Clone)]
pub struct TlsLabel {
    /// The service's role (`gateway`, `encoder`…).
    pub service: String,
    pub kind: TlsKind,
}

/// The current TLS material of one identity; see the module docs.
pub struct TlsSource {
    files: Option<TlsFiles>,
    origin: Origin,
    label: Option<TlsLabel>,
    current: RwLock<Arc<TlsState>>,
    generations: AtomicU64,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("files", &self.files)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl TlsSource {
    /// Loads `files` once (an error here is a start-up error). With `label`, the certificate's
    /// expiry is exported as a metric, now and on every reload.
    pub fn load(files: &TlsFiles, label: Option<TlsLabel>) -> Result<Arc<TlsSource>, NetError> {
        let pems = files.load()?;
        let origin = Origin::of(files);
        let state = TlsState::build(&pems, &origin, 1)?;
        let source = TlsSource {
            files: Some(files.clone()),
            origin,
            label,
            current: RwLock::new(Arc::new(state)),
            generations: AtomicU64::new(1),
        };
        source.report(&source.current(), None);
        Ok(Arc::new(source))
    }

    /// Material given in memory (tools, tests); never reloaded.
    pub fn from_pems(pems: &TlsPems) -> Result<Arc<TlsSource>, NetError> {
        let origin = Origin::memory();
        let state = TlsState::build(pems, &origin, 1)?;
        Ok(Arc::new(TlsSource {
            files: None,
            origin,
            label: None,
            current: RwLock::new(Arc::new(state)),
            generations: AtomicU64::new(1),
        }))
    }

    /// The material new connections use.
    pub fn current(&self) -> Arc<TlsState> {
        self.current.read().expect("tls state lock").clone()
    }

    /// The files this source reads, if any.
    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_ref()
    }

    /// Loads `pems` (read from this source's files) and makes them current, or says why not.
    pub fn reload_from(&self, pems: &TlsPems) -> Result<Arc<TlsState>, NetError> {
        let generation = self.generations.load(Ordering::Relaxed) + 1;
        let state = match TlsState::build(pems, &self.origin, generation) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.report_refused();
                return Err(e);
            }
        };
        self.generations.store(generation, Ordering::Relaxed);
        let old = std::mem::replace(
            &mut *self.current.write().expect("tls state lock"),
            state.clone(),
        );
        self.report(&state, Some(&old));
        Ok(state)
    }

    /// Polls this source's files every `every` (when it has files and `every` is not zero) and
    /// reloads what changed, until the source is dropped. Must run inside a tokio runtime.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let Some(files) = self.files.clone() else {
            return;
        };
        if every.is_zero() {
            tracing::info!(cert = %files.cert.display(), "TLS reload is off (--tls-reload-interval-secs 0)");
            return;
        }
        let weak = Arc::downgrade(self);
        // From what is in use, not from a first read: a change made between the load and the
        // watcher's first look is a change.
        let mut seen = Some(self.current().pems.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(source) = weak.upgrade() else { return };
                let Ok(now) = read_all(&files).await.inspect_err(|e| {
                    // A file missing for a moment (a non-atomic replacement) is tried again.
                    tracing::debug!(error = %e, "TLS files not readable; keeping the current ones");
                }) else {
                    continue;
                };
                if seen.as_ref() == Some(&now) {
                    continue;
                }
                if let Err(e) = source.reload_from(&now) {
                    tracing::warn!(error = %e, service = source.service(), kind = source.kind(),
                        "TLS reload refused; still serving the previous certificate");
                }
                // Remembered even when refused: the same bad contents are not warned about again.
                seen = Some(now);
            }
        });
    }

    fn service(&self) -> &str {
        self.label.as_ref().map_or("", |l| l.service.as_str())
    }

    fn kind(&self) -> &'static str {
        self.label.as_ref().map_or("", |l| l.kind.as_str())
    }

    fn report(&self, state: &TlsState, old: Option<&TlsState>) {
        if let Some(l) = &self.label {
            vlm_telemetry::metrics::tls_certificate(&l.service, l.kind.as_str(), state.not_after);
            if old.is_some() {
                vlm_telemetry::metrics::tls_reload(&l.service, l.kind.as_str(), true);
            }
        }
        match old {
            None => tracing::info!(service = self.service(), kind = self.kind(),
                cert = %self.origin.cert, serial = %state.serial, not_after = state.not_after,
                "TLS certificate loaded"),
            Some(old) => tracing::info!(service = self.service(), kind = self.kind(),
                cert = %self.origin.cert, serial = %state.serial, not_after = state.not_after,
                old_serial = %old.serial, generation = state.generation,
                "TLS certificate reloaded; new connections use it"),
        }
    }

    fn report_refused(&self) {
        if let Some(l) = &self.label {
            vlm_telemetry::metrics::tls_reload(&l.service, l.kind.as_str(), false);
        }
    }
}

/// The three files' contents (not parsed: [`TlsState::build`] checks them).
async fn read_all(files: &TlsFiles) -> Result<TlsPems, NetError> {
    async fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, NetError> {
        tokio::fs::read(path)
            .await
            .map_err(|source| NetError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
    }
    Ok(TlsPems {
        ca: read(&files.ca, "CA certificate").await?,
        cert: read(&files.cert, "certificate").await?,
        key: read(&files.key, "private key").await?,
    })
}
