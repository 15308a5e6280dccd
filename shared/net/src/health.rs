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

/// `grpc.health.v1.Health` plus server reflection (v1; see also [`reflection_v1alpha`]) for every `vlm.v1`
/// and health service, ready to `add_service`:
///
/// ```text
/// let (reporter, health, reflection) = vlm_net::health_and_reflection()?;
/// server.add_service(health).add_service(reflection).add_service(my_service)
/// ```
///
/// The reporter starts with only the overall status ("") SERVING; a service
/// marks itself with `reporter.set_serving::<EncoderServer<_>>()` once its
/// weights are loaded, which is what [`wait_until_serving`] polls for.
#[allow(clippy::type_complexity)]
pub fn health_and_reflection() -> Result<
    (
        HealthReporter,
        HealthServer<impl Health>,
        ServerReflectionServer<impl ServerReflection>,
    ),
    NetError,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NetError::Reflection(e.to_string()))?;
    Ok((reporter, health, reflection))
}

/// Server reflection under its older name, `grpc.reflection.v1alpha`: many generic clients
/// (grpcurl before 1.9, the Python `grpcio-reflection` client) only speak that one.
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    NetError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| NetError::Reflection(e.to_string()))
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
