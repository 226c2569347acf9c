//! The fleet record: devices, hardware inventory, steps, waves, images,
//! DHCP leases, operator tokens and the append-only event log.
//!
//! Owns: the [`Store`] trait the controller talks to, the one schema with
//! its versioned migrations, and where a store lives ([`StoreLocation`]).
//! Two back ends implement it: SQLite (`sqlite`, one file, the embedded
//! default) and PostgreSQL (`pg`, one fleet record shared by
//! several appliances). A device's new record, its step rows and its
//! event-log rows are written in one transaction, so the log and the
//! state never disagree and a restart resumes every device where it was.
//! Must not: decide anything; the SQL is kept to portable types (TEXT,
//! BIGINT, JSON in TEXT) so both back ends run the same statements but
//! for placeholders.

mod pg;
mod sqlite;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use thiserror::Error;

use rackcast_core::model::Inventory;
use rackcast_core::workflow::{Device, LogRow, Millis};

pub use self::pg::PgStore;
pub use self::sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The server's own message where it sent one (`db error` alone
    /// tells an operator nothing), else the client's with its cause.
    #[error("store (PostgreSQL): {0}")]
    Pg(String),
    #[error("store: {0}")]
    Config(String),
    #[error("store: corrupt record for {what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("store schema version {found} is newer than this rackcast ({known})")]
    TooNew { found: i64, known: i64 },
    /// Another appliance's lease on the device is live: this one may not
    /// write its record until that lease expires.
    #[error("device {device} is driven by appliance {holder} (its lease is live)")]
    Leased { device: String, holder: String },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub hash: String,
    pub block_size: u32,
    pub added_at: Millis,
}

/// Where a wave stands. Stored and shown as `running`, `finished`,
/// `aborted`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WaveState {
    /// Its sender runs.
    Running,
    /// The sender ended; its members' verdicts are in the record.
    Finished,
    /// The sender failed, or the appliance restarted while it ran.
    Aborted,
}

impl WaveState {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Running => "running",
            WaveState::Finished => "finished",
            WaveState::Aborted => "aborted",
        }
    }

    /// From the stored name; `None` for anything else.
    pub fn parse(s: &str) -> Option<WaveState> {
        [WaveState::Running, WaveState::Finished, WaveState::Aborted]
            .into_iter()
            .find(|w| w.as_str() == s)
    }
}

