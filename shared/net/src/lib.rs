//! Transport plumbing shared by every mesh service: mTLS configuration,
//! channels, development certificates, health/reflection and shutdown, and
//! the resilience mechanisms (replica sets with p2c/peak-EWMA balancing and
//! health-based ejection, retry policy with budget, adaptive timeouts, load
//! shedding, deadline propagation). No model code lives here.

pub mod adaptive;
pub mod admission;
mod byte_budget;
pub mod certs;
mod channel;
mod deadline;
mod error;
mod first_message;
mod health;
mod http_tls;
mod jitter;
mod metered;
pub mod peers;
pub mod replicas;
mod resolver;
pub mod retry;
pub mod roles;
mod serve;
mod shutdown;
mod status_hygiene;
mod tls;
mod tls_accept;
mod tls_connect;
pub mod tls_source;
mod util;

pub use adaptive::{AdaptiveTimeout, AdaptiveTimeoutOptions, PeerPace};
pub use admission::{
    Admission, AdmissionGate, AdmissionLayer, AdmissionLimits, Slot, MAX_QUEUE_WAIT,
};
pub use byte_budget::{ByteBudget, BytePermit, DEFAULT_MAX_BYTES_IN_FLIGHT};
pub use channel::{
    connect, connect_lazy, endpoint, server_builder, ChannelOptions, MAX_STREAMS_PER_CONNECTION,
};
pub use deadline::{CallDeadline, Deadline, DeadlineLayer, DeadlineSource};
pub use error::{error_chain, NetError};
pub use first_message::{read_first_message, FIRST_MESSAGE_TIMEOUT};
pub use health::{
    health_and_reflection, reflection_v1alpha, wait_until_serving, wait_until_serving_url,
};
pub use http_tls::HttpTlsAcceptor;
pub use metered::{MessageLedger, Metered, MeteredMessages};
pub use peers::{Peer, PeerIdentity, PeerPermit, PeerShare};
pub use replicas::{
    Lease, PrefillGuard, Replica, ReplicaOptions, ReplicaSet, TlsForHost, TracedChannel,
};
pub use resolver::Resolver;
pub use retry::{is_retryable, RetryOptions, RetryPolicy};
pub use roles::{AllowedCallers, CallerRole, CallerRoleLayer};
pub use serve::{serve_grpc, serve_grpc_with_health_port, server_layers, ServerLayers};
pub use shutdown::shutdown_signal;
pub use status_hygiene::{StatusHygiene, StatusHygieneLayer, MAX_STATUS_MESSAGE_BYTES};
pub use tls::{
    client_tls, client_tls_without_identity, server_tls, server_tls_client_auth_optional,
    ClientAuth, TlsFiles, TlsPems,
};
pub use tls_accept::{tls_incoming, ServerTls, HANDSHAKE_TIMEOUT};
pub use tls_connect::{lazy_channel, ClientTls};
pub use tls_source::{Alpn, TlsKind, TlsLabel, TlsSource, TlsState};
pub use util::{
    fingerprint_of, new_request_id, parse_grpc_timeout, request_deadline, url_host, with_deadline,
    with_fingerprint, FINGERPRINT_HEADER,
};
