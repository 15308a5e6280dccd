use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Transport setup and readiness failures. Messages name the file, URL or
/// service involved, because these surface at start-up to an operator.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {origin} is not usable: {reason}")]
    Pem {
        what: &'static str,
        origin: String,
        reason: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed for {what}: {source}")]
    CertGen { what: String, source: rcgen::Error },
    #[error("{host:?} cannot be a certificate name: {reason}")]
    InvalidHost { host: String, reason: String },
    #[error("dev certificates in {}: {reason}", dir.display())]
    DevCerts { dir: PathBuf, reason: String },
    #[error("invalid endpoint {url:?}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("TLS configuration rejected: {0}")]
    TlsConfig(String),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("server on {addr} failed: {reason}")]
    Serve { addr: String, reason: String },
    #[error("service {service:?} not SERVING after {waited:?}; last result: {last}")]
    NotReady {
        service: String,
        waited: Duration,
        last: String,
    },
}

/// Formats an error with its whole source chain. tonic's transport errors say
/// only "transport error" at the top; the cause (refused, bad certificate,
/// unknown CA...) is further down and is what an operator needs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
