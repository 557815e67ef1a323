//! The operator API, served by the gateway process itself (axum on the same runtime):
//! JSON over HTTP for devices, readings, events, anomalies, commands and stats; Prometheus `/metrics`;
//! `/healthz`; the live WebSocket feed; and the OpenAPI document of all of it.
//!
//! Handlers are thin: parse and validate, call one function of the domain (the store's read
//! side, the registry, the command desk), render. They read the store through its read pool
//! and committed data through the live hub, never the writer's path, so no request can slow
//! or endanger an ack.
//!
//! - `config`: `[http]`.
//! - `auth`: the bearer token; `error`: the JSON error shape; `params`: query parsing.
//! - `devices`, `data`, `anomalies`, `commands`, `system`, `live`: the routes.
//! - `openapi`: the document at `/api/v1/openapi.json`; `tls`: HTTPS.
//! - `dashboard`: the web page at `/`.

pub mod anomalies;
pub mod auth;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod data;
pub mod devices;
pub mod error;
pub mod live;
pub mod openapi;
pub mod params;
pub mod system;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use sqlx::SqlitePool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::commands::Desk;
use crate::live::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::stats::Stats;

/// What every handler can reach: handles, never globals.
pub struct ApiState {
    /// The store's read pool.
    pub pool: SqlitePool,
    /// Who is online; revoke cuts a live link.
    pub registry: Arc<Registry>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Rates, history and health.
    pub stats: Arc<Stats>,
    /// Committed frames, status changes, command outcomes.
    pub hub: Hub,
    /// The command path shared with MQTT.
    pub commands: Arc<Desk>,
    /// The API token.
    pub token: auth::Token,
    /// Whether `/healthz` and `/metrics` need the token too.
    pub protect_all: bool,
    /// Whether the MQTT bridge runs.
    pub mqtt_enabled: bool,
    /// The report interval devices are asked to keep (ms, 0: none).
    pub pace: Arc<crate::pacing::PaceStatus>,
    /// Most live-feed clients at once.
    pub max_live_clients: usize,
    /// Ping interval of live-feed clients.
    pub live_ping: Duration,
    /// Bytes per second the live feed may send, all clients together.
    pub live_budget: live::Budget,
    /// Cancelled when the gateway stops: live feeds send a close frame.
    pub shutdown: CancellationToken,
}

/// Every route.
pub fn router(state: Arc<ApiState>) -> Router {
    let token = axum::middleware::from_fn_with_state(state.clone(), auth::require_token);
    let api = Router::new()
        .route(
            "/api/v1/devices",
            get(devices::list).post(devices::provision),
        )
        .route("/api/v1/devices/{id}", get(devices::one))
        .route("/api/v1/devices/{id}/revoke", post(devices::revoke))
        .route("/api/v1/devices/{id}/readings", get(data::readings))
        .route("/api/v1/devices/{id}/events", get(data::device_events))
        .route("/api/v1/devices/{id}/commands", post(commands::send))
        .route("/api/v1/commands/{id}", get(commands::get))
        .route("/api/v1/events", get(data::events))
        .route("/api/v1/anomalies", get(anomalies::list))
        .route("/api/v1/stats", get(system::stats))
        .route("/api/v1/live", get(live::upgrade))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route_layer(token.clone());
    let mut open = Router::new()
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics));
    if state.protect_all {
        open = open.route_layer(token);
    }
    // Any origin may call the API from a browser (Grafana panels, scripts on another host):
    // it takes no cookies, only the bearer token, so CORS adds no authority of its own.
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ]);
    api.merge(open)
        .merge(dashboard::routes())
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::wrong_method)
        .layer(cors)
        .with_state(state)
}

/// Serves the API on `listener` (over TLS with `tls`) until `shutdown`; open requests
/// finish first. HTTP/1.1 and HTTP/2 (h2c in the clear, ALPN `h2` over TLS).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state);
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        Some(config) => {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tls::TlsListener::new(listener, acceptor)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}
