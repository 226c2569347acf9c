//! The appliance's two HTTP listeners. Provisioning (plain HTTP, on the
//! provisioning LAN): the HTTP half of network boot, per-device iPXE
//! scripts and loader files, nothing else. Operator (HTTPS, bearer
//! tokens): the REST API (devices, a device's event log and inventory,
//! waves, images; `POST /api/devices/{id}/retry`, `/reinstall` and
//! `/approve`; `POST /api/power` and `/api/bmc/check` through the
//! machines' BMCs) and `/metrics`.
//!
//! Owns: HTTP routing and JSON shapes. Reads go to the store through its
//! own read-only connection (WAL readers never block the controller);
//! operator actions and boot-file records go through the controller
//! thread. Must not: change device state itself.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::oneshot;

use super::{Input, Shared};
use crate::store::Store;

/// The provisioning listener (`appliance.api_listen`, plain HTTP, on the
/// provisioning LAN): per-device iPXE scripts and loader files only.
pub async fn serve_boot(listener: tokio::net::TcpListener, shared: Shared) {
    let app: Router<Shared> = Router::new()
        .route("/boot/{script}", get(ipxe_script))
        .route("/boot/by-mac/{mac}/{*file}", get(boot_file));
    let app = match &shared.cfg.boot.http {
        // The loader's kernel and initrd, with byte ranges.
        Some(h) => app.nest_service("/boot/files", tower_http::services::ServeDir::new(&h.files)),
        None => app,
    };
    let app = app.with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "provisioning HTTP server stopped");
    }
}

/// The operator listener (`appliance.operator_listen`, HTTPS): the REST
/// API and `/metrics`, every request behind a bearer token.
pub async fn serve_operator(listener: super::tls::TlsListener, shared: Shared) {
    let app: Router<Shared> = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}/log", get(device_log))
        .route("/api/devices/{id}/inventory", get(device_inventory))
        .route("/api/devices/{id}/retry", post(retry))
        .route("/api/devices/{id}/reinstall", post(reinstall))
        .route("/api/devices/{id}/approve", post(approve))
        .route("/api/power", post(power))
        .route("/api/bmc/check", post(bmc_check))
        .route("/api/bringup", post(bringup_start).get(bringup_status))
        .route("/api/events", get(events))
        .merge(super::ui::pages())
        .route("/api/waves", get(waves))
        .route("/api/images", get(images))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            super::auth::require,
        ))
        .merge(super::ui::public());
    let app = app.with_state(shared);
    let svc = app.into_make_service_with_connect_info::<super::tls::Peer>();
    if let Err(e) = axum::serve(listener, svc).await {
        tracing::error!(error = %e, "operator API server stopped");
    }
}

fn err(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({ "error": msg.to_string() }))).into_response()
}

async fn with_store<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let readers = shared.readers.clone();
    tokio::task::spawn_blocking(move || readers.with(f))
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

/// A page of a device's event log: `?after=<id>` (default 0: from the
/// start), `?limit=<n>` (default and most [`LOG_PAGE`]), oldest first; the
/// next page starts after the last row's `id`.
async fn device_log(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(page): Query<LogPage>,
) -> Response {
    let limit = page.limit.unwrap_or(LOG_PAGE);
    if !(1..=LOG_PAGE).contains(&limit) {
        return err(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {LOG_PAGE}"),
        );
    }
    let after = page.after.unwrap_or(0);
    match with_store(&s, move |st| st.events_page(&id, after, limit)).await {
        Ok(ev) => Json(ev).into_response(),
        Err(r) => r,
    }
}

/// Rows in one page of a device's log.
pub const LOG_PAGE: usize = 1000;

#[derive(serde::Deserialize)]
struct LogPage {
    after: Option<i64>,
    limit: Option<usize>,
}

async fn device_inventory(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match with_store(&s, move |st| st.inventory(&id)).await {
        Ok(Some(inv)) => Json(inv).into_response(),
        Ok(None) => err(
            StatusCode::NOT_FOUND,
            "no inventory reported for this device",
        ),
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

/// An operator action on one device, answered by the controller.
async fn ask_controller(
    s: &Shared,
    input: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Input,
) -> Response {
    match asked(s, input).await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => e,
    }
}

/// The controller's answer to an operator action, or the response that
/// says why there is none.
async fn asked(
    s: &Shared,
    input: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Input,
) -> Result<(), Response> {
    let (tx, rx) = oneshot::channel();
    if s.inbox.send(input(tx)).is_err() {
        return Err(err(StatusCode::SERVICE_UNAVAILABLE, "controller stopped"));
    }
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(err(StatusCode::CONFLICT, e)),
        Err(_) => Err(err(StatusCode::SERVICE_UNAVAILABLE, "controller stopped")),
    }
}

