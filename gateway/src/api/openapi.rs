//! The OpenAPI document at `/api/v1/openapi.json`, generated from the handlers' own
//! annotations (utoipa), so it cannot drift from the routes.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{anomalies, commands, data, devices, live, system};

/// The API's document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Edge IoT gateway API", description = "Devices, stored readings and events, commands, stats, metrics and the live feed of one gateway. Every /api/ route needs `Authorization: Bearer TOKEN`."),
    paths(
        devices::list, devices::one, devices::provision, devices::revoke,
        data::readings, data::device_events, data::events, anomalies::list,
        commands::send, commands::get,
        system::healthz, system::metrics, system::stats,
        live::upgrade,
    ),
    components(schemas(live::Subscribe, crate::commands::Request)),
    modifiers(&Bearer),
    tags(
        (name = "devices", description = "Known devices, provisioning, revocation"),
        (name = "data", description = "Stored readings, events and anomalies"),
        (name = "commands", description = "Commands to devices (the same path as MQTT)"),
        (name = "live", description = "Committed data as it happens, over WebSocket"),
        (name = "system", description = "Health, metrics and stats"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, description = "This document")),
    security(("bearer" = [])))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route() {
        let doc = ApiDoc::openapi();
        for path in [
            "/api/v1/devices",
            "/api/v1/devices/{id}",
            "/api/v1/devices/{id}/revoke",
            "/api/v1/devices/{id}/readings",
            "/api/v1/devices/{id}/events",
            "/api/v1/devices/{id}/commands",
            "/api/v1/commands/{id}",
            "/api/v1/events",
            "/api/v1/anomalies",
            "/api/v1/stats",
            "/api/v1/live",
            "/healthz",
            "/metrics",
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} missing");
        }
    }
}
