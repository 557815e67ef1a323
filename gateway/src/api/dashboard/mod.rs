//! The web dashboard: a small page embedded in the binary (no CDN, no build step, works on
//! a site with no internet), served at `/`. It is plain HTML, CSS and JavaScript modules;
//! the charts are drawn on a canvas by `chart.js` here, not by a library. The page itself
//! holds nothing secret: it asks for the API token once, keeps it in the browser's storage,
//! and reads everything through the API and the live feed like any other client.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("index.html");
const APP: &str = include_str!("app.js");
const CHART: &str = include_str!("chart.js");
const STYLE: &str = include_str!("style.css");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Assets change with the binary: always revalidate, never serve a stale page.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The dashboard's routes (open: the page asks for the token itself).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'")],
                    asset("text/html; charset=utf-8", INDEX),
                )
            }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/assets/chart.js",
            get(|| async { asset("text/javascript; charset=utf-8", CHART) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// Bytes of the whole page (for the size budget test).
pub fn size() -> usize {
    INDEX.len() + APP.len() + CHART.len() + STYLE.len()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_stays_under_300_kib() {
        assert!(super::size() < 300 * 1024, "{} bytes", super::size());
    }
}
