//! A machine's BMC as a plan names it: address, credentials and how the
//! agent treats it.
//!
//! Owns: the target's shape (it travels inside bundles) and a `Debug` that
//! never prints the password. Must not: speak Redfish (the agent's client
//! does).

use serde::{Deserialize, Serialize};

/// A BMC as a bundle names it. Devices of one profile share it: the
/// Redfish Host Interface has the same address on every machine.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedfishTarget {
    /// `https://169.254.95.118` (Host Interface) or any base URL.
    pub url: String,
    /// Basic-auth user.
    pub username: String,
    /// Basic-auth password: never in a log (see `Debug`).
    pub password: String,
    /// ComputerSystem id; default: the only member of /redfish/v1/Systems.
    pub system: Option<String>,
    /// The ResetType that makes pending BIOS settings take effect.
    pub reset: String,
    /// Check the BMC's TLS certificate (most ship self-signed ones).
    pub tls_verify: bool,
    /// How long to wait for the settings to read back after the reset.
    pub settle_timeout_s: u64,
}

impl std::fmt::Debug for RedfishTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedfishTarget")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("system", &self.system)
            .field("reset", &self.reset)
            .field("tls_verify", &self.tls_verify)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let t = RedfishTarget {
            url: "https://198.18.1.1".into(),
            username: "admin".into(),
            password: "s3cret-pw".into(),
            system: None,
            reset: "ForceRestart".into(),
            tls_verify: false,
            settle_timeout_s: 60,
        };
        let s = format!("{t:?}");
        assert!(!s.contains("s3cret-pw") && s.contains("<hidden>"), "{s}");
    }
}
