//! The metrics port: [`MeshMetrics::global`] as Prometheus text over plain HTTP/1.1, on
//! `GET /metrics` and, for scrapers and launchers that ask for `/`, on any other path too.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::MeshMetrics;

/// The content type of the exposition: the Prometheus text format 0.0.4, which every Prometheus
/// reads. (prometheus-client's OpenMetrics encoder names counter families without `_total` and
/// ends with `# EOF`, which 0.0.4 parsers such as prometheus-parse do not understand.)
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

async fn scrape() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        MeshMetrics::global().encode(),
    )
}

/// Serves [`MeshMetrics::global`] on `listener` until the process ends.
pub fn serve_metrics(listener: TcpListener) -> JoinHandle<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving Prometheus metrics");
    let app = Router::new()
        .route("/metrics", get(scrape))
        .fallback(scrape);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(?addr, "metrics endpoint stopped: {e}");
        }
    })
}
