//! The PostgreSQL back end: one fleet record shared by several appliances.
//!
//! Owns: the connection (TLS when the URL says `sslmode=require`, the
//! password from a file, timeouts so a dead server is an error rather
//! than a hung controller, a reconnect after the connection breaks), the
//! prepared statements, and the SQL in PostgreSQL's spelling. Must not:
//! hold schema of its own (the migrations are the module's parent's) or
//! be called on a tokio worker: the `postgres` client blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Statement};

use rackcast_core::model::{Inventory, Step};
use rackcast_core::workflow::{Device, LogRow, Millis};

use super::{
    corrupt, known_version, migration_sql, now_ms, step_status, Dialect, EventRecord, ImageRecord,
    PgTarget, Store, StoreError, TokenRecord, WaveRecord, WaveState, MIGRATIONS,
};

/// Migrations take this advisory lock (one transaction each start), so
/// appliances starting together against one server migrate once.
const MIGRATION_LOCK: i64 = 0x7261_636b_6361_7374; // "rackcast"

/// Bounds on a server that stops answering: the controller retries a
/// failed commit every tick, a hung one would stop every device.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
const STATEMENT_TIMEOUT_MS: u32 = 30_000;

pub struct PgStore {
    target: PgTarget,
    readonly: bool,
    /// `(holder, ttl_ms)` once [`Store::set_lease_holder`] was called.
    lease: Option<(String, i64)>,
    client: Conn,
    /// Prepared once per connection, keyed by their text.
    stmts: HashMap<&'static str, Statement>,
}

impl PgStore {
    /// Connect; a writer also migrates the schema, a reader only checks
    /// that it is there and not newer than this build.
    pub fn connect(target: &PgTarget, readonly: bool) -> Result<PgStore, StoreError> {
        let client = Conn(Some(connect_client(target, readonly)?));
        let mut s = PgStore {
            target: target.clone(),
            readonly,
            lease: None,
            client,
            stmts: HashMap::new(),
        };
        if readonly {
            let found = s.schema_version()?;
            if found > known_version() {
                return Err(StoreError::TooNew {
                    found,
                    known: known_version(),
                });
            }
        } else {
            s.migrate()?;
        }
        Ok(s)
    }

    /// A working client: a broken connection (server restarted, network
    /// cut) is replaced here, and the caller's statement then runs on the
    /// new one.
    fn live(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.is_closed() {
            tracing::warn!(store = %self.target.redacted(), "store connection lost; reconnecting");
            self.client = Conn(Some(connect_client(&self.target, self.readonly)?));
            self.stmts.clear();
        }
        Ok(&mut self.client)
    }

    /// The prepared statement for `sql`, preparing it on first use.
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        self.live()?;
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    fn exec(&mut self, sql: &'static str, p: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let st = self.stmt(sql)?;
        Ok(self.client.execute(&st, p)?)
    }

    fn query(
        &mut self,
        sql: &'static str,
        p: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let st = self.stmt(sql)?;
        Ok(self.client.query(&st, p)?)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        // Made once (IF NOT EXISTS would log a notice at every start).
        let made: bool = tx
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
            .try_get(0)?;
        if !made {
            tx.batch_execute(
                "CREATE TABLE schema_migrations (
                    version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )?;
        }
        let have: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )?
            .get(0);
        let known = known_version();
        if have > known {
            return Err(StoreError::TooNew { found: have, known });
        }
        for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
            tx.batch_execute(&migration_sql(sql, Dialect::Postgres))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[v, &now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// The client, closed on a thread of its own when dropped inside a tokio
/// runtime: the `postgres` client's close blocks on a runtime of its own,
/// which tokio forbids on its workers (a panic in a destructor).
struct Conn(Option<Client>);

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Some until drop.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("client taken before drop"))
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("client taken before drop"))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("rc-pg-close".into())
                    .spawn(move || drop(c));
            } else {
                drop(c);
            }
        }
    }
}

