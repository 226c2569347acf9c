//! The operator's web page on the operator listener: server-rendered
//! HTML (minijinja, autoescaped) of the devices, the running waves with
//! their progress, and each device's log and inventory; a small script
//! follows `GET /api/events` for the live updates. No build chain.
//!
//! Owns: the pages, the sign-in that turns a *viewer* token into a
//! cookie (`HttpOnly`, `Secure`, `SameSite=Strict`; admin tokens are
//! refused, so the browser never holds one), and the pages' security
//! headers. Must not: act on anything (every route here reads; the
//! cookie is only ever accepted for GET, see `auth`).

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Router};

use super::auth::{role_of, Role, COOKIE};
use super::views::LiveView;
use super::Shared;

const INDEX: &str = include_str!("ui/index.html");
const DEVICE: &str = include_str!("ui/device.html");
const LOGIN: &str = include_str!("ui/login.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Pages run only our own script and style, are never framed, and are
/// not sniffed into something else.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn page(name: &'static str, src: &'static str, ctx: minijinja::Value) -> Response {
    let mut env = minijinja::Environment::new();
    let html = env
        .add_template(name, src)
        .and_then(|_| env.get_template(name))
        .and_then(|t| t.render(ctx));
    match html {
        Ok(h) => secure(axum::response::Html(h).into_response()),
        Err(e) => {
            tracing::error!(error = %e, template = name, "page not rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "page not rendered").into_response()
        }
    }
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    secure(([(header::CONTENT_TYPE, kind)], body).into_response())
}

/// Routes that need no sign-in: the sign-in itself and the static files.
pub fn public() -> Router<Shared> {
    Router::new()
        .route("/ui/login", axum::routing::get(login_form).post(login))
        .route("/ui/logout", axum::routing::get(logout))
        .route(
            "/ui/app.js",
            axum::routing::get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            axum::routing::get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// Pages behind the token check (a viewer cookie or a bearer token).
pub fn pages() -> Router<Shared> {
    Router::new()
        .route("/ui", axum::routing::get(index))
        .route("/ui/devices/{id}", axum::routing::get(device))
}

async fn login_form() -> Response {
    page("login.html", LOGIN, minijinja::context! { message => "" })
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// A viewer token becomes the page's cookie; anything else is refused
/// (counted like any refused request).
async fn login(State(s): State<Shared>, Form(f): Form<Login>) -> Response {
    let token = f.token.trim().to_string();
    let refuse = |code: StatusCode, reason: &'static str, message: &'static str| {
        metrics::counter!("rackcast_api_denied_total", "reason" => reason).increment(1);
        let mut r = page("login.html", LOGIN, minijinja::context! { message });
        *r.status_mut() = code;
        r
    };
    match role_of(&s, &token).await {
        Some(Role::Viewer) => {
            let cookie = format!(
                "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=43200"
            );
            let mut r = Redirect::to("/ui").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            secure(r)
        }
        Some(Role::Admin) => refuse(
            StatusCode::FORBIDDEN,
            "needs an admin token",
            "That is an admin token: the page takes a viewer token.",
        ),
        None => refuse(StatusCode::UNAUTHORIZED, "unknown token", "Unknown token."),
    }
}

async fn logout() -> Response {
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "rackcast_view=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    secure(r)
}

fn live(s: &Shared) -> LiveView {
    let json = s.live.borrow().clone();
    serde_json::from_str(&json).unwrap_or(LiveView {
        devices: Vec::new(),
        waves: Vec::new(),
        bringup: None,
    })
}

async fn index(State(s): State<Shared>) -> Response {
    let view = live(&s);
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for d in &view.devices {
        *counts.entry(d.state.as_str()).or_default() += 1;
    }
    let counts = counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    page(
        "index.html",
        INDEX,
        minijinja::context! {
            view => minijinja::Value::from_serialize(&view),
            counts => counts,
            now => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        },
    )
}

/// The most log rows a page shows (the newest).
const PAGE_ROWS: usize = 1000;

async fn device(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let row = live(&s).devices.into_iter().find(|d| d.device == id);
    let readers = s.readers.clone();
    let dev = id.clone();
    let read = tokio::task::spawn_blocking(move || {
        readers.with(|st| Ok((st.inventory(&dev)?, st.events(&dev)?)))
    })
    .await;
    let (inventory, events) = match read {
        Ok(Ok(x)) => x,
        _ => return (StatusCode::SERVICE_UNAVAILABLE, "store not readable").into_response(),
    };
    if row.is_none() && events.is_empty() {
        return (StatusCode::NOT_FOUND, "no such device").into_response();
    }
    let truncated = events.len() > PAGE_ROWS;
    let events: Vec<serde_json::Value> = events
        .iter()
        .skip(events.len().saturating_sub(PAGE_ROWS))
        .map(|e| {
            let at =
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.row.at.max(0) as u64);
            serde_json::json!({
                "time": humantime::format_rfc3339_millis(at).to_string(),
                "step": e.row.step.to_string(),
                "kind": e.row.kind,
                "to_state": e.row.to_state,
                "duration_ms": e.row.duration_ms,
                "detail": e.row.detail,
            })
        })
        .collect();
    let report = inventory
        .as_ref()
        .and_then(|i| serde_json::to_string_pretty(i).ok())
        .unwrap_or_default();
    page(
        "device.html",
        DEVICE,
        minijinja::context! {
            id => id,
            row => minijinja::Value::from_serialize(&row),
            inventory => minijinja::Value::from_serialize(&inventory),
            report => report,
            events => events,
            truncated => truncated,
        },
    )
}
