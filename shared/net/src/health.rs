//! Standard services every mesh process exposes, and readiness polling.

use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

use crate::{connect_lazy, NetError};

/// `grpc.health.v1.Health` plus server reflection (v1; see also [`reflection_v1alpha`]) listing what
/// the port serves: `served` (e.g. `vlm.v1.Gateway`), health and reflection — not the other
/// `vlm.v1` services, which answer UNIMPLEMENTED there. Ready to `add_service`:
///
/// ```text
/// let (reporter, health, reflection) = vlm_net::health_and_reflection("vlm.v1.Encoder")?;
/// server.add_service(health).add_service(reflection).add_service(my_service)
/// ```
///
/// The reporter starts with only the overall status ("") SERVING; a service
/// marks itself with `reporter.set_serving::<EncoderServer<_>>()` once its
/// weights are loaded, which is what [`wait_until_serving`] polls for.
#[allow(clippy::type_complexity)]
pub fn health_and_reflection(
    served: &str,
) -> Result<
    (
        HealthReporter,
        HealthServer<impl Health>,
        ServerReflectionServer<impl ServerReflection>,
    ),
    NetError,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = reflection_builder(served)
        .build_v1()
        .map_err(|e| NetError::Reflection(e.to_string()))?;
    Ok((reporter, health, reflection))
}

/// Server reflection under its older name, `grpc.reflection.v1alpha`: many generic clients
/// (grpcurl before 1.9, the Python `grpcio-reflection` client) only speak that one.
pub fn reflection_v1alpha(
    served: &str,
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    NetError,
> {
    reflection_builder(served)
        .build_v1alpha()
        .map_err(|e| NetError::Reflection(e.to_string()))
}

/// The gRPC services every mesh port serves besides its own.
pub const STANDARD_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection_builder(served: &str) -> tonic_reflection::server::Builder<'static> {
    // Both reflection versions are described on both, since both are listed.
    let mut b = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(vlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(served);
    for name in STANDARD_SERVICES {
        b = b.with_service_name(*name);
    }
    b
}

/// Polls `grpc.health.v1.Health/Check` for `service` until it reports
/// SERVING or `deadline` passes. Unreachable peers, unknown services and
/// NOT_SERVING all count as "not yet"; the last answer goes into the error.
/// Backoff starts at 10 ms and doubles to 250 ms, so a fresh process is
/// noticed quickly without hammering a slow one.
pub async fn wait_until_serving(
    channel: Channel,
    service: &str,
    deadline: impl Into<Instant>,
) -> Result<(), NetError> {
    let deadline = deadline.into();
    let started = Instant::now();
    let mut client = HealthClient::new(channel);
    let mut backoff = Duration::from_millis(10);
    let mut last = String::from("no attempt finished before the deadline");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(NetError::NotReady {
                service: service.to_string(),
                waited: now - started,
                last,
            });
        }
        // Each attempt is bounded too: a connection stuck in a handshake
        // must not carry the wait past the deadline.
        let attempt = tokio::time::timeout_at(
            deadline,
            client.check(HealthCheckRequest {
                service: service.to_string(),
            }),
        )
        .await;
        match attempt {
            Ok(Ok(resp)) => match resp.into_inner().status() {
                ServingStatus::Serving => return Ok(()),
                other => last = format!("status {}", other.as_str_name()),
            },
            Ok(Err(status)) => last = format!("{:?}: {}", status.code(), status.message()),
            Err(_) => last = "health check still pending at the deadline".to_string(),
        }
        tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// [`wait_until_serving`] for a URL, for launchers that know addresses
/// rather than channels. `tls` must agree with the scheme (see [`crate::endpoint`]).
pub async fn wait_until_serving_url(
    url: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    service: &str,
    timeout: Duration,
) -> Result<(), NetError> {
    let deadline = Instant::now() + timeout;
    wait_until_serving(connect_lazy(url, tls)?, service, deadline).await
}
