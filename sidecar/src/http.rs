//! The sidecar's HTTP port: Stripe webhooks at `POST /stripe/webhook` and
//! Prometheus metrics at `GET /metrics`.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, error};

use crate::billing::webhook::{WebhookHandler, WebhookReply};
use crate::metrics::Metrics;

/// Path of the webhook endpoint, to register in Stripe's dashboard.
pub const WEBHOOK_PATH: &str = "/stripe/webhook";
/// Largest webhook body accepted, in bytes. Stripe's event payloads are
/// far smaller; a larger body is not from Stripe.
const MAX_WEBHOOK_BYTES: usize = 1 << 20;

#[derive(Clone)]
struct AppState {
    webhooks: WebhookHandler,
    metrics: Metrics,
}

/// Serves the HTTP routes on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    webhooks: WebhookHandler,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(WEBHOOK_PATH, post(webhook))
        .route("/metrics", get(render_metrics))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .with_state(AppState { webhooks, metrics });
    let shutdown = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        error!(error = %err, "HTTP server failed; webhooks and metrics are unavailable");
    }
}

/// Binds the HTTP address.
pub async fn bind(address: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> impl IntoResponse {
    let reply = match body {
        Ok(body) => state.webhooks.handle(&headers, &body).await,
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
            state.webhooks.reject_too_large()
        }
        Err(rejection) => {
            // Anyone can cause this, for example by closing the connection
            // mid-body, so it is counted but logged at debug only.
            debug!(error = %rejection, "failed to read a Stripe webhook body");
            WebhookReply::error(rejection.status(), &rejection.body_text())
        }
    };
    state
        .metrics
        .webhook_deliveries
        .with_label_values(&[reply.outcome])
        .inc();
    (
        reply.status,
        [(header::CONTENT_TYPE, "application/json")],
        reply.body,
    )
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
