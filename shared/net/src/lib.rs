//! Transport plumbing shared by every mesh service: mTLS configuration,
//! channels, development certificates, health/reflection and shutdown.
//! No model code lives here.

pub mod certs;
mod channel;
mod error;
mod health;
mod serve;
mod shutdown;
mod tls;
mod util;

pub use channel::{connect, connect_lazy, endpoint, server_builder, ChannelOptions};
pub use error::{error_chain, NetError};
pub use health::{health_and_reflection, wait_until_serving, wait_until_serving_url};
pub use serve::{serve_grpc, serve_grpc_with_health_port};
pub use shutdown::shutdown_signal;
pub use tls::{
    client_tls, client_tls_without_identity, server_tls, server_tls_client_auth_optional,
    ClientAuth, TlsFiles, TlsPems,
};
pub use util::{new_request_id, parse_grpc_timeout, url_host};
