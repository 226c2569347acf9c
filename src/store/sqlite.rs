//! The SQLite back end: one file in the state dir, WAL, owner-only mode.
//!
//! Owns: the connection and the SQL in SQLite's spelling. Must not: hold
//! schema of its own (the migrations are the module's parent's).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use rackcast_core::model::Inventory;
use rackcast_core::model::Step;
use rackcast_core::workflow::{Device, LogRow, Millis};

use super::{
    corrupt, known_version, migration_sql, now_ms, step_status, Dialect, EventRecord, ImageRecord,
    Store, StoreError, TokenRecord, WaveRecord, WaveState, MIGRATIONS,
};

pub struct SqliteStore {
    conn: Connection,
    /// `(holder, ttl_ms)` once [`Store::set_lease_holder`] was called.
    lease: Option<(String, i64)>,
}

/// Take or renew `device`'s lease for `holder` until `until` unless
/// another holder's lease is live at `now`; the holder it has afterwards.
const ACQUIRE: &str = "INSERT INTO device_leases (device_id, holder, expires_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (device_id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
     WHERE device_leases.holder = excluded.holder OR device_leases.expires_at < ?4
     RETURNING holder";

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
        let mut s = SqliteStore { conn, lease: None };
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
        Ok(SqliteStore { conn, lease: None })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )?;
        let have = self.schema_version()?;
        let known = known_version();
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
            tx.execute_batch(&migration_sql(sql, Dialect::Sqlite))?;
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
        if let Some((holder, ttl)) = &self.lease {
            let now = now_ms();
            // One statement when the lease is this appliance's (the
            // common case); the holder is read only to name it.
            let took: Option<String> = tx
                .prepare_cached(ACQUIRE)?
                .query_row(params![dev.id, holder, now + ttl, now], |r| r.get(0))
                .optional()?;
            if took.is_none() {
                let has: String = tx.query_row(
                    "SELECT holder FROM device_leases WHERE device_id = ?1",
                    [&dev.id],
                    |r| r.get(0),
                )?;
                return Err(StoreError::Leased {
                    device: dev.id.clone(),
                    holder: has,
                });
            }
        }
        tx.prepare_cached(
            "INSERT INTO devices (id, mac, state, step, reached, image, bundle, wave, record,
                                  created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET mac = excluded.mac, state = excluded.state,
                step = excluded.step, reached = excluded.reached, image = excluded.image,
                bundle = excluded.bundle, wave = excluded.wave, record = excluded.record,
                updated_at = excluded.updated_at",
        )?
        .execute(params![
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
        ])?;
        if let Some(inv) = inventory {
            let report = serde_json::to_string(inv).map_err(|e| corrupt(&dev.id, e))?;
            tx.prepare_cached(
                "INSERT INTO inventory (device_id, vendor, model, serial, arch, report, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (device_id) DO UPDATE SET vendor = excluded.vendor,
                    model = excluded.model, serial = excluded.serial, arch = excluded.arch,
                    report = excluded.report, updated_at = excluded.updated_at",
            )?
            .execute(params![
                dev.id,
                inv.dmi.vendor,
                inv.dmi.model,
                inv.dmi.serial,
                inv.cpu.arch,
                report,
                dev.updated
            ])?;
        }
        for r in rows {
            tx.prepare_cached(
                "INSERT INTO events (device_id, at, step, kind, from_state, to_state, duration_ms, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
)?
.execute(
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
                tx.prepare_cached(
                    "INSERT INTO steps (device_id, step, status, started_at, ended_at, duration_ms, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (device_id, step) DO UPDATE SET status = excluded.status,
                        started_at = COALESCE(excluded.started_at, steps.started_at),
                        ended_at = excluded.ended_at, duration_ms = excluded.duration_ms,
                        detail = excluded.detail",
)?
.execute(
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

    fn create_wave(
        &mut self,
        image: &str,
        group: &str,
        appliance: &str,
        now: Millis,
    ) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO waves (image, state, group_addr, created_at, appliance)
             VALUES (?1, 'running', ?2, ?3, ?4)",
            params![image, group, now, appliance],
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

    /// Store a new operator API token's hash under `name`.
    fn put_token(&mut self, name: &str, role: &str, hash: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO api_tokens (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, role, hash, now_ms()],
        )?;
        Ok(())
    }

    /// The role of the token whose BLAKE3 is `hash`, if any.
    fn token_role(&mut self, hash: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT role FROM api_tokens WHERE hash = ?1",
                params![hash],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
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
    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE name = ?1", params![name])?
            > 0)
    }

    fn schema_version(&mut self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    fn abort_waves(
        &mut self,
        me: &str,
        own_too: bool,
        why: &str,
        now: Millis,
    ) -> Result<Vec<i64>, StoreError> {
        let mut st = self.conn.prepare(
            "UPDATE waves SET state = 'aborted', ended_at = ?1, detail = ?2
             WHERE state = 'running' AND ((?4 AND appliance = ?3) OR (appliance <> ?3
                AND NOT EXISTS (SELECT 1 FROM device_leases l
                                WHERE l.holder = waves.appliance AND l.expires_at >= ?1)))
             RETURNING id",
        )?;
        let rows = st.query_map(params![now, why, me, own_too], |r| r.get(0))?;
        let mut ids: Vec<i64> = rows.collect::<Result<_, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn set_lease_holder(&mut self, holder: &str, ttl_ms: i64) {
        self.lease = Some((holder.to_string(), ttl_ms));
    }

    fn renew_leases(&mut self, holder: &str, ttl_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut st = self.conn.prepare(
            "UPDATE device_leases SET expires_at = ?2 WHERE holder = ?1 RETURNING device_id",
        )?;
        let rows = st.query_map(params![holder, now_ms() + ttl_ms], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn release_leases(&mut self, holder: &str) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM device_leases WHERE holder = ?1", [holder])? as u64)
    }

    fn leased_by_others(&mut self, me: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT device_id, holder FROM device_leases
             WHERE holder <> ?1 AND expires_at >= ?2 ORDER BY device_id",
        )?;
        let rows = st.query_map(params![me, now_ms()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn load_device(&mut self, id: &str) -> Result<Option<Device>, StoreError> {
        let rec: Option<String> = self
            .conn
            .query_row("SELECT record FROM devices WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        rec.map(|r| serde_json::from_str(&r).map_err(|e| corrupt(id, e)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conformance_suite_holds_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let open = || Box::new(SqliteStore::open(&path).unwrap()) as Box<dyn Store>;
        let break_events = || {
            let s = SqliteStore::open(&path).unwrap();
            s.conn.execute_batch("DROP TABLE events").unwrap();
        };
        super::super::conformance::suite(&open, &break_events);
        // Device secrets live here: owner only, the WAL beside it too.
        use std::os::unix::fs::PermissionsExt;
        for f in [path.clone(), dir.path().join("s.db-wal")] {
            if f.exists() {
                let mode = std::fs::metadata(&f).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", f.display());
            }
        }
    }

    #[test]
    fn a_read_only_handle_cannot_write_and_never_creates_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        assert!(SqliteStore::open_readonly(&path).is_err());
        assert!(!path.exists());
        SqliteStore::open(&path).unwrap();
        let mut r = SqliteStore::open_readonly(&path).unwrap();
        assert_eq!(r.schema_version().unwrap(), known_version());
        assert!(r.put_token("x", "admin", "h").is_err());
    }

    #[test]
    fn a_store_from_a_newer_rackcast_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let s = SqliteStore::open(&path).unwrap();
        s.conn
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                [known_version() + 1],
            )
            .unwrap();
        drop(s);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { .. })
        ));
    }
}
