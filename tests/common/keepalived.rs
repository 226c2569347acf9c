//! keepalived (Debian's) moving an active/standby pair's virtual address
//! in a lab: one VRRP instance per appliance namespace, unicast to its
//! peer (no multicast outside 239.255.0.0/16), tracking its appliance's
//! process so a killed appliance gives up the address.
//!
//! Owns: the keepalived process and its files; stopped by PID on drop.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Keepalived {
    child: Child,
    pub log: PathBuf,
    vrrp_pid: PathBuf,
}

/// Whether Debian's keepalived is installed.
pub fn have_keepalived() -> bool {
    Path::new("/usr/sbin/keepalived").exists()
}

/// One side of the pair.
pub struct Side<'a> {
    pub name: &'a str,
    pub ns: &'a str,
    pub iface: &'a str,
    pub own: &'a str,
    pub peer: &'a str,
    pub priority: u8,
    /// The appliance process whose death gives up the address.
    pub tracks: u32,
}

impl Keepalived {
    pub fn start(dir: &Path, side: Side, vip: &str) -> Keepalived {
        let Side {
            name,
            ns,
            iface,
            own,
            peer,
            priority,
            tracks,
        } = side;
        let conf = dir.join(format!("keepalived-{name}.conf"));
        // nopreempt (both BACKUP): an appliance that comes back does not
        // take the address from the one serving.
        fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id rc_{name}\n  script_user root\n}}\n\
                 vrrp_script appliance {{\n  script \"/bin/kill -0 {tracks}\"\n  interval 1\n  fall 1\n  rise 1\n}}\n\
                 vrrp_instance rackcast {{\n  state BACKUP\n  nopreempt\n  interface {iface}\n\
                 virtual_router_id 51\n  priority {priority}\n  advert_int 1\n\
                 unicast_src_ip {own}\n  unicast_peer {{\n    {peer}\n  }}\n\
                 virtual_ipaddress {{\n    {vip}/24 dev {iface}\n  }}\n\
                 track_script {{\n    appliance\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("keepalived-{name}.log"));
        let vrrp_pid = dir.join(format!("keepalived-{name}-vrrp.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "/usr/sbin/keepalived"])
            .args(["--vrrp", "--dont-fork", "--log-console", "--log-detail"])
            .arg(format!("--use-file={}", conf.display()))
            .arg(format!(
                "--pid={}",
                dir.join(format!("keepalived-{name}.pid")).display()
            ))
            .arg(format!("--vrrp_pid={}", vrrp_pid.display()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("keepalived");
        Keepalived {
            child,
            log,
            vrrp_pid,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        // SIGTERM to the parent stops its VRRP child and removes the
        // address; the child is killed by its PID if it outlives that.
        // SAFETY: kill on a PID this test started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = fs::read_to_string(&self.vrrp_pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