fn connect_client(target: &PgTarget, readonly: bool) -> Result<Client, StoreError> {
    let bad = |why: String| StoreError::Config(format!("{}: {why}", target.redacted()));
    let mut cfg: postgres::Config = target
        .url
        .parse()
        .map_err(|e: postgres::Error| bad(format!("not a PostgreSQL URL ({e})")))?;
    if let Some(f) = &target.password_file {
        let pw = crate::secret::read_private(f)
            .map_err(|e| bad(format!("the password file {}: {e}", f.display())))?;
        cfg.password(pw);
    }
    cfg.application_name("rackcast")
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_user_timeout(TCP_USER_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    let require = matches!(cfg.get_ssl_mode(), postgres::config::SslMode::Require);
    let mut client = match &target.ca_file {
        Some(ca) => cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
            ca,
        )
        .map_err(bad)?))?,
        None if require => {
            return Err(bad(
                "sslmode=require needs appliance.store_ca (the CA that signed the server's certificate)"
                    .into(),
            ))
        }
        None => cfg.connect(postgres::NoTls)?,
    };
    client.batch_execute(&format!(
        "SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET lock_timeout = {STATEMENT_TIMEOUT_MS}"
    ))?;
    if readonly {
        client.batch_execute("SET default_transaction_read_only = on")?;
    }
    Ok(client)
}