/// `ops` on each machine through its BMC; every call becomes a row of
/// the device's log (through the controller, which owns the log).
async fn bmc_calls(
    s: &Shared,
    entries: Vec<crate::bmc::Entry>,
    ops: &[crate::bmc::PowerOp],
) -> Vec<crate::bmc::CallResult> {
    let macs: std::collections::HashMap<String, String> = entries
        .iter()
        .map(|e| (e.device.clone(), e.mac.clone()))
        .collect();
    let results = crate::bmc::call_many(entries, ops, &s.cfg.bmc).await;
    for r in &results {
        let _ = s.inbox.send(Input::Bmc {
            device: r.device.clone(),
            mac: macs.get(&r.device).cloned().unwrap_or_default(),
            create: r.action.changes(),
            ok: r.ok,
            detail: format!("power {} via {}: {}", r.action.as_str(), r.bmc, r.detail),
            duration_ms: r.duration_ms,
        });
    }
    results
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerRequest {
    /// `status`, `on`, `off`, `cycle` or `pxe_once`.
    action: String,
    #[serde(flatten)]
    select: crate::bmc::Selection,
}

/// Power or boot control of the named machines (devices, a rack, or
/// all), each through its BMC: one result per machine, each logged.
async fn power(State(s): State<Shared>, Json(req): Json<PowerRequest>) -> Response {
    let Some(op) = crate::bmc::PowerOp::parse(&req.action) else {
        return err(
            StatusCode::BAD_REQUEST,
            "action: expected status, on, off, cycle or pxe_once",
        );
    };
    let entries = match s.bmcs.select(&req.select) {
        Ok(e) => e,
        Err(e) => return err(StatusCode::NOT_FOUND, e),
    };
    Json(bmc_calls(&s, entries, &[op]).await).into_response()
}

/// The live view as server-sent events: the whole view (JSON, event
/// `view`) at once and again each time it changes, at most twice a
/// second; a comment every 15 s keeps idle proxies from closing it.
async fn events(State(s): State<Shared>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = s.live.clone();
    let stream = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let data = rx.borrow_and_update().clone();
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().event("view").data(data.as_str())),
            (rx, false),
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}

/// Power on the named machines (a rack, devices, or all) at the inrush
/// limit and watch them network-boot; machines already past their first
/// boot are left alone. Answers at once; `GET /api/bringup` follows it.
async fn bringup_start(
    State(s): State<Shared>,
    Json(sel): Json<crate::bmc::Selection>,
) -> Response {
    let entries = match s.bmcs.select(&sel) {
        Ok(e) => e,
        Err(e) => return err(StatusCode::NOT_FOUND, e),
    };
    let records = match with_store(&s, |st| st.load_devices()).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let up: std::collections::HashMap<String, String> = records
        .iter()
        .filter(|d| d.reached > rackcast_core::model::Step::Discovered)
        .map(|d| (d.id.clone(), d.state().to_string()))
        .collect();
    let (skipped, entries): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|e| up.contains_key(&e.device));
    let skipped = skipped
        .into_iter()
        .map(|e| (e.device.clone(), up[&e.device].clone()))
        .collect();
    match crate::bringup::start(&s, entries, skipped) {
        Ok(st) => (StatusCode::ACCEPTED, Json(st)).into_response(),
        Err(e) => err(StatusCode::CONFLICT, e),
    }
}

async fn bringup_status(State(s): State<Shared>) -> Response {
    let st = s.bringup.lock().ok().and_then(|b| b.clone());
    match st {
        Some(st) => Json(st).into_response(),
        None => err(StatusCode::NOT_FOUND, "no bringup has run"),
    }
}

/// Reach every BMC and read its power state: which answer and which do
/// not. Changes nothing and logs nothing on the devices.
async fn bmc_check(State(s): State<Shared>, _: Json<serde_json::Value>) -> Response {
    let all = crate::bmc::Selection {
        all: true,
        ..Default::default()
    };
    let entries = s.bmcs.select(&all).unwrap_or_default();
    Json(crate::bmc::call_many(entries, &[crate::bmc::PowerOp::Status], &s.cfg.bmc).await)
        .into_response()
}

/// Actions take a JSON body (the auth layer insists on its type; `Json`
/// on it being JSON): `{}` today, room for options later.
async fn retry(
    State(s): State<Shared>,
    Path(id): Path<String>,
    _: Json<serde_json::Value>,
) -> Response {
    ask_controller(&s, |reply| Input::Retry { device: id, reply }).await
}

/// Install a finished device again: its next network boot gets the
/// loader. A machine with a BMC is then set to boot from the network
/// once and reset (powered on if it was off), so nobody touches it.
async fn reinstall(
    State(s): State<Shared>,
    Path(id): Path<String>,
    _: Json<serde_json::Value>,
) -> Response {
    let device = id.clone();
    if let Err(e) = asked(&s, |reply| Input::Reinstall { device, reply }).await {
        return e;
    }
    let Some(e) = s.bmcs.get(&id).cloned() else {
        return Json(serde_json::json!({ "ok": true, "bmc": [] })).into_response();
    };
    use crate::bmc::PowerOp;
    let results = bmc_calls(&s, vec![e], &[PowerOp::PxeOnce, PowerOp::Cycle]).await;
    let ok = results.len() == 2 && results.iter().all(|r| r.ok);
    Json(serde_json::json!({ "ok": ok, "bmc": results })).into_response()
}

