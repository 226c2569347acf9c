//! A private PostgreSQL server for tests: Debian's `postgresql` binaries,
//! a data dir of its own under /tmp, run as the `postgres` user, in a
//! network namespace when asked, stopped and removed on drop.
//!
//! Owns: the server's process (by its data dir, never by name), its role
//! `rackcast` with a password kept in a file, and its database. Must not:
//! touch the system's own cluster. Self-contained (std and libc only) so
//! the store's unit tests include it too.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Pg {
    dir: PathBuf,
    bin: PathBuf,
    netns: Option<String>,
    /// The address it listens on (TCP) and its port.
    pub host: String,
    pub port: u16,
    /// The `rackcast` role's password, 0600.
    pub password_file: PathBuf,
    /// The server's options (`pg_ctl -o`), for a restart.
    opts: String,
}

/// The newest installed server's binaries.
fn bin_dir() -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    v.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    v.pop()
}

fn ok(out: std::io::Result<Output>, what: &str) -> Result<Output, String> {
    let out = out.map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

impl Pg {
    /// Why a server cannot run here (not root, PostgreSQL not installed),
    /// or `None` when it can: the caller skips on `Some`.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("a private PostgreSQL server needs root (to run it as postgres)".into());
        }
        if bin_dir().is_none() {
            return Some("PostgreSQL is not installed (Debian's postgresql)".into());
        }
        if ok(Command::new("id").args(["-u", "postgres"]).output(), "id").is_err() {
            return Some("no postgres user".into());
        }
        None
    }

    /// Start a server listening on `host` (an address in `netns`, or
    /// 127.0.0.1 outside one). Where [`Pg::unavailable`] is `None`, a
    /// failure here is the test's failure.
    pub fn start(netns: Option<&str>, host: &str) -> Pg {
        match Pg::try_start(netns, host) {
            Ok(pg) => pg,
            Err(e) => panic!("starting PostgreSQL: {e}"),
        }
    }

    fn try_start(netns: Option<&str>, host: &str) -> Result<Pg, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed")?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/rc-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        ok(
            Command::new("chown").arg("postgres:").arg(&dir).output(),
            "chown",
        )?;
        // A port the kernel says is free here (a namespace of the test's
        // own has every port free).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("choosing a port: {e}"))?
            .port();
        let password = format!(
            "{:016x}{:016x}",
            rand_u64(),
            rand_u64() ^ u64::from(std::process::id())
        );
        let password_file = dir.join("rackcast.pw");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&password_file)
                .map_err(|e| e.to_string())?;
            writeln!(f, "{password}").map_err(|e| e.to_string())?;
        }
        let opts = format!(
            "-c listen_addresses={host} -c port={port} -c unix_socket_directories={} \
             -c max_connections=60 -c shared_buffers=16MB -c log_min_messages=warning",
            dir.display()
        );
        let pg = Pg {
            dir: dir.clone(),
            bin,
            netns: netns.map(str::to_string),
            host: host.to_string(),
            port,
            password_file,
            opts,
        };
        let data = pg.data();
        ok(
            pg.as_postgres(&pg.bin.join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ])
                .output(),
            "initdb",
        )?;
        // Appliances on the lab network may connect, with the password.
        {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .map_err(|e| format!("pg_hba.conf: {e}"))?;
            writeln!(hba, "host rackcast rackcast 198.18.0.0/15 scram-sha-256")
                .map_err(|e| format!("pg_hba.conf: {e}"))?;
        }
        pg.run()?;
        pg.psql(&format!("CREATE ROLE rackcast LOGIN PASSWORD '{password}'"))?;
        pg.psql("CREATE DATABASE rackcast OWNER rackcast")?;
        Ok(pg)
    }

    /// Start the server on its data dir (after initdb, or a stop).
    fn run(&self) -> Result<(), String> {
        ok(
            self.as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-o", &self.opts, "-l"])
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "30", "start"])
                .output(),
            "pg_ctl start",
        )
        .map(|_| ())
        .map_err(|e| format!("{e}\n{}", self.log()))
    }

    /// Serve TLS with this certificate chain and key (PEM), and accept
    /// the `rackcast` role from the lab network only over TLS from now on.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let data = self.data();
        for (f, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            std::fs::write(data.join(f), pem).unwrap();
            ok(
                Command::new("chown")
                    .arg("postgres:")
                    .arg(data.join(f))
                    .output(),
                "chown",
            )
            .unwrap();
            std::fs::set_permissions(
                data.join(f),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        // TLS or nothing for the role, also on loopback.
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        let hba: String = hba
            .lines()
            .filter(|l| !l.starts_with("host "))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + "hostssl all all 0.0.0.0/0 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        self.psql("ALTER SYSTEM SET ssl = on").unwrap();
        self.psql("SELECT pg_reload_conf()").unwrap();
        // The reload is asynchronous: wait until the server says TLS is on.
        for _ in 0..50 {
            if self.psql("SHOW ssl").as_deref() == Ok("on") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("PostgreSQL did not turn TLS on:\n{}", self.log());
    }

    /// Start it again after [`Pg::stop`] (crash recovery from its WAL).
    pub fn start_again(&self) {
        if let Err(e) = self.run() {
            panic!("restarting PostgreSQL: {e}");
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `program` as the postgres user, in the namespace if there is one.
    fn as_postgres(&self, program: &Path) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"]);
                c
            }
            None => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]);
                c
            }
        };
        c.arg(program);
        c
    }

    /// Run SQL as the superuser over the server's socket; its output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_in("postgres", sql)
    }

    /// SQL in the `rackcast` database, as the superuser.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.psql_in("rackcast", sql)
    }

    fn psql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = ok(
            self.as_postgres(&self.bin.join("psql"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
                .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
                .output(),
            "psql",
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The URL the appliance is configured with (no password: that is in
    /// [`Pg::password_file`]).
    pub fn url(&self) -> String {
        format!("postgres://rackcast@{}:{}/rackcast", self.host, self.port)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Stop it at once (`-m immediate`: as a crash would); idempotent.
    pub fn stop(&self) {
        let _ = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Randomness for a test password, from the kernel.
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b)
}
