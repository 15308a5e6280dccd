use std::time::Duration;

use tokio::time::Instant;

use crate::{DeadlineSource, NetError};

/// The host of a URL, as a TLS client must name it: `https://[::1]:80` gives
/// `::1`, `https://decoder.vlm:9000` gives `decoder.vlm`.
pub fn url_host(url: &str) -> Result<String, NetError> {
    let bad = |reason: &str| NetError::Endpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("missing host"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// Parses a `grpc-timeout` header value (`1..=8` digits and a unit
/// `H M S m u n`), so a server can bound its work, and its own outgoing
/// calls, by the caller's deadline. `None` for a malformed value, which the
/// gRPC spec says to treat as no timeout.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.len() < 2 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A fresh 128-bit id as 32 lowercase hex digits — the shape of a W3C trace
/// id, so it can stand in for one until tracing supplies a real one. Unique,
/// not secret: it comes from std's randomly keyed hasher, not a CSPRNG.
pub fn new_request_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = |salt: u64| {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.finish()
    };
    // An all-zero trace id is invalid in W3C trace context.
    let (hi, lo) = (half(1), half(2) | 1);
    format!("{hi:016x}{lo:016x}")
}

/// The deadline of an incoming call, capped by `max` from now (the server's own limit, also used
/// when the caller set none). Given the request, that is the deadline fixed when the call arrived
/// (see [`DeadlineLayer`](crate::DeadlineLayer)); given its metadata alone, now + its
/// `grpc-timeout`.
pub fn request_deadline(call: &impl DeadlineSource, max: Duration) -> Instant {
    let cap = Instant::now() + max;
    call.call_deadline().map_or(cap, |d| d.min(cap))
}

/// An outgoing request carrying the remaining budget until `deadline` as its `grpc-timeout`, so
/// every hop knows how long it has, and gives up when the caller would.
pub fn with_deadline<T>(msg: T, deadline: Instant) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(deadline.saturating_duration_since(Instant::now()));
    req
}

/// Response header in which a stage names the weights that served a call (its model
/// fingerprint, as its `Info` reports it), so a caller learns of a replica swapped for other
/// weights from the very call that the new weights answered.
pub const FINGERPRINT_HEADER: &str = "vlm-fingerprint";

/// `resp` with this replica's model fingerprint in [`FINGERPRINT_HEADER`].
pub fn with_fingerprint<T>(mut resp: tonic::Response<T>, fingerprint: &str) -> tonic::Response<T> {
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(fingerprint) {
        resp.metadata_mut().insert(FINGERPRINT_HEADER, v);
    }
    resp
}

/// The model fingerprint a stage put in its response headers, if any.
pub fn fingerprint_of(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    md.get(FINGERPRINT_HEADER).and_then(|v| v.to_str().ok())
}