/// Install a device held after its inventory (`[enroll] policy =
/// "approve"`, or a serial the rack inventory does not list).
async fn approve(
    State(s): State<Shared>,
    Path(id): Path<String>,
    _: Json<serde_json::Value>,
) -> Response {
    ask_controller(&s, |reply| Input::Approve { device: id, reply }).await
}

/// The per-device iPXE script, `GET /boot/<mac>.ipxe`: the loader while
/// the device is to be installed (the appliance address and its signing
/// key's fingerprint on its command line), `exit` (boot the next device:
/// the disk) once it is installed. Every fetch is logged against the
/// device.
async fn ipxe_script(State(s): State<Shared>, Path(script): Path<String>) -> Response {
    let Some(mac) = script.strip_suffix(".ipxe") else {
        return err(StatusCode::NOT_FOUND, "not a script");
    };
    let Some(mac) = rackcast_core::boot::dhcp::parse_mac(mac) else {
        return err(StatusCode::BAD_REQUEST, "not a MAC address");
    };
    let mac = rackcast_core::boot::dhcp::mac_string(&mac);
    if !s.enroll.answers(&mac) {
        metrics::counter!("rackcast_boot_files_unknown_device_total").increment(1);
        return err(StatusCode::NOT_FOUND, "unknown device");
    }
    let Some(h) = s.cfg.boot.http.clone() else {
        return err(StatusCode::NOT_FOUND, "HTTP boot is not configured");
    };
    let installed = s
        .installed
        .read()
        .map(|set| set.contains(&mac))
        .unwrap_or(false);
    let _ = s.inbox.send(Input::BootSeen {
        mac: mac.clone(),
        how: format!(
            "iPXE fetched its script ({})",
            if installed {
                "boot from disk"
            } else {
                "loader"
            }
        ),
    });
    let body = if installed {
        "#!ipxe\necho rackcast: installed, booting from disk\nexit\n".to_string()
    } else {
        // Files under the device's MAC: each fetch is logged against it;
        // the file names stay what `initrd=` refers to.
        let base = match s.cfg.appliance.api_listen {
            Some(a) => format!("http://{a}/boot/by-mac/{mac}"),
            None => return err(StatusCode::NOT_FOUND, "no API address"),
        };
        format!(
            "#!ipxe\necho rackcast: loading the loader for {mac}\n\
             kernel {base}/{k} initrd={i} rackcast.server={srv} rackcast.key={key} rackcast.mac={mac} {extra}\n\
             initrd {base}/{i}\nboot\n",
            k = h.kernel,
            i = h.initrd,
            srv = s.cfg.appliance.control_listen,
            key = s.signer.fingerprint(),
            extra = h.cmdline,
        )
    };
    ([(axum::http::header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// A loader file for one device, `GET /boot/by-mac/<mac>/<file>`: served
/// from `boot.http.files` with byte ranges (tower-http's ServeDir, which
/// also refuses `..`), and recorded in that device's log.
async fn boot_file(
    State(s): State<Shared>,
    Path((mac, file)): Path<(String, String)>,
    req: axum::extract::Request,
) -> Response {
    use tower::ServiceExt;
    let Some(mac) = rackcast_core::boot::dhcp::parse_mac(&mac) else {
        return err(StatusCode::BAD_REQUEST, "not a MAC address");
    };
    let mac = rackcast_core::boot::dhcp::mac_string(&mac);
    if !s.enroll.answers(&mac) {
        metrics::counter!("rackcast_boot_files_unknown_device_total").increment(1);
        return err(StatusCode::NOT_FOUND, "unknown device");
    }
    let Some(h) = s.cfg.boot.http.clone() else {
        return err(StatusCode::NOT_FOUND, "HTTP boot is not configured");
    };
    let range = req
        .headers()
        .get(axum::http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (mut parts, body) = req.into_parts();
    let Ok(uri) = format!("/{file}").parse() else {
        return err(StatusCode::BAD_REQUEST, "bad file name");
    };
    parts.uri = uri;
    let resp = match tower_http::services::ServeDir::new(&h.files)
        .oneshot(axum::extract::Request::from_parts(parts, body))
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let len = resp
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let what = format!(
        "HTTP GET {file}{}: {}, {len} bytes",
        range.map(|r| format!(" ({r})")).unwrap_or_default(),
        resp.status().as_u16()
    );
    let _ = s.inbox.send(Input::BootFile { mac, what });
    resp
}
