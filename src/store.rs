//! The fleet record: devices, hardware inventory, steps, waves, images and
//! the append-only event log.
//!
//! Owns: the [`Store`] trait the controller talks to and its SQLite
//! implementation (one file, WAL, versioned migrations). A device's new
//! record, its step rows and its event-log rows are written in one
//! transaction, so the log and the state never disagree and a restart
//! resumes every device where it was. Must not: decide anything; the SQL is
//! kept to portable types (TEXT, BIGINT, JSON in TEXT) so a PostgreSQL
//! implementation of the same trait can share one fleet record between
//! appliances.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use thiserror::Error;

use rackcast_core::model::Inventory;
use rackcast_core::model::Step;
use rackcast_core::workflow::{Device, LogRow, Millis};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store: corrupt record for {what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("store schema version {found} is newer than this rackcast ({known})")]
    TooNew { found: i64, known: i64 },
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
    fn create_wave(&mut self, image: &str, group: &str, now: Millis) -> Result<i64, StoreError>;
    fn update_wave(&mut self, w: &WaveRecord) -> Result<(), StoreError>;
    fn waves(&mut self) -> Result<Vec<WaveRecord>, StoreError>;
    /// Mark waves left `running` by a previous process as aborted.
    fn abort_running_waves(&mut self, why: &str, now: Millis) -> Result<Vec<i64>, StoreError>;
    /// Bound DHCP leases (full DHCP mode), kept across restarts.
    fn leases(&mut self) -> Result<Vec<rackcast_core::boot::dhcp::Lease>, StoreError>;
    fn save_lease(&mut self, l: &rackcast_core::boot::dhcp::Lease) -> Result<(), StoreError>;
    fn forget_lease(&mut self, mac: &[u8; 6]) -> Result<(), StoreError>;
}

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
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
];

/// An operator API token as stored: its BLAKE3, never the token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    pub created_at: Millis,
}

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        // The store holds device secrets and token hashes: owner only,
        // from the first byte (the WAL and shm files inherit the mode).
        // Create-or-open, never create_new: the appliance and a CLI
        // process (`rackcast token create` at first start) may open a new
        // store at the same moment, and one of them must not fail.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| corrupt("creating the store file", e))?;
        }
        restrict(path).map_err(|e| corrupt("setting the store file's mode", e))?;
        let conn = Connection::open(path)?;
        // WAL: readers (the CLI) never block the appliance; NORMAL sync is
        // durable across a process kill (only an OS crash can lose the
        // last transactions, never corrupt the file).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mut s = SqliteStore { conn };
        s.migrate()?;
        Ok(s)
    }

    /// Read-only access for the CLI while the appliance runs.
    pub fn open_readonly(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(SqliteStore { conn })
    }

    /// Store a new operator API token's hash under `name`.
    pub fn put_token(&mut self, name: &str, role: &str, hash: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO api_tokens (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, role, hash, now_ms()],
        )?;
        Ok(())
    }

    /// The role of the token whose BLAKE3 is `hash`, if any.
    pub fn token_role(&mut self, hash: &str) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row(
                "SELECT role FROM api_tokens WHERE hash = ?1",
                params![hash],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, role, created_at FROM api_tokens ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(TokenRecord {
                name: r.get(0)?,
                role: r.get(1)?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Remove the token named `name`; whether there was one.
    pub fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE name = ?1", params![name])?
            > 0)
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )?;
        let have = self.schema_version()?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if have > known {
            return Err(StoreError::TooNew { found: have, known });
        }
        for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
            // Immediate: two processes opening a new store at once (the
            // appliance starting, `rackcast token create`) take turns,
            // and the second sees the first's migration as applied.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now: i64 = tx.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )?;
            if now >= *v {
                continue;
            }
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![v, now_ms()],
            )?;
            tx.commit()?;
        }
        Ok(())
    }
}