/// A rustls client config trusting only the CAs in `ca` (PEM).
fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("reading store_ca {}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("store_ca {}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("store_ca {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("store_ca {} holds no certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Column `i` of a row: a type that does not match the schema is an
/// error (a record written by something else), never a panic.
fn col<'a, T: postgres::types::FromSql<'a>>(
    r: &'a postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    Ok(r.try_get(i)?)
}

/// Now on the database's clock, in ms: leases compare times written by
/// different appliances, whose own clocks may disagree.
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// Take or renew `device`'s lease for `holder` for `ttl` ms unless
/// another holder's lease is live; a row when it is held.
const ACQUIRE: &str = concat!(
    "INSERT INTO device_leases (device_id, holder, expires_at) VALUES ($1, $2, ",
    db_now!(),
    " + $3) ON CONFLICT (device_id) DO UPDATE SET holder = excluded.holder, \
     expires_at = excluded.expires_at WHERE device_leases.holder = excluded.holder \
     OR device_leases.expires_at < ",
    db_now!(),
    " RETURNING holder"
);

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

impl Store for PgStore {
    fn load_devices(&mut self) -> Result<Vec<Device>, StoreError> {
        let rows = self.query("SELECT id, record FROM devices ORDER BY id", &[])?;
        rows.iter()
            .map(|r| {
                let id: String = col(r, 0)?;
                let rec: String = col(r, 1)?;
                serde_json::from_str(&rec).map_err(|e| corrupt(&id, e))
            })
            .collect()
    }

    fn commit(
        &mut self,
        dev: &Device,
        rows: &[LogRow],
        inventory: Option<&Inventory>,
    ) -> Result<(), StoreError> {
        const DEVICE: &str =
            "INSERT INTO devices (id, mac, state, step, reached, image, bundle, wave, record,
                                  created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET mac = excluded.mac, state = excluded.state,
                step = excluded.step, reached = excluded.reached, image = excluded.image,
                bundle = excluded.bundle, wave = excluded.wave, record = excluded.record,
                updated_at = excluded.updated_at";
        const INVENTORY: &str =
            "INSERT INTO inventory (device_id, vendor, model, serial, arch, report, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (device_id) DO UPDATE SET vendor = excluded.vendor,
                model = excluded.model, serial = excluded.serial, arch = excluded.arch,
                report = excluded.report, updated_at = excluded.updated_at";
        const EVENT: &str =
            "INSERT INTO events (device_id, at, step, kind, from_state, to_state, duration_ms, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        const STEP: &str =
            "INSERT INTO steps (device_id, step, status, started_at, ended_at, duration_ms, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (device_id, step) DO UPDATE SET status = excluded.status,
                started_at = COALESCE(excluded.started_at, steps.started_at),
                ended_at = excluded.ended_at, duration_ms = excluded.duration_ms,
                detail = excluded.detail";
        let record = serde_json::to_string(dev).map_err(|e| corrupt(&dev.id, e))?;
        let (s_dev, s_inv, s_ev, s_step, s_lease) = (
            self.stmt(DEVICE)?,
            self.stmt(INVENTORY)?,
            self.stmt(EVENT)?,
            self.stmt(STEP)?,
            self.stmt(ACQUIRE)?,
        );
        let mut tx = self.client.transaction()?;
        if let Some((holder, ttl)) = &self.lease {
            // The row lock ON CONFLICT takes orders two appliances
            // reaching for one device: the second sees the first's lease.
            if tx.query(&s_lease, &[&dev.id, holder, ttl])?.is_empty() {
                let has: String = tx
                    .query_one(
                        "SELECT holder FROM device_leases WHERE device_id = $1",
                        &[&dev.id],
                    )?
                    .try_get(0)?;
                return Err(StoreError::Leased {
                    device: dev.id.clone(),
                    holder: has,
                });
            }
        }
        tx.execute(
            &s_dev,
            &[
                &dev.id,
                &dev.mac,
                &dev.state(),
                &dev.current_step().as_str(),
                &dev.reached.as_str(),
                &dev.image,
                &dev.bundle,
                &dev.wave,
                &record,
                &dev.created,
                &dev.updated,
            ],
        )?;
        if let Some(inv) = inventory {
            let report = serde_json::to_string(inv).map_err(|e| corrupt(&dev.id, e))?;
            tx.execute(
                &s_inv,
                &[
                    &dev.id,
                    &inv.dmi.vendor,
                    &inv.dmi.model,
                    &inv.dmi.serial,
                    &inv.cpu.arch,
                    &report,
                    &dev.updated,
                ],
            )?;
        }
        for r in rows {
            let dur = r.duration_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX));
            tx.execute(
                &s_ev,
                &[
                    &dev.id,
                    &r.at,
                    &r.step.as_str(),
                    &r.kind,
                    &r.from_state,
                    &r.to_state,
                    &dur,
                    &r.detail,
                ],
            )?;
            if let Some(status) = step_status(&r.kind) {
                let started = (status == "running").then_some(r.at);
                let ended = (status != "running").then_some(r.at);
                tx.execute(
                    &s_step,
                    &[
                        &dev.id,
                        &r.step.as_str(),
                        &status,
                        &started,
                        &ended,
                        &dur,
                        &r.detail,
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn inventory(&mut self, device: &str) -> Result<Option<Inventory>, StoreError> {
        let rows = self.query(
            "SELECT report FROM inventory WHERE device_id = $1",
            &[&device],
        )?;
        rows.first()
            .map(|r| {
                let rep: String = col(r, 0)?;
                serde_json::from_str(&rep).map_err(|e| corrupt(device, e))
            })
            .transpose()
    }

    fn events_page(
        &mut self,
        device: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(
            "SELECT id, device_id, at, step, kind, from_state, to_state, duration_ms, detail
             FROM events WHERE device_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&device, &after, &limit],
        )?;
        rows.iter()
            .map(|r| {
                let device: String = col(r, 1)?;
                let step: String = col(r, 3)?;
                let step = Step::parse(&step).ok_or_else(|| corrupt(&device, "unknown step"))?;
                let dur: Option<i64> = col(r, 7)?;
                Ok(EventRecord {
                    id: col(r, 0)?,
                    device,
                    row: LogRow {
                        at: col(r, 2)?,
                        step,
                        kind: col(r, 4)?,
                        from_state: col(r, 5)?,
                        to_state: col(r, 6)?,
                        duration_ms: dur.map(|d| d.max(0) as u64),
                        detail: col(r, 8)?,
                    },
                })
            })
            .collect()
    }

    fn prune_events(&mut self, before: Millis) -> Result<u64, StoreError> {
        self.exec("DELETE FROM events WHERE at < $1", &[&before])
    }

    fn event_count(&mut self) -> Result<u64, StoreError> {
        let rows = self.query("SELECT COUNT(*) FROM events", &[])?;
        let n: i64 = rows.first().map_or(Ok(0), |r| col(r, 0))?;
        Ok(n.max(0) as u64)
    }

    fn put_image(&mut self, img: &ImageRecord) -> Result<(), StoreError> {
        let size = i64::try_from(img.size).map_err(|e| corrupt(&img.name, e))?;
        self.exec(
            "INSERT INTO images (name, path, size, hash, block_size, added_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET path = excluded.path, size = excluded.size,
                hash = excluded.hash, block_size = excluded.block_size",
            &[
                &img.name,
                &img.path,
                &size,
                &img.hash,
                &i64::from(img.block_size),
                &img.added_at,
            ],
        )?;
        Ok(())
    }

    fn images(&mut self) -> Result<Vec<ImageRecord>, StoreError> {
        let rows = self.query(
            "SELECT name, path, size, hash, block_size, added_at FROM images ORDER BY name",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ImageRecord {
                    name: col(r, 0)?,
                    path: col(r, 1)?,
                    size: col::<i64>(r, 2)?.max(0) as u64,
                    hash: col(r, 3)?,
                    block_size: count(col(r, 4)?),
                    added_at: col(r, 5)?,
                })
            })
            .collect()
    }

    fn create_wave(
        &mut self,
        image: &str,
        group: &str,
        appliance: &str,
        now: Millis,
    ) -> Result<i64, StoreError> {
        let rows = self.query(
            "INSERT INTO waves (image, state, group_addr, created_at, appliance)
             VALUES ($1, 'running', $2, $3, $4) RETURNING id",
            &[&image, &group, &now, &appliance],
        )?;
        rows.first()
            .map(|r| col(r, 0))
            .ok_or_else(|| corrupt("waves", "INSERT returned no id"))?
    }

    fn update_wave(&mut self, w: &WaveRecord) -> Result<(), StoreError> {
        self.exec(
            "UPDATE waves SET state = $2, ended_at = $3, members = $4, verified = $5, failed = $6,
                detail = $7, group_addr = $8 WHERE id = $1",
            &[
                &w.id,
                &w.state.as_str(),
                &w.ended_at,
                &i64::from(w.members),
                &i64::from(w.verified),
                &i64::from(w.failed),
                &w.detail,
                &w.group,
            ],
        )?;
        Ok(())
    }

    fn waves(&mut self) -> Result<Vec<WaveRecord>, StoreError> {
        let rows = self.query(
            "SELECT id, image, state, group_addr, created_at, ended_at, members, verified, failed,
                    detail FROM waves ORDER BY id",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let id: i64 = col(r, 0)?;
                let state: String = col(r, 2)?;
                Ok(WaveRecord {
                    id,
                    image: col(r, 1)?,
                    state: WaveState::parse(&state).ok_or_else(|| {
                        corrupt(&format!("wave {id}"), format!("unknown state {state:?}"))
                    })?,
                    group: col(r, 3)?,
                    created_at: col(r, 4)?,
                    ended_at: col(r, 5)?,
                    members: count(col(r, 6)?),
                    verified: count(col(r, 7)?),
                    failed: count(col(r, 8)?),
                    detail: col(r, 9)?,
                })
            })
            .collect()
    }

    fn abort_waves(
        &mut self,
        me: &str,
        own_too: bool,
        why: &str,
        now: Millis,
    ) -> Result<Vec<i64>, StoreError> {
        let rows = self.query(
            concat!(
                "UPDATE waves SET state = 'aborted', ended_at = $1, detail = $2 \
                 WHERE state = 'running' AND (($4 AND appliance = $3) OR (appliance <> $3 \
                 AND NOT EXISTS (SELECT 1 FROM device_leases l \
                 WHERE l.holder = waves.appliance AND l.expires_at >= ",
                db_now!(),
                "))) RETURNING id"
            ),
            &[&now, &why, &me, &own_too],
        )?;
        let mut ids = rows
            .iter()
            .map(|r| col(r, 0))
            .collect::<Result<Vec<i64>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn set_lease_holder(&mut self, holder: &str, ttl_ms: i64) {
        self.lease = Some((holder.to_string(), ttl_ms));
    }

    fn renew_leases(&mut self, holder: &str, ttl_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = self.query(
            concat!(
                "UPDATE device_leases SET expires_at = ",
                db_now!(),
                " + $2 WHERE holder = $1 RETURNING device_id"
            ),
            &[&holder, &ttl_ms],
        )?;
        rows.iter().map(|r| col(r, 0)).collect()
    }

    fn release_leases(&mut self, holder: &str) -> Result<u64, StoreError> {
        self.exec("DELETE FROM device_leases WHERE holder = $1", &[&holder])
    }

    fn leased_by_others(&mut self, me: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self.query(
            concat!(
                "SELECT device_id, holder FROM device_leases WHERE holder <> $1 AND expires_at >= ",
                db_now!(),
                " ORDER BY device_id"
            ),
            &[&me],
        )?;
        rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
    }

    fn load_device(&mut self, id: &str) -> Result<Option<Device>, StoreError> {
        let rows = self.query("SELECT record FROM devices WHERE id = $1", &[&id])?;
        rows.first()
            .map(|r| {
                let rec: String = col(r, 0)?;
                serde_json::from_str(&rec).map_err(|e| corrupt(id, e))
            })
            .transpose()
    }

    fn leases(&mut self) -> Result<Vec<rackcast_core::boot::dhcp::Lease>, StoreError> {
        let rows = self.query("SELECT mac, ip, expires_at FROM leases ORDER BY mac", &[])?;
        rows.iter()
            .map(|r| {
                let mac: String = col(r, 0)?;
                let ip: String = col(r, 1)?;
                Ok(rackcast_core::boot::dhcp::Lease {
                    mac: rackcast_core::boot::dhcp::parse_mac(&mac)
                        .ok_or_else(|| corrupt(&mac, "bad MAC"))?,
                    ip: ip.parse().map_err(|e| corrupt("lease", e))?,
                    state: rackcast_core::boot::dhcp::LeaseState::Bound,
                    expires: col(r, 2)?,
                })
            })
            .collect()
    }

    fn save_lease(&mut self, l: &rackcast_core::boot::dhcp::Lease) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO leases (mac, ip, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (mac) DO UPDATE SET ip = excluded.ip, expires_at = excluded.expires_at",
            &[
                &rackcast_core::boot::dhcp::mac_string(&l.mac),
                &l.ip.to_string(),
                &l.expires,
            ],
        )?;
        Ok(())
    }

    fn forget_lease(&mut self, mac: &[u8; 6]) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM leases WHERE mac = $1",
            &[&rackcast_core::boot::dhcp::mac_string(mac)],
        )?;
        Ok(())
    }

    fn put_token(&mut self, name: &str, role: &str, hash: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO api_tokens (name, role, hash, created_at) VALUES ($1, $2, $3, $4)",
            &[&name, &role, &hash, &now_ms()],
        )?;
        Ok(())
    }

    fn token_role(&mut self, hash: &str) -> Result<Option<String>, StoreError> {
        let rows = self.query("SELECT role FROM api_tokens WHERE hash = $1", &[&hash])?;
        rows.first().map(|r| col(r, 0)).transpose()
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.query(
            "SELECT name, role, created_at FROM api_tokens ORDER BY name",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                Ok(TokenRecord {
                    name: col(r, 0)?,
                    role: col(r, 1)?,
                    created_at: col(r, 2)?,
                })
            })
            .collect()
    }

    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM api_tokens WHERE name = $1", &[&name])? > 0)
    }

    fn schema_version(&mut self) -> Result<i64, StoreError> {
        let rows = self.query(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )?;
        rows.first().map_or(Ok(0), |r| col(r, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testpg::Pg;
    use super::super::testskip::skip;
    use super::*;

    fn server() -> Option<Pg> {
        if let Some(why) = Pg::unavailable() {
            skip(&why);
            return None;
        }
        Some(Pg::start(None, "127.0.0.1"))
    }

    fn target(pg: &Pg) -> PgTarget {
        PgTarget {
            url: pg.url(),
            password_file: Some(pg.password_file.clone()),
            ca_file: None,
        }
    }

    #[test]
    fn the_conformance_suite_holds_on_a_real_server() {
        let Some(pg) = server() else { return };
        let t = target(&pg);
        let open = || Box::new(PgStore::connect(&t, false).unwrap()) as Box<dyn Store>;
        let break_events = || {
            pg.sql("DROP TABLE events").unwrap();
        };
        super::super::conformance::suite(&open, &break_events);
    }

    #[test]
    fn readers_cannot_write_and_bad_credentials_fail_closed() {
        let Some(pg) = server() else { return };
        let t = target(&pg);
        // A reader never creates the schema.
        let e = PgStore::connect(&t, true).err().expect("no schema yet");
        assert!(e.to_string().contains("schema_migrations"), "{e}");
        drop(PgStore::connect(&t, false).unwrap());
        let mut r = PgStore::connect(&t, true).unwrap();
        assert_eq!(r.schema_version().unwrap(), known_version());
        let e = r.put_token("x", "admin", "h").unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        // The reader still works after the refused write.
        assert!(r.tokens().unwrap().is_empty());
        // A wrong password is refused and the error does not carry it.
        let wrong = pg.password_file.with_file_name("wrong.pw");
        std::fs::write(&wrong, "not-the-password\n").unwrap();
        std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut bad = t.clone();
        bad.password_file = Some(wrong);
        let e = PgStore::connect(&bad, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("password authentication failed"), "{e}");
        assert!(!e.contains("not-the-password"), "{e}");
        // A password file others can read is refused before connecting.
        let open = pg.password_file.with_file_name("open.pw");
        std::fs::copy(&pg.password_file, &open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let mut readable = t.clone();
        readable.password_file = Some(open);
        let e = PgStore::connect(&readable, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("lets others read it"), "{e}");
        // No password at all: refused too (scram on TCP).
        let mut none = t.clone();
        none.password_file = None;
        assert!(PgStore::connect(&none, false).is_err());
        // TLS demanded of a server without it: refused, not downgraded.
        let ca = pg.password_file.with_file_name("ca.pem");
        let made = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let mut tls = t.clone();
        tls.url.push_str("?sslmode=require");
        tls.ca_file = Some(ca);
        let e = PgStore::connect(&tls, false)
            .err()
            .expect("no TLS")
            .to_string();
        assert!(
            e.contains("TLS") || e.contains("SSL") || e.contains("ssl"),
            "{e}"
        );
    }

    /// A CA, and a server certificate for `name` that it signed.
    fn ca_and_server(name: &str) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let srv = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        (ca_cert.pem(), srv.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_to_the_database_checks_the_server_against_the_configured_ca() {
        let Some(pg) = server() else { return };
        let (ca, cert, key) = ca_and_server("127.0.0.1");
        pg.enable_tls(&cert, &key);
        let dir = pg.password_file.parent().unwrap().to_path_buf();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca).unwrap();
        let mut t = target(&pg);
        t.url.push_str("?sslmode=require");
        t.ca_file = Some(good);
        let mut s = PgStore::connect(&t, false).unwrap();
        s.put_token("tls", "viewer", "h").unwrap();
        assert_eq!(s.token_role("h").unwrap().as_deref(), Some("viewer"));
        // The session really is TLS.
        let ssl: bool = s
            .client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ssl);
        // A server whose certificate another CA signed is refused.
        let (other_ca, _, _) = ca_and_server("127.0.0.1");
        let wrong = dir.join("other-ca.pem");
        std::fs::write(&wrong, other_ca).unwrap();
        let mut bad = t.clone();
        bad.ca_file = Some(wrong);
        let e = PgStore::connect(&bad, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("certificate"), "{e}");
        // Without TLS the server refuses the role (hostssl only): the
        // appliance's plain connection gets a clear error.
        let mut plain = t.clone();
        plain.url = pg.url();
        plain.ca_file = None;
        let e = PgStore::connect(&plain, false)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("no encryption") || e.contains("pg_hba"), "{e}");
    }

    #[test]
    fn a_newer_schema_is_refused_and_appliances_migrate_once_together() {
        let Some(pg) = server() else { return };
        let t = target(&pg);
        // Four appliances starting at once against an empty database.
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || PgStore::connect(&t, false).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let applied = pg.sql("SELECT COUNT(*) FROM schema_migrations").unwrap();
        assert_eq!(applied, known_version().to_string());
        pg.sql(&format!(
            "INSERT INTO schema_migrations VALUES ({}, 0)",
            known_version() + 1
        ))
        .unwrap();
        for ro in [false, true] {
            assert!(matches!(
                PgStore::connect(&t, ro),
                Err(StoreError::TooNew { .. })
            ));
        }
    }

    #[test]
    fn a_restarted_server_costs_one_failed_call_then_the_store_reconnects() {
        let Some(pg) = server() else { return };
        let t = target(&pg);
        let mut s = PgStore::connect(&t, false).unwrap();
        s.put_token("a", "admin", "h1").unwrap();
        // Every connection of the server is cut, as a restart or a
        // failover would.
        pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'rackcast'",
        )
        .unwrap();
        // The first call on the dead connection fails (the controller
        // keeps the event and retries); the next one reconnects.
        let first = s.token_role("h1");
        let second = s.token_role("h1");
        assert!(
            first.is_err() || matches!(first.as_ref(), Ok(Some(r)) if r == "admin"),
            "{first:?}"
        );
        assert_eq!(second.unwrap().as_deref(), Some("admin"));
    }
}
