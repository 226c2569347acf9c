//! A Redfish client session with one BMC, shared by the agent (BIOS
//! settings and RAID volumes through the machine's Host Interface) and
//! the appliance (power and boot control over the management network).
//!
//! Owns: the HTTP calls with basic auth and timeouts, finding the
//! ComputerSystem as a client must (the configured id, or the only member
//! of `/redfish/v1/Systems`; no guessed paths), and turning BMC answers
//! into errors that say what was refused and whether a retry can help.
//! Must not: decide what to change, or log credentials
//! ([`RedfishTarget`]'s Debug hides the password; URLs never carry it).

use std::time::Duration;

use serde_json::Value;

use crate::model::RedfishTarget;

/// A BMC call that failed: what was asked and refused, and whether
/// trying again later can help (unreachable, 5xx) or not (401/403, 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RedfishError {
    /// What was asked and what the BMC (or the network) answered.
    pub message: String,
    /// Whether trying again later can help.
    pub retryable: bool,
}

fn backend(message: String, retryable: bool) -> RedfishError {
    RedfishError { message, retryable }
}

/// The text of a Redfish error body: `error.message` and every
/// `@Message.ExtendedInfo[].Message` (which usually names the attribute).
pub fn redfish_message(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.chars().take(300).collect();
    };
    let e = &v["error"];
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = e["message"].as_str() {
        parts.push(m.to_string());
    }
    if let Some(infos) = e["@Message.ExtendedInfo"].as_array() {
        for i in infos {
            if let Some(m) = i["Message"].as_str() {
                parts.push(m.to_string());
            }
        }
    }
    if parts.is_empty() {
        body.chars().take(300).collect()
    } else {
        parts.join("; ")
    }
}

/// One BMC: HTTP with basic auth and timeouts, and the system to act on.
pub struct Redfish {
    /// Where and as whom.
    pub target: RedfishTarget,
    /// The base URL, without a trailing slash.
    pub base: String,
    http: reqwest::Client,
    system: Option<String>,
}

impl Redfish {
    /// A session (nothing is sent until the first call).
    pub fn new(target: RedfishTarget) -> Result<Redfish, RedfishError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(!target.tls_verify)
            .build()
            .map_err(|e| backend(format!("HTTP client: {e}"), false))?;
        Ok(Redfish {
            base: target.url.trim_end_matches('/').to_string(),
            target,
            http,
            system: None,
        })
    }

    /// `path` (or a full URL the BMC gave) as a URL.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// One request: the body's text and the `Location` header. Errors say
    /// whether a retry can help (unreachable, 5xx) or not (401/403, 4xx).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(String, Option<String>), RedfishError> {
        let url = self.url(path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .basic_auth(&self.target.username, Some(&self.target.password))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            // Not reachable (yet): the BMC is down or resetting.
            backend(
                format!("BMC unreachable: {method} {url}: {}", error_chain(&e)),
                true,
            )
        })?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(backend(
                format!("BMC refused our credentials: {method} {url}: HTTP {status}"),
                false,
            ));
        }
        if !status.is_success() {
            return Err(backend(
                format!("{method} {url}: HTTP {status}: {}", redfish_message(&text)),
                status.is_server_error(),
            ));
        }
        Ok((text, location))
    }

    /// A request whose answer is JSON (or empty: `Null`).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, RedfishError> {
        let (text, _) = self.send(method.clone(), path, body).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| backend(format!("{method} {}: not JSON: {e}", self.url(path)), false))
    }

    /// GET, the answer as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, RedfishError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// POST that creates a resource: its `Location`, if the BMC says.
    pub async fn create(&self, path: &str, body: Value) -> Result<Option<String>, RedfishError> {
        let (text, location) = self.send(reqwest::Method::POST, path, Some(body)).await?;
        // Some BMCs answer with the new resource instead of a Location.
        Ok(location.or_else(|| {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["@odata.id"].as_str().map(str::to_string))
        }))
    }

    /// POST (an action), the answer as JSON.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, RedfishError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Value, RedfishError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// The ComputerSystem and the path of its link `rel` (`Bios`,
    /// `Storage`), which it must have.
    pub async fn system_link(&mut self, rel: &str) -> Result<(Value, String), RedfishError> {
        let system = self.system_path().await?;
        let sys = self.get(&system).await?;
        let link = sys[rel]["@odata.id"]
            .as_str()
            .ok_or_else(|| backend(format!("{system} has no {rel} resource"), false))?
            .to_string();
        Ok((sys, link))
    }

    /// The ComputerSystem's path: the configured id, or the only member.
    pub async fn system_path(&mut self) -> Result<String, RedfishError> {
        if let Some(p) = &self.system {
            return Ok(p.clone());
        }
        let system_path = match &self.target.system {
            Some(id) => format!("/redfish/v1/Systems/{id}"),
            None => {
                let members = members(&self.get("/redfish/v1/Systems").await?);
                match members.as_slice() {
                    [one] => one.to_string(),
                    other => {
                        return Err(backend(
                            format!(
                                "the BMC has {} systems ({}); name one in bios.redfish.system",
                                other.len(),
                                other.join(", ")
                            ),
                            false,
                        ))
                    }
                }
            }
        };
        self.system = Some(system_path.clone());
        Ok(system_path)
    }
}

/// The `@odata.id`s of a collection's `Members`.
pub fn members(v: &Value) -> Vec<String> {
    v["Members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["@odata.id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redfish_errors_are_read_with_their_extended_info() {
        let body = r#"{"error":{"code":"Base.1.0.GeneralError","message":"A general error has occurred.",
            "@Message.ExtendedInfo":[{"MessageId":"Base.1.0.PropertyValueNotInList",
            "Message":"The value Foo for the property BootMode is not in the list of acceptable values."}]}}"#;
        let m = redfish_message(body);
        assert!(m.contains("BootMode") && m.contains("general error"), "{m}");
        assert_eq!(redfish_message("not json"), "not json");
    }
}
