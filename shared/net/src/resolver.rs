//! How `dns://host:port` replica names become addresses: the system resolver by default; a
//! test can give its own to change the answer on demand (a real DNS server cannot).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

type Lookup = dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
    + Send
    + Sync;

/// Resolves a host and port to every address it names.
#[derive(Clone)]
pub struct Resolver(Arc<Lookup>);

impl Resolver {
    /// A resolver answering with `lookup`.
    pub fn new<F, Fut>(lookup: F) -> Resolver
    where
        F: Fn(String, u16) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        Resolver(Arc::new(move |host, port| Box::pin(lookup(host, port))))
    }

    /// The system's resolver (getaddrinfo, off the async threads): /etc/hosts, DNS.
    pub fn system() -> Resolver {
        Resolver::new(|host: String, port| async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }

    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        (self.0)(host.to_string(), port).await
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}