impl std::fmt::Display for WaveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WaveRecord {
    pub id: i64,
    pub image: String,
    pub state: WaveState,
    pub group: String,
    pub created_at: Millis,
    pub ended_at: Option<Millis>,
    pub members: u32,
    pub verified: u32,
    pub failed: u32,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventRecord {
    pub id: i64,
    pub device: String,
    #[serde(flatten)]
    pub row: LogRow,
}

/// What the controller needs from a fleet record.
pub trait Store: Send {
    fn load_devices(&mut self) -> Result<Vec<Device>, StoreError>;
    /// Write the device record, its steps and `rows` atomically.
    fn commit(
        &mut self,
        dev: &Device,
        rows: &[LogRow],
        inventory: Option<&Inventory>,
    ) -> Result<(), StoreError>;
    fn inventory(&mut self, device: &str) -> Result<Option<Inventory>, StoreError>;
    /// Every row of a device's log, oldest first.
    fn events(&mut self, device: &str) -> Result<Vec<EventRecord>, StoreError> {
        self.events_page(device, 0, usize::MAX)
    }
    /// At most `limit` rows of a device's log with ids above `after`,
    /// oldest first (page on with the last row's id).
    fn events_page(
        &mut self,
        device: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;
    /// Remove log rows older than `before`; returns how many.
    fn prune_events(&mut self, before: Millis) -> Result<u64, StoreError>;
    fn event_count(&mut self) -> Result<u64, StoreError>;
    fn put_image(&mut self, img: &ImageRecord) -> Result<(), StoreError>;
    fn images(&mut self) -> Result<Vec<ImageRecord>, StoreError>;
    /// A new running wave of `appliance` (the one whose sender runs it).
    fn create_wave(
        &mut self,
        image: &str,
        group: &str,
        appliance: &str,
        now: Millis,
    ) -> Result<i64, StoreError>;
    fn update_wave(&mut self, w: &WaveRecord) -> Result<(), StoreError>;
    fn waves(&mut self) -> Result<Vec<WaveRecord>, StoreError>;
    /// Mark aborted the running waves whose sender is gone: those of
    /// appliances that hold no live lease any more, and with `own_too`
    /// (at start: a previous process's) those of `me`. Their ids.
    fn abort_waves(
        &mut self,
        me: &str,
        own_too: bool,
        why: &str,
        now: Millis,
    ) -> Result<Vec<i64>, StoreError>;
    /// From now on every [`Store::commit`] of a device takes or renews
    /// its lease for `holder` (`ttl_ms` long) in the same transaction,
    /// and fails with [`StoreError::Leased`] while another holder's lease
    /// is live: one appliance drives a device at a time, and its log has
    /// one writer.
    fn set_lease_holder(&mut self, holder: &str, ttl_ms: i64);
    /// Renew every lease `holder` has; the devices it still holds (a
    /// device taken by another appliance after this one's lease lapsed
    /// is not among them).
    fn renew_leases(&mut self, holder: &str, ttl_ms: i64) -> Result<Vec<String>, StoreError>;
    /// Give up every lease of `holder` (a clean stop: a standby takes
    /// over at once instead of after the leases expire).
    fn release_leases(&mut self, holder: &str) -> Result<u64, StoreError>;
    /// Devices whose lease another holder has, live: `(device, holder)`.
    fn leased_by_others(&mut self, me: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// One device's record as stored (the latest, whoever wrote it).
    fn load_device(&mut self, id: &str) -> Result<Option<Device>, StoreError>;
    /// Bound DHCP leases (full DHCP mode), kept across restarts.
    fn leases(&mut self) -> Result<Vec<rackcast_core::boot::dhcp::Lease>, StoreError>;
    fn save_lease(&mut self, l: &rackcast_core::boot::dhcp::Lease) -> Result<(), StoreError>;
    fn forget_lease(&mut self, mac: &[u8; 6]) -> Result<(), StoreError>;
    /// Store a new operator API token's hash under `name` (names unique).
    fn put_token(&mut self, name: &str, role: &str, hash: &str) -> Result<(), StoreError>;
    /// The role of the token whose BLAKE3 is `hash`, if any.
    fn token_role(&mut self, hash: &str) -> Result<Option<String>, StoreError>;
    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Remove the token named `name`; whether there was one.
    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError>;
    /// The highest migration applied.
    fn schema_version(&mut self) -> Result<i64, StoreError>;
}

/// The schema, one list for both back ends. `{ID}` is the one thing the
/// dialects spell differently: an auto-assigned 64-bit row id, increasing
/// in insertion order (events are paged and ordered by it).
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        mac TEXT NOT NULL,
        state TEXT NOT NULL,
        step TEXT NOT NULL,
        reached TEXT NOT NULL,
        image TEXT,
        bundle TEXT,
        wave BIGINT,
        record TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE inventory (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        vendor TEXT NOT NULL,
        model TEXT NOT NULL,
        serial TEXT NOT NULL,
        arch TEXT NOT NULL,
        report TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE steps (
        device_id TEXT NOT NULL REFERENCES devices(id),
        step TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at BIGINT,
        ended_at BIGINT,
        duration_ms BIGINT,
        detail TEXT NOT NULL,
        PRIMARY KEY (device_id, step)
    );
    CREATE TABLE events (
        id {ID},
        device_id TEXT NOT NULL REFERENCES devices(id),
        at BIGINT NOT NULL,
        step TEXT NOT NULL,
        kind TEXT NOT NULL,
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        duration_ms BIGINT,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_device ON events(device_id, id);
    CREATE TABLE images (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        size BIGINT NOT NULL,
        hash TEXT NOT NULL,
        block_size BIGINT NOT NULL,
        added_at BIGINT NOT NULL
    );
    CREATE TABLE waves (
        id {ID},
        image TEXT NOT NULL,
        state TEXT NOT NULL,
        group_addr TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        ended_at BIGINT,
        members BIGINT NOT NULL DEFAULT 0,
        verified BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT ''
    );",
    ),
    (
        2,
        "CREATE TABLE leases (
        mac TEXT PRIMARY KEY,
        ip TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );",
    ),
    (
        3,
        "CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );",
    ),
    (
        4,
        "CREATE TABLE device_leases (
        device_id TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX device_leases_holder ON device_leases(holder);
    ALTER TABLE waves ADD COLUMN appliance TEXT NOT NULL DEFAULT '';",
    ),
];

/// An operator API token as stored: its BLAKE3, never the token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    pub created_at: Millis,
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> StoreError {
        let msg = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => {
                let mut m = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m.push_str(": ");
                    m.push_str(&s.to_string());
                    src = s.source();
                }
                m
            }
        };
        StoreError::Pg(msg)
    }
}

