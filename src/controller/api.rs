//! REST API and `/metrics`: devices, a device's event log, waves, images;
//! `POST /api/devices/{id}/retry`.
//!
//! Owns: HTTP routing and JSON shapes. Reads go to the store through its
//! own read-only connection (WAL readers never block the controller);
//! the one write (retry) goes through the controller thread. Must not:
//! change device state itself.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::oneshot;

use super::{Input, Shared};
use crate::store::{SqliteStore, Store};

pub async fn serve_api(listener: tokio::net::TcpListener, shared: Shared) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}/log", get(device_log))
        .route("/api/devices/{id}/retry", post(retry))
        .route("/api/waves", get(waves))
        .route("/api/images", get(images))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "API server stopped");
    }
}

fn err(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({ "error": msg.to_string() }))).into_response()
}

async fn with_store<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut SqliteStore) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let path = shared.cfg.store_path();
    tokio::task::spawn_blocking(move || {
        let mut s = SqliteStore::open_readonly(&path)?;
        f(&mut s)
    })
    .await
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))?
    .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn metrics(State(s): State<Shared>) -> Response {
    match &s.metrics {
        Some(h) => h.render().into_response(),
        None => err(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        ),
    }
}

async fn devices(State(s): State<Shared>) -> Response {
    match with_store(&s, |st| st.load_devices()).await {
        Ok(d) => {
            let progress = s.progress.lock().map(|p| p.clone()).unwrap_or_default();
            Json(crate::controller::device_rows(&d, &progress)).into_response()
        }
        Err(r) => r,
    }
}

async fn device_log(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match with_store(&s, move |st| st.events(&id)).await {
        Ok(ev) => Json(ev).into_response(),
        Err(r) => r,
    }
}

async fn waves(State(s): State<Shared>) -> Response {
    match with_store(&s, |st| st.waves()).await {
        Ok(w) => Json(w).into_response(),
        Err(r) => r,
    }
}

async fn images(State(s): State<Shared>) -> Response {
    match with_store(&s, |st| st.images()).await {
        Ok(i) => Json(i).into_response(),
        Err(r) => r,
    }
}

async fn retry(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let (tx, rx) = oneshot::channel();
    if s.inbox
        .send(Input::Retry {
            device: id,
            reply: tx,
        })
        .is_err()
    {
        return err(StatusCode::SERVICE_UNAVAILABLE, "controller stopped");
    }
    match rx.await {
        Ok(Ok(())) => Json(serde_json::json!({ "ok": true })).into_response(),
        Ok(Err(e)) => err(StatusCode::CONFLICT, e),
        Err(_) => err(StatusCode::SERVICE_UNAVAILABLE, "controller stopped"),
    }
}
