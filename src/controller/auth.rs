//! Operator authentication on the operator API: bearer tokens with a role
//! (`viewer` reads, `admin` also acts), stored as their BLAKE3 only.
//!
//! Owns: making tokens, the role check on every request, and the rule
//! that a mutation carries a JSON body (so a cross-site form, which cannot
//! send one without a CORS preflight nobody answers, never acts). Must
//! not: log or store a token, or decide what an action does.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::tls::Peer;
use super::Shared;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read devices, logs, waves, images, metrics.
    Viewer,
    /// Also retry, reinstall and every other action.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A new token: 256 random bits, prefixed so it is recognisable in a
/// secrets scanner.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("rct_{hex}")
}

/// What the store keeps of a token. Tokens are 256 random bits, so a
/// plain hash is as strong as a slow one.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    NoToken,
    UnknownToken,
    NotAdmin,
    NotJson,
}

impl Denied {
    fn status(self) -> StatusCode {
        match self {
            Denied::NoToken | Denied::UnknownToken => StatusCode::UNAUTHORIZED,
            Denied::NotAdmin => StatusCode::FORBIDDEN,
            Denied::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Denied::NoToken => "no bearer token",
            Denied::UnknownToken => "unknown token",
            Denied::NotAdmin => "needs an admin token",
            Denied::NotJson => "an action needs a JSON body (Content-Type: application/json)",
        }
    }
}

/// The decision for one request, given the role its token has (`None`:
/// no such token), pure so it is tested without a server.
pub fn decide(
    method: &Method,
    bearer: Option<&str>,
    role: Option<Role>,
    content_type: Option<&str>,
) -> Result<Role, Denied> {
    if bearer.is_none() {
        return Err(Denied::NoToken);
    }
    let role = role.ok_or(Denied::UnknownToken)?;
    let reads = method == Method::GET || method == Method::HEAD;
    if reads {
        return Ok(role);
    }
    if role != Role::Admin {
        return Err(Denied::NotAdmin);
    }
    let json = content_type
        .and_then(|c| c.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(Denied::NotJson);
    }
    Ok(role)
}

fn bearer(req: &Request) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The web page's cookie: a viewer token, accepted for reads only.
pub const COOKIE: &str = "rackcast_view";

/// The token in the page's cookie, if the request has one.
fn cookie_token(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The role of `token`, looked up in the store (read-only connection).
pub(super) async fn role_of(shared: &Shared, token: &str) -> Option<Role> {
    let readers = shared.readers.clone();
    let hash = token_hash(token);
    tokio::task::spawn_blocking(move || readers.with(|s| s.token_role(&hash)).ok().flatten())
        .await
        .ok()
        .flatten()
        .and_then(|r| Role::parse(&r))
}

/// The operator API's gate: every request passes here first.
pub async fn require(
    State(shared): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    // The page's cookie stands in for a bearer token on reads only, and
    // never for more than a viewer: a cross-site request that carries it
    // (SameSite=Strict already stops most) can read nothing it could
    // send anywhere, and can act on nothing.
    let (token, from_cookie) = match bearer(&req) {
        Some(t) => (Some(t), false),
        None if reads => (cookie_token(&req), true),
        None => (None, false),
    };
    let role = match &token {
        Some(t) => role_of(&shared, t)
            .await
            .map(|r| if from_cookie { r.min(Role::Viewer) } else { r }),
        None => None,
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match decide(req.method(), token.as_deref(), role, content_type) {
        Ok(role) => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                tracing::info!(%peer, role = role.as_str(), method = %req.method(), path = %req.uri().path(), "operator action");
            }
            next.run(req).await
        }
        Err(d) => {
            metrics::counter!("rackcast_api_denied_total", "reason" => d.reason()).increment(1);
            tracing::warn!(%peer, method = %req.method(), path = %req.uri().path(), reason = d.reason(), "operator API request refused");
            // A browser without (or with a stale) cookie goes to sign in.
            if reads
                && req.uri().path().starts_with("/ui")
                && matches!(d, Denied::NoToken | Denied::UnknownToken)
            {
                return axum::response::Redirect::to("/ui/login").into_response();
            }
            let mut resp = (
                d.status(),
                axum::Json(serde_json::json!({ "error": d.reason() })),
            )
                .into_response();
            if d.status() == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_a_token_actions_need_admin_and_json() {
        let get = Method::GET;
        let post = Method::POST;
        let json = Some("application/json");
        assert_eq!(decide(&get, None, None, None), Err(Denied::NoToken));
        assert_eq!(
            decide(&get, Some("x"), None, None),
            Err(Denied::UnknownToken)
        );
        assert_eq!(
            decide(&get, Some("x"), Some(Role::Viewer), None),
            Ok(Role::Viewer)
        );
        assert_eq!(
            decide(&post, Some("x"), Some(Role::Viewer), json),
            Err(Denied::NotAdmin)
        );
        // A form post (what a cross-site page can send) never acts.
        for ct in [
            None,
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
        ] {
            assert_eq!(
                decide(&post, Some("x"), Some(Role::Admin), ct),
                Err(Denied::NotJson)
            );
        }
        assert_eq!(
            decide(
                &post,
                Some("x"),
                Some(Role::Admin),
                Some("application/json; charset=utf-8")
            ),
            Ok(Role::Admin)
        );
    }

    #[test]
    fn tokens_are_long_random_and_stored_as_hashes() {
        let a = new_token();
        assert_ne!(a, new_token());
        assert!(a.starts_with("rct_") && a.len() == 68);
        assert_ne!(token_hash(&a), a);
        assert_eq!(token_hash(&a), token_hash(&a));
    }
}