/// Owner-only mode on the store file and any WAL/shm beside it.
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    for ext in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(ext);
        let side = std::path::PathBuf::from(side);
        if side.exists() {
            std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
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

impl Store for SqliteStore {
    fn load_devices(&mut self) -> Result<Vec<Device>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, record FROM devices ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, rec) = row?;
            out.push(serde_json::from_str(&rec).map_err(|e| corrupt(&id, e))?);
        }
        Ok(out)
    }

    fn commit(
        &mut self,
        dev: &Device,
        rows: &[LogRow],
        inventory: Option<&Inventory>,
    ) -> Result<(), StoreError> {
        let record = serde_json::to_string(dev).map_err(|e| corrupt(&dev.id, e))?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO devices (id, mac, state, step, reached, image, bundle, wave, record,
                                  created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET mac = excluded.mac, state = excluded.state,
                step = excluded.step, reached = excluded.reached, image = excluded.image,
                bundle = excluded.bundle, wave = excluded.wave, record = excluded.record,
                updated_at = excluded.updated_at",
            params![
                dev.id,
                dev.mac,
                dev.state(),
                dev.current_step().as_str(),
                dev.reached.as_str(),
                dev.image,
                dev.bundle,
                dev.wave,
                record,
                dev.created,
                dev.updated
            ],
        )?;
        if let Some(inv) = inventory {
            let report = serde_json::to_string(inv).map_err(|e| corrupt(&dev.id, e))?;
            tx.execute(
                "INSERT INTO inventory (device_id, vendor, model, serial, arch, report, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (device_id) DO UPDATE SET vendor = excluded.vendor,
                    model = excluded.model, serial = excluded.serial, arch = excluded.arch,
                    report = excluded.report, updated_at = excluded.updated_at",
                params![
                    dev.id,
                    inv.dmi.vendor,
                    inv.dmi.model,
                    inv.dmi.serial,
                    inv.cpu.arch,
                    report,
                    dev.updated
                ],
            )?;
        }
        for r in rows {
            tx.execute(
                "INSERT INTO events (device_id, at, step, kind, from_state, to_state, duration_ms, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    dev.id,
                    r.at,
                    r.step.as_str(),
                    r.kind,
                    r.from_state,
                    r.to_state,
                    r.duration_ms.map(|d| d as i64),
                    r.detail
                ],
            )?;
            if let Some(status) = step_status(&r.kind) {
                let started = (status == "running").then_some(r.at);
                let ended = (status != "running").then_some(r.at);
                tx.execute(
                    "INSERT INTO steps (device_id, step, status, started_at, ended_at, duration_ms, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (device_id, step) DO UPDATE SET status = excluded.status,
                        started_at = COALESCE(excluded.started_at, steps.started_at),
                        ended_at = excluded.ended_at, duration_ms = excluded.duration_ms,
                        detail = excluded.detail",
                    params![
                        dev.id,
                        r.step.as_str(),
                        status,
                        started,
                        ended,
                        r.duration_ms.map(|d| d as i64),
                        r.detail
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn inventory(&mut self, device: &str) -> Result<Option<Inventory>, StoreError> {
        let rep: Option<String> = self
            .conn
            .query_row(
                "SELECT report FROM inventory WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?;
        rep.map(|s| serde_json::from_str(&s).map_err(|e| corrupt(device, e)))
            .transpose()
    }

    fn events_page(
        &mut self,
        device: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, device_id, at, step, kind, from_state, to_state, duration_ms, detail
             FROM events WHERE device_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(rusqlite::params![device, after, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, String>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, device, at, step, kind, from_state, to_state, dur, detail) = row?;
            let step = Step::parse(&step).ok_or_else(|| corrupt(&device, "unknown step"))?;
            out.push(EventRecord {
                id,
                device,
                row: LogRow {
                    at,
                    step,
                    kind,
                    from_state,
                    to_state,
                    duration_ms: dur.map(|d| d.max(0) as u64),
                    detail,
                },
            });
        }
        Ok(out)
    }

    fn prune_events(&mut self, before: Millis) -> Result<u64, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM events WHERE at < ?1", [before])?;
        Ok(n as u64)
    }

    fn event_count(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    fn put_image(&mut self, img: &ImageRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO images (name, path, size, hash, block_size, added_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET path = excluded.path, size = excluded.size,
                hash = excluded.hash, block_size = excluded.block_size",
            params![
                img.name,
                img.path,
                img.size as i64,
                img.hash,
                img.block_size,
                img.added_at
            ],
        )?;
        Ok(())
    }

    fn images(&mut self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT name, path, size, hash, block_size, added_at FROM images ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ImageRecord {
                name: r.get(0)?,
                path: r.get(1)?,
                size: r.get::<_, i64>(2)?.max(0) as u64,
                hash: r.get(3)?,
                block_size: r.get::<_, i64>(4)?.max(0) as u32,
                added_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_wave(&mut self, image: &str, group: &str, now: Millis) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO waves (image, state, group_addr, created_at) VALUES (?1, 'running', ?2, ?3)",
            params![image, group, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn update_wave(&mut self, w: &WaveRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE waves SET state = ?2, ended_at = ?3, members = ?4, verified = ?5, failed = ?6,
                detail = ?7, group_addr = ?8 WHERE id = ?1",
            params![
                w.id,
                w.state.as_str(),
                w.ended_at,
                w.members,
                w.verified,
                w.failed,
                w.detail,
                w.group
            ],
        )?;
        Ok(())
    }

    fn waves(&mut self) -> Result<Vec<WaveRecord>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, image, state, group_addr, created_at, ended_at, members, verified, failed,
                    detail FROM waves ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(WaveRecord {
                id: r.get(0)?,
                image: r.get(1)?,
                state: {
                    let t: String = r.get(2)?;
                    WaveState::parse(&t).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            format!("unknown wave state {t:?}").into(),
                        )
                    })?
                },
                group: r.get(3)?,
                created_at: r.get(4)?,
                ended_at: r.get(5)?,
                members: r.get::<_, i64>(6)?.max(0) as u32,
                verified: r.get::<_, i64>(7)?.max(0) as u32,
                failed: r.get::<_, i64>(8)?.max(0) as u32,
                detail: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn leases(&mut self) -> Result<Vec<rackcast_core::boot::dhcp::Lease>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT mac, ip, expires_at FROM leases ORDER BY mac")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mac, ip, expires) = row?;
            let mac = rackcast_core::boot::dhcp::parse_mac(&mac)
                .ok_or_else(|| corrupt(&mac, "bad MAC"))?;
            let ip = ip.parse().map_err(|e| corrupt("lease", e))?;
            out.push(rackcast_core::boot::dhcp::Lease {
                mac,
                ip,
                state: rackcast_core::boot::dhcp::LeaseState::Bound,
                expires,
            });
        }
        Ok(out)
    }

    fn save_lease(&mut self, l: &rackcast_core::boot::dhcp::Lease) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO leases (mac, ip, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (mac) DO UPDATE SET ip = excluded.ip, expires_at = excluded.expires_at",
            params![
                rackcast_core::boot::dhcp::mac_string(&l.mac),
                l.ip.to_string(),
                l.expires
            ],
        )?;
        Ok(())
    }

    fn forget_lease(&mut self, mac: &[u8; 6]) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM leases WHERE mac = ?1",
            [rackcast_core::boot::dhcp::mac_string(mac)],
        )?;
        Ok(())
    }

    fn abort_running_waves(&mut self, why: &str, now: Millis) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<i64> = {
            let mut st = self
                .conn
                .prepare("SELECT id FROM waves WHERE state = 'running'")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        self.conn.execute(
            "UPDATE waves SET state = 'aborted', ended_at = ?1, detail = ?2 WHERE state = 'running'",
            params![now, why],
        )?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackcast_core::workflow::{self, Event, WorkflowConfig};

    #[test]
    fn transitions_and_log_rows_commit_together_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 3);
        // Device secrets live here: owner only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Tokens: found by their hash, names unique, revoked for good.
        s.put_token("ops", "admin", "h1").unwrap();
        assert!(s.put_token("ops", "viewer", "h2").is_err());
        assert_eq!(s.token_role("h1").unwrap().as_deref(), Some("admin"));
        assert_eq!(s.token_role("h2").unwrap(), None);
        assert!(s.revoke_token("ops").unwrap());
        assert_eq!(s.token_role("h1").unwrap(), None);
        assert!(!s.revoke_token("ops").unwrap());
        let cfg = WorkflowConfig::default();
        let mut d = Device::new("d-1", "02:00:00:00:00:01", 1000);
        let acts = workflow::on_event(
            &mut d,
            &cfg,
            1000,
            Event::AgentConnected {
                mode: rackcast_core::model::AgentMode::Loader { os_present: false },
                issued: None,
            },
        );
        let rows: Vec<LogRow> = acts
            .iter()
            .filter_map(|a| match a {
                workflow::Action::Record(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        assert!(rows.len() >= 2);
        s.commit(&d, &rows, None).unwrap();
        drop(s);
        // Reopen: migrations are not re-run, the record and log are there.
        let mut s = SqliteStore::open(&path).unwrap();
        let devs = s.load_devices().unwrap();
        // Connection state is not stored: agents reconnect after a restart.
        let mut want = d.clone();
        want.connected = false;
        assert_eq!(devs, vec![want]);
        let ev = s.events("d-1").unwrap();
        assert_eq!(ev.len(), rows.len());
        assert_eq!(ev[0].row, rows[0]);
        assert_eq!(s.event_count().unwrap(), rows.len() as u64);
        let status: String = s
            .conn
            .query_row(
                "SELECT status FROM steps WHERE device_id = 'd-1' AND step = 'inventoried'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(status, "running");
        let lease = rackcast_core::boot::dhcp::Lease {
            mac: [2, 0, 0, 0, 0, 9],
            ip: "198.18.0.100".parse().unwrap(),
            state: rackcast_core::boot::dhcp::LeaseState::Bound,
            expires: 99,
        };
        s.save_lease(&lease).unwrap();
        assert_eq!(s.leases().unwrap(), vec![lease.clone()]);
        s.forget_lease(&lease.mac).unwrap();
        assert!(s.leases().unwrap().is_empty());
        let w = s.create_wave("img", "239.255.10.1:9000", 5).unwrap();
        assert_eq!(s.abort_running_waves("restart", 6).unwrap(), vec![w]);
        assert_eq!(s.waves().unwrap()[0].state, WaveState::Aborted);
    }

    #[test]
    fn failed_commit_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let d = Device::new("d-1", "m", 1);
        s.commit(&d, &[], None).unwrap();
        // Break the events table so the second statement of the next
        // transaction fails: the device update must roll back with it.
        s.conn.execute_batch("DROP TABLE events").unwrap();
        let mut d2 = d.clone();
        d2.reached = Step::Inventoried;
        let row = LogRow {
            at: 2,
            step: Step::Inventoried,
            kind: "ok".into(),
            from_state: String::new(),
            to_state: String::new(),
            duration_ms: None,
            detail: String::new(),
        };
        assert!(s.commit(&d2, &[row], None).is_err());
        assert_eq!(s.load_devices().unwrap()[0].reached, Step::Discovered);
    }

    #[test]
    fn logs_come_in_pages_and_old_rows_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let row = |at: Millis, detail: &str| LogRow {
            at,
            step: Step::Discovered,
            kind: "info".into(),
            from_state: String::new(),
            to_state: String::new(),
            duration_ms: None,
            detail: detail.into(),
        };
        let a = Device::new("d-a", "ma", 1);
        let b = Device::new("d-b", "mb", 1);
        let rows: Vec<LogRow> = (0..5).map(|i| row(100 + i, &format!("a{i}"))).collect();
        s.commit(&a, &rows, None).unwrap();
        s.commit(&b, &[row(100, "b0")], None).unwrap();
        s.commit(&a, &[row(500, "a5")], None).unwrap();
        // Pages of two, each after the last id of the one before; the
        // other device's row never shows.
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = s.events_page("d-a", after, 2).unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            after = page.last().unwrap().id;
            seen.extend(page.into_iter().map(|e| e.row.detail));
        }
        assert_eq!(seen, ["a0", "a1", "a2", "a3", "a4", "a5"]);
        // Retention: rows before 103 go, in every device's log.
        assert_eq!(s.prune_events(103).unwrap(), 4);
        let left: Vec<String> = s
            .events("d-a")
            .unwrap()
            .into_iter()
            .map(|e| e.row.detail)
            .collect();
        assert_eq!(left, ["a3", "a4", "a5"]);
        assert!(s.events("d-b").unwrap().is_empty());
    }
}