/// The two spellings of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// Migration `sql` in `dialect`.
fn migration_sql(sql: &str, dialect: Dialect) -> String {
    sql.replace(
        "{ID}",
        match dialect {
            Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Dialect::Postgres => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        },
    )
}

/// The newest schema version this build knows.
fn known_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Where the fleet record lives: `appliance.store` in the config.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (the default, `<state_dir>/rackcast.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by appliances.
    Postgres(PgTarget),
}

/// A PostgreSQL connection: the URL as configured and the password read
/// from `appliance.store_password_file`, if any. Neither is ever logged:
/// [`std::fmt::Debug`] and [`std::fmt::Display`] show host and database.
#[derive(Clone, PartialEq, Eq)]
pub struct PgTarget {
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that the server's certificate must chain to
    /// (`sslmode=require` in the URL makes TLS mandatory).
    pub ca_file: Option<PathBuf>,
}

impl StoreLocation {
    /// A `postgres://` or `postgresql://` URL, else a file path.
    pub fn parse(s: &str) -> StoreLocation {
        if is_postgres_url(s) {
            StoreLocation::Postgres(PgTarget {
                url: s.to_string(),
                password_file: None,
                ca_file: None,
            })
        } else {
            StoreLocation::Sqlite(PathBuf::from(s))
        }
    }
}

/// Whether `s` names a PostgreSQL database rather than a file.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

impl PgTarget {
    /// `host:port/dbname` without user or password, for logs and errors.
    pub fn redacted(&self) -> String {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        // Credentials end at the last '@' before the path.
        let (auth_and_host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = auth_and_host
            .rsplit_once('@')
            .map_or(auth_and_host, |(_, h)| h);
        let db = path.split('?').next().unwrap_or("");
        format!("postgres://{host}/{db}")
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(t) => f.write_str(&t.redacted()),
        }
    }
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Open the fleet record for writing (creating and migrating it).
/// Blocking: call it on a thread, never on a tokio worker.
pub fn open(loc: &StoreLocation) -> Result<Box<dyn Store>, StoreError> {
    Ok(match loc {
        StoreLocation::Sqlite(p) => Box::new(SqliteStore::open(p)?),
        StoreLocation::Postgres(t) => Box::new(PgStore::connect(t, false)?),
    })
}

/// Open the fleet record to read (the CLI, the API's readers). SQLite
/// opens the file read-only; PostgreSQL sets the session read-only. An
/// unmigrated store is an error, never silently created.
pub fn open_readonly(loc: &StoreLocation) -> Result<Box<dyn Store>, StoreError> {
    Ok(match loc {
        StoreLocation::Sqlite(p) => Box::new(SqliteStore::open_readonly(p)?),
        StoreLocation::Postgres(t) => Box::new(PgStore::connect(t, true)?),
    })
}

/// Read-only store handles for the API's and the web page's requests.
/// SQLite opens its file per request (cheap, and never blocks the
/// writer); PostgreSQL keeps a few idle connections, so a request costs
/// no connection setup and the appliance holds a bounded number of
/// connections to a shared server.
pub struct Readers {
    loc: StoreLocation,
    idle: Mutex<Vec<Box<dyn Store>>>,
}

/// Idle read connections kept open (PostgreSQL).
const IDLE_READERS: usize = 4;

impl Readers {
    pub fn new(loc: StoreLocation) -> Arc<Readers> {
        Arc::new(Readers {
            loc,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Run `f` on a read-only store. Blocking: from `spawn_blocking`.
    /// A handle that failed is dropped rather than reused: its
    /// connection may be broken.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = matches!(self.loc, StoreLocation::Postgres(_));
        let reuse = if pooled {
            self.idle.lock().ok().and_then(|mut v| v.pop())
        } else {
            None
        };
        let mut st = match reuse {
            Some(s) => s,
            None => open_readonly(&self.loc)?,
        };
        let out = f(st.as_mut());
        if pooled && out.is_ok() {
            if let Ok(mut v) = self.idle.lock() {
                if v.len() < IDLE_READERS {
                    v.push(st);
                }
            }
        }
        out
    }
}

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: what.to_string(),
        why: e.to_string(),
    }
}

/// Step-table status for an event kind (None: the row does not change it).
fn step_status(kind: &str) -> Option<&'static str> {
    match kind {
        "started" | "retry" => Some("running"),
        "ok" => Some("ok"),
        "skipped" => Some("skipped"),
        "failed" => Some("failed"),
        _ => None,
    }
}

#[cfg(test)]
mod conformance;
// The test helpers the integration tests use: a private PostgreSQL server
// and the skip rule.
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
mod testpg;
#[cfg(test)]
#[path = "../../tests/common/skip.rs"]
mod testskip;
