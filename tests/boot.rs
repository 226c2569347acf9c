//! The network boot service against real clients in network namespaces:
//! busybox `udhcpc` and ISC `dhclient` get leases from `rackcast serve`'s
//! DHCP server; a PXE-flagged request is the power-on trigger that creates
//! the device record; an exhausted pool gets no offer and says so; leases
//! survive an appliance restart. proxyDHCP beside dnsmasq, TFTP with
//! tftp-hpa and atftp, the iPXE script with curl, and QEMU machines that
//! PXE-boot (SeaBIOS + iPXE ROM; OVMF's PXE -> ipxe.efi over TFTP) into the
//! loader initrd, get installed over multicast and then boot their disk.
//! Needs root.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::appliance::*;
use common::*;

#[test]
fn real_dhcp_clients_get_leases_and_a_pxe_request_powers_the_device_on() {
    if !can_run() {
        return;
    }
    let mut a = Appliance::new("bd", 3, (100, 101));
    // busybox udhcpc, announcing itself as a PXE client (legacy BIOS).
    let o = a.udhcpc(1, &["-V", "PXEClient:Arch:00000:UNDI:002001"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("lease of 198.18.0.100 obtained from 198.18.0.1"),
        "{t}"
    );
    // A second request keeps the lease.
    let o = a.udhcpc(1, &[]);
    assert!(
        text(&o).contains("lease of 198.18.0.100 obtained"),
        "{}",
        text(&o)
    );
    // ISC dhclient in another device gets the other address.
    let leases = a.lab.file("d2.leases");
    let child = Command::new("ip")
        .args(["netns", "exec", &a.lab.ns("d2")])
        .args(["dhclient", "-d", "-1", "-v", "-sf", "/bin/true", "-lf"])
        .arg(&leases)
        .arg("-pf")
        .arg(a.lab.file("d2.pid"))
        .arg("d0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // dhclient stays in the foreground once bound: wait for the lease
    // file, then stop it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&leases)
        .unwrap_or_default()
        .contains("fixed-address 198.18.0.101")
    {
        assert!(Instant::now() < deadline, "dhclient got no lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    // The pool (2 addresses) is exhausted: no offer, and the log says so.
    let o = a.udhcpc(3, &["-t", "2"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no lease"), "{}", text(&o));
    assert!(a.log().contains("DHCP pool exhausted: no offer"));
    // The PXE request created the device record (power-on trigger); the
    // plain DHCP clients did not.
    let devs = a.devices();
    let devs = devs.as_array().unwrap();
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!(devs[0]["state"], "idle");
    assert_eq!(devs[0]["step"], "discovered");
    // Leases survive a restart of the appliance.
    a.stop();
    a.start();
    let o = a.udhcpc(1, &[]);
    assert!(
        text(&o).contains("lease of 198.18.0.100 obtained"),
        "{}",
        text(&o)
    );
    let o = a.udhcpc(3, &["-t", "2"]);
    assert!(!o.status.success(), "pool still full after the restart");
}

#[test]
fn malformed_dhcp_datagrams_are_dropped_and_counted() {
    if !can_run() {
        return;
    }
    let a = Appliance::new("bm", 1, (100, 110));
    // Garbage, a truncated header, and a crafted option that panics
    // dhcproto's own decoder (classless route with prefix 99), broadcast
    // from the device namespace to port 67.
    let script = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"d0")
hdr = bytearray(240)
hdr[0] = 1; hdr[1] = 1; hdr[2] = 6
hdr[28:34] = bytes([2, 0xcc, 0, 0, 0, 1])
hdr[236:240] = bytes([99, 130, 83, 99])
crafted = bytes(hdr) + bytes([53, 1, 1, 121, 5, 99, 10, 0, 0, 1, 255])
for d in [b"\xff" * 300, bytes(hdr[:100]), crafted, bytes(hdr) + bytes([53, 1, 1, 54, 3, 1, 2, 3, 255])]:
    s.sendto(d, ("255.255.255.255", 67))
"#;
    let st = Command::new("ip")
        .args(["netns", "exec", &a.lab.ns("d1"), "python3", "-c", script])
        .status()
        .unwrap();
    assert!(st.success());
    // The crafted-but-checkable one (route option dropped) is answered;
    // the service is still up and serving a real client afterwards.
    let o = a.udhcpc(1, &[]);
    assert!(text(&o).contains("lease of 198.18.0.1"), "{}", text(&o));
    let token = operator_token(&a.config, "viewer");
    let (code, m) = operator_curl(&a.lab.ns("app"), &a.config, Some(&token), "/metrics", &[]);
    assert_eq!(code, 200, "{m}");
    let dropped: f64 = m
        .lines()
        .find(|l| l.starts_with("rackcast_dhcp_dropped_total{reason=\"malformed\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 3.0, "malformed drops counted: {dropped}\n{m}");
}

/// The site's DHCP server: Debian's dnsmasq, DHCP only (no DNS, no boot
/// options), in lab namespace `ns` (its address is 198.18.0.(10+i)),
/// handing out 198.18.0.150-160; given half a second to bind.
fn site_dhcp(lab: &Lab, ns: &str) -> Proc {
    let p = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(ns),
                "dnsmasq",
                "--no-daemon",
                "--port=0",
            ])
            .args([
                "--interface=d0",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--no-ping",
            ])
            .args(["--dhcp-range=198.18.0.150,198.18.0.160,255.255.255.0,10m"])
            .arg(format!(
                "--dhcp-leasefile={}",
                lab.file(&format!("dnsmasq-{ns}.leases")).display()
            ))
            .arg("--log-dhcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    p
}

#[test]
fn proxy_dhcp_beside_dnsmasq_boots_pxe_clients_only() {
    if !can_run() {
        return;
    }
    let a = Appliance::with_boot(
        "bp",
        3,
        "[boot.dhcp]\nmode = \"proxy\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n",
        "DHCP service listening",
    );
    let (lab, config) = (&a.lab, &a.config);
    // The site's DHCP server: dnsmasq, DHCP only, in device namespace 3.
    let _dnsmasq = site_dhcp(lab, "d3");
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("d1"), "python3"])
        .arg(root().join("tests/fixtures/pxe_client.py"))
        .args(["d0", "02:cc:00:00:00:01", "198.18.0.1", "198.18.0.11"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let offers = v["offers"].as_array().unwrap();
    let from = |server: &str| offers.iter().find(|o| o["server"] == server).cloned();
    let site = from("198.18.0.13").unwrap_or_else(|| panic!("no offer from dnsmasq: {v}"));
    let ours = from("198.18.0.1").unwrap_or_else(|| panic!("no proxyDHCP offer: {v}"));
    // The address comes from the site's server, the boot file from us.
    let ip = site["yiaddr"].as_str().unwrap();
    assert!(
        ip.starts_with("198.18.0.15") || ip == "198.18.0.160",
        "{site}"
    );
    assert_eq!(ours["yiaddr"], "0.0.0.0", "{ours}");
    assert_eq!(ours["file"], "undionly.kpxe");
    assert_eq!(ours["siaddr"], "198.18.0.1");
    assert_eq!(ours["class"], "PXEClient");
    let ack = &v["ack"];
    assert_eq!(ack["type"], 5, "ACK on 4011: {v}");
    assert_eq!(ack["file"], "undionly.kpxe");
    // A plain client gets its address from dnsmasq; rackcast stays silent
    // and records no device for it.
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.ns("d2")])
        .args([
            "busybox",
            "udhcpc",
            "-i",
            "d0",
            "-n",
            "-q",
            "-f",
            "-t",
            "3",
            "-T",
            "1",
            "-s",
            "/bin/true",
        ])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(t.contains("obtained from 198.18.0.13"), "{t}");
    let devs = Command::new("ip")
        .args(["netns", "exec", &lab.ns("app")])
        .arg(bin("rackcast"))
        .args(["devices", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let devs: serde_json::Value = serde_json::from_slice(&devs.stdout).unwrap();
    let macs: Vec<&str> = devs
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mac"].as_str().unwrap())
        .collect();
    assert_eq!(
        macs,
        ["02:cc:00:00:00:01"],
        "only the PXE client is a device"
    );
}

#[test]
fn tftp_serves_real_clients_read_only_and_refuses_traversal() {
    if !can_run() {
        return;
    }
    // The root is filled before the appliance starts (its config names
    // it), so it lives beside the lab folder, named by our PID.
    let root = std::env::temp_dir().join(format!("rcbt{}-tftproot", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("efi")).unwrap();
    let outside = root.with_extension("outside");
    fs::create_dir_all(&outside).unwrap();
    let big: Vec<u8> = (0..300_001u32).map(|i| (i * 7 + 3) as u8).collect();
    fs::write(root.join("undionly.kpxe"), &big).unwrap();
    fs::write(root.join("efi/ipxe.efi"), vec![0x5a; 4096]).unwrap();
    fs::write(outside.join("secret"), b"do not serve").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).unwrap();
    let a = Appliance::with_boot(
        "bt",
        1,
        &format!(
            "[boot.tftp]\nroot = \"{}\"\niface = \"srv0\"\n",
            root.display()
        ),
        "TFTP service listening",
    );
    let (lab, dir) = (&a.lab, a.lab.dir.clone());
    let in_dev = |args: &[&str]| -> Output {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("d1")])
            .args(args)
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, Duration::from_secs(30))
    };
    // tftp-hpa (its client speaks plain RFC 1350: 512-byte blocks).
    let hpa_get = |remote: &str, local: &str| -> Vec<u8> {
        let out = dir.join(local);
        let o = in_dev(&[
            "tftp",
            "-m",
            "binary",
            "198.18.0.1",
            "-c",
            "get",
            remote,
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        fs::read(&out).unwrap()
    };
    assert_eq!(hpa_get("undionly.kpxe", "hpa.bin"), big);
    // 4096 bytes: a multiple of 512, so the transfer ends with an empty
    // block.
    assert_eq!(hpa_get("efi/ipxe.efi", "hpa-efi.bin"), vec![0x5a; 4096]);
    // atftp with blksize, tsize and windowsize.
    let out3 = dir.join("atftp.bin");
    let o = in_dev(&[
        "atftp",
        "--get",
        "-r",
        "undionly.kpxe",
        "-l",
        out3.to_str().unwrap(),
        "--option",
        "blksize 1468",
        "--option",
        "tsize",
        "--option",
        "windowsize 8",
        "198.18.0.1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(fs::read(&out3).unwrap(), big);
    // Traversal, a symlink out of the root, a missing file, a write.
    for name in ["../secret", "/../secret", "link", "efi/../../secret"] {
        let out = dir.join("stolen");
        let _ = fs::remove_file(&out);
        let o = in_dev(&[
            "atftp",
            "--get",
            "-r",
            name,
            "-l",
            out.to_str().unwrap(),
            "198.18.0.1",
        ]);
        assert!(!o.status.success(), "{name} served: {}", text(&o));
        assert!(
            fs::read(&out).map(|d| d.is_empty()).unwrap_or(true),
            "{name} leaked"
        );
    }
    let o = in_dev(&[
        "atftp",
        "--get",
        "-r",
        "nope.efi",
        "-l",
        "/dev/null",
        "198.18.0.1",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).to_lowercase().contains("not found"),
        "{}",
        text(&o)
    );
    let up = dir.join("upload");
    fs::write(&up, b"x").unwrap();
    let o = in_dev(&[
        "atftp",
        "--put",
        "-l",
        up.to_str().unwrap(),
        "-r",
        "new.efi",
        "198.18.0.1",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("read-only"), "{}", text(&o));
    assert!(!root.join("new.efi").exists());
    let _ = fs::remove_dir_all(&root);
    let _ = fs::remove_dir_all(&outside);
}

#[test]
fn ipxe_script_follows_the_device_state_and_files_serve_ranges() {
    if !can_run() {
        return;
    }
    let files = std::env::temp_dir().join(format!("rcbh{}-files", std::process::id()));
    let _ = fs::remove_dir_all(&files);
    fs::create_dir_all(&files).unwrap();
    let kernel: Vec<u8> = (0..100_000u32).map(|i| (i * 13 + 1) as u8).collect();
    fs::write(files.join("vmlinuz"), &kernel).unwrap();
    fs::write(files.join("initrd.img"), vec![1u8; 5000]).unwrap();
    let a = Appliance::with_boot(
        "bh",
        1,
        &format!(
            "[boot.http]\nfiles = \"{}\"\ncmdline = \"console=ttyS0\"\n",
            files.display()
        ),
        "provisioning HTTP (iPXE scripts, loader files) listening",
    );
    let curl = |args: &[&str]| -> Output {
        Command::new("ip")
            .args(["netns", "exec", &a.lab.ns("d1"), "curl", "-s", "-m", "5"])
            .args(args)
            .output()
            .unwrap()
    };
    let mac = "02:dd:00:00:00:01";
    let url = format!("http://198.18.0.1:7180/boot/{mac}.ipxe");
    let script = String::from_utf8_lossy(&curl(&[&url]).stdout).into_owned();
    assert!(script.starts_with("#!ipxe"), "{script}");
    assert!(
        script.contains(&format!("kernel http://198.18.0.1:7180/boot/by-mac/{mac}/vmlinuz initrd=initrd.img rackcast.server=198.18.0.1:7100 rackcast.key={} ", a.key())),
        "{script}"
    );
    assert!(
        script.contains("console=ttyS0")
            && script.contains(&format!(
                "initrd http://198.18.0.1:7180/boot/by-mac/{mac}/initrd.img"
            ))
    );
    // Byte ranges on the loader's files (real curl), per device and plain.
    for url in [
        format!("http://198.18.0.1:7180/boot/by-mac/{mac}/vmlinuz"),
        "http://198.18.0.1:7180/boot/files/vmlinuz".to_string(),
    ] {
        let o = curl(&["-r", "100-199", "-w", "%{http_code}", "-o", "-", &url]);
        let body = o.stdout;
        assert_eq!(&body[body.len() - 3..], b"206", "{url}");
        assert_eq!(&body[..body.len() - 3], &kernel[100..200], "{url}");
    }
    // The per-device fetch is in the device's log (the script fetch made
    // the record).
    let logged = || String::from_utf8_lossy(&a.cli(&["log", mac, "--json"]).stdout).into_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logged().contains("HTTP GET vmlinuz (bytes=100-199): 206, 100 bytes") {
        assert!(Instant::now() < deadline, "{}", logged());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bad names: not a MAC, traversal out of the files folder.
    let code = |u: &str| {
        String::from_utf8_lossy(
            &curl(&["-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", u]).stdout,
        )
        .into_owned()
    };
    assert_eq!(code("http://198.18.0.1:7180/boot/zz.ipxe"), "400");
    assert_ne!(
        code("http://198.18.0.1:7180/boot/files/../../etc/passwd"),
        "200"
    );
    assert_ne!(
        code(&format!(
            "http://198.18.0.1:7180/boot/by-mac/{mac}/../../../etc/passwd"
        )),
        "200"
    );
    assert_ne!(
        code(&format!(
            "http://198.18.0.1:7180/boot/by-mac/{mac}/..%2f..%2fetc%2fpasswd"
        )),
        "200"
    );
    assert_eq!(
        code("http://198.18.0.1:7180/boot/by-mac/nope/vmlinuz"),
        "400"
    );
    // The script fetch is the power-on trigger and is logged.
    let devs = a.devices();
    assert_eq!(devs[0]["mac"], mac, "{devs}");
    // Install the device (agent with that MAC), then it boots its disk.
    let hw = a.lab.file("hw.json");
    let disk = a.lab.file("disk.img");
    fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    fs::write(
        &hw,
        serde_json::json!({
            "dmi": {"vendor": "QEMU", "model": "Standard PC", "serial": "1"},
            "cpu": {"arch": "x86_64", "count": 1}, "memory_bytes": 1u64 << 30,
            "nics": [{"name": "d0", "mac": mac}],
            "disks": [{"name": "vda", "path": disk, "size_bytes": 2u64 << 20, "serial": "VDA-1"}],
        })
        .to_string(),
    )
    .unwrap();
    let agent = Command::new("ip")
        .args(["netns", "exec", &a.lab.ns("d1")])
        .arg(bin("rackcast-agent"))
        .args([
            "run",
            "--server",
            "198.18.0.1:7100",
            "--iface",
            "d0",
            "--os-present",
            "false",
            "--give-up",
            "30",
            "--hardware",
        ])
        .arg(&hw)
        .arg("--work-dir")
        .arg(a.lab.file("work"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Not in any rack inventory: under the default policy it is
    // inventoried, then held until an operator approves it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let devs = a.devices();
        let d = devs
            .as_array()
            .and_then(|v| v.iter().find(|d| d["mac"] == mac).cloned());
        if d.is_some_and(|d| d["state"] == "awaiting_approval") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never held for approval: {devs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        String::from_utf8_lossy(&a.cli(&["log", mac, "--json"]).stdout).contains(&format!(
            "awaiting approval: `rackcast approve {}`",
            rackcast::controller::device_id_for(mac)
        )),
        "the hold is in the device's log"
    );
    let approved = a.cli(&["approve", mac]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let out = finish(agent, Duration::from_secs(90));
    assert!(out.status.success(), "agent did not finish");
    let script = String::from_utf8_lossy(&curl(&[&url]).stdout).into_owned();
    assert!(
        script.contains("exit"),
        "installed device must boot its disk: {script}"
    );
    let log = Command::new("ip")
        .args(["netns", "exec", &a.lab.ns("app")])
        .arg(bin("rackcast"))
        .args(["log", mac, "--json", "--config"])
        .arg(&a.config)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.contains("iPXE fetched its script (loader)"), "{log}");
    assert!(
        log.contains("iPXE fetched its script (boot from disk)"),
        "{log}"
    );
    let _ = fs::remove_dir_all(&files);
}

// ---------------------------------------------------------------------------
// PXE end to end: a QEMU machine (software emulation, `-accel tcg`: this
// machine kind's /dev/kvm opens but its guests reset) on a tap in the lab's
// switch namespace, booting Debian's iPXE ROM (BIOS) or OVMF's own PXE
// (UEFI), the loader initrd of tools/build-loader-initrd.sh and Debian's
// kernel.

const QEMU: &str = "qemu-system-x86_64";

/// Whether a PXE machine can run here. In CI everything it needs must be
/// there (netlab/ensure-deps.sh installs it); elsewhere a missing piece
/// skips with the reason.
fn qemu_ready() -> bool {
    let tcg = Command::new(QEMU)
        .args(["-accel", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("tcg"))
        .unwrap_or(false);
    let kernel = fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    let missing: Vec<&str> = [
        (
            tcg,
            "qemu-system-x86_64 with software emulation (qemu-system-x86)",
        ),
        (kernel, "a kernel in /boot (linux-image-amd64)"),
        (
            std::path::Path::new("/usr/lib/ipxe/ipxe.efi").exists(),
            "/usr/lib/ipxe/ipxe.efi (ipxe)",
        ),
        (
            std::path::Path::new("/usr/share/ovmf/OVMF.fd").exists(),
            "/usr/share/ovmf/OVMF.fd (ovmf)",
        ),
        // The installed OS image of tests/fixtures/mk-seedable-os.sh.
        (
            std::path::Path::new("/usr/lib/syslinux/mbr/gptmbr.bin").exists()
                && std::path::Path::new("/usr/bin/syslinux").exists()
                && std::path::Path::new("/usr/sbin/mkfs.fat").exists(),
            "syslinux, syslinux-common and dosfstools",
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!(
        "PXE tests need {missing:?} (netlab/ensure-deps.sh test installs them)"
    ));
    false
}

/// The loader (kernel + initrd with our agent) and a stripped agent for
/// the bundles (the debug build's debug info would cost the emulated
/// machine minutes to download).
fn loader_files() -> tempfile::TempDir {
    let t = tempfile::Builder::new().prefix("rcpxe").tempdir().unwrap();
    let out = Command::new(root().join("tools/build-loader-initrd.sh"))
        .arg(t.path().join("loader"))
        .arg(bin("rackcast-agent"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-loader-initrd.sh: {}",
        text(&out)
    );
    assert!(t.path().join("loader/vmlinuz").exists(), "{}", text(&out));
    let st = Command::new("strip")
        .arg("-o")
        .arg(t.path().join("agent"))
        .arg(bin("rackcast-agent"))
        .status()
        .unwrap();
    assert!(st.success());
    t
}

/// A TFTP root beside the loader with Debian's `ipxe.efi`: what OVMF's
/// own PXE fetches before iPXE takes over.
fn tftp_root(files: &tempfile::TempDir) -> PathBuf {
    let tftp = files.path().join("tftp");
    fs::create_dir_all(&tftp).unwrap();
    fs::copy("/usr/lib/ipxe/ipxe.efi", tftp.join("ipxe.efi")).unwrap();
    tftp
}

/// Where `what` first shows in a device's log lines (it must).
fn log_pos(log: &[String], mac: &str, what: &str) -> usize {
    log.iter()
        .position(|l| l.contains(what))
        .unwrap_or_else(|| panic!("{mac}: no {what:?} in\n{}", log.join("\n")))
}

/// The UEFI machine's chain: OVMF's own PXE asked first, iPXE next, and
/// `ipxe.efi` went out by TFTP.
fn assert_uefi_pxe_chained_to_ipxe(a: &Appliance, mac: &str) {
    let log = a.log_details(mac);
    assert!(
        log_pos(&log, mac, "discovered ok power-on: x86-64 UEFI PXE")
            < log_pos(&log, mac, "power-on: iPXE (x86-64 UEFI PXE)")
    );
    let served = a.log();
    assert!(
        served.contains("TFTP transfer done") && served.contains("ipxe.efi"),
        "{served}"
    );
}

/// Every program the agent calls on a machine runs inside the loader
/// initrd as built (chroot into it unpacked): the agent, mdadm, blkid,
/// sfdisk, and mtools making and reading a FAT filesystem, which needs
/// glibc's codepage converters that no `ldd` lists. (A QEMU machine found
/// them missing: every identity step failed on real hardware while the
/// lab's agents, running on this host, passed.)
#[test]
fn the_loader_initrd_runs_every_program_the_agent_calls() {
    if !can_run() || !qemu_ready() {
        return;
    }
    let files = loader_files();
    let root = files.path().join("unpacked");
    fs::create_dir_all(&root).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat {} | (cd {} && cpio -idm --quiet)",
            files.path().join("loader/initrd.img").display(),
            root.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let inside = |args: &[&str]| -> Output {
        Command::new("chroot")
            .arg(&root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin")
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap()
    };
    for prog in [
        &["/usr/bin/rackcast-agent", "--version"][..],
        &["/sbin/mdadm", "--version"],
        &["/sbin/blkid", "-V"],
        &["/sbin/sfdisk", "--version"],
        &["/bin/busybox", "udhcpc", "--help"],
    ] {
        let out = inside(prog);
        // busybox applets print their help and exit 1 with --help.
        let t = text(&out);
        assert!(
            out.status.success() || (prog[0] == "/bin/busybox" && t.contains("Usage: udhcpc")),
            "{prog:?} in the loader: {t}"
        );
    }
    fs::File::create(root.join("tmp/seed.img"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    fs::write(root.join("tmp/meta-data"), "local-hostname: \"node1\"\n").unwrap();
    for step in [
        &[
            "/usr/bin/mformat",
            "-i",
            "/tmp/seed.img",
            "-T",
            "16384",
            "-v",
            "CIDATA",
            "::",
        ][..],
        &[
            "/usr/bin/mcopy",
            "-i",
            "/tmp/seed.img",
            "/tmp/meta-data",
            "::meta-data",
        ],
    ] {
        let out = inside(step);
        assert!(
            out.status.success(),
            "{step:?} in the loader: {}",
            text(&out)
        );
    }
    let out = inside(&["/usr/bin/mtype", "-i", "/tmp/seed.img", "::meta-data"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "local-hostname: \"node1\"\n"
    );
}

/// A disk image whose first sector boots: real-mode code that writes a
/// line to the first serial port and halts; the rest is patterned data so
/// a wrong byte anywhere shows.
fn bootable_image(len: usize) -> Vec<u8> {
    let mut img: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    img[..512].fill(0);
    #[rustfmt::skip]
    let code: [u8; 23] = [
        0x31, 0xc0,             // xor ax, ax
        0x8e, 0xd8,             // mov ds, ax
        0xfc,                   // cld
        0xbe, 0x17, 0x7c,       // mov si, 0x7c17 (the message)
        0xac,                   // next: lodsb
        0x84, 0xc0,             // test al, al
        0x74, 0x06,             // jz halt
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8 (COM1)
        0xee,                   // out dx, al
        0xeb, 0xf5,             // jmp next
        0xfa, 0xf4, 0xeb, 0xfc, // halt: cli; hlt; jmp halt
    ];
    img[..23].copy_from_slice(&code);
    let msg = b"rackcast-test: installed OS booted\r\n\0";
    img[23..23 + msg.len()].copy_from_slice(msg);
    img[510] = 0x55;
    img[511] = 0xaa;
    img
}

/// A tap on the lab bridge, in the switch namespace.
fn lab_tap(lab: &Lab, name: &str) {
    let sw = lab.ns("sw");
    for args in [
        vec!["tuntap", "add", name, "mode", "tap"],
        vec!["link", "set", name, "master", "br0"],
        vec!["link", "set", name, "up"],
    ] {
        let st = Command::new("ip")
            .args(["-n", &sw])
            .args(&args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }
}

struct Vm<'a> {
    tap: &'a str,
    mac: &'a str,
    /// `-smbios type=1,...` fields and `-uuid`.
    smbios: &'a str,
    uuid: &'a str,
    firmware: &'a [&'a str],
    /// Extra `-device virtio-net-pci` properties (`romfile=` for OVMF's own PXE).
    nic_extra: &'a str,
    /// virtio disks, in order (vda, vdb, ...).
    disks: &'a [&'a std::path::Path],
}

fn start_vm(lab: &Lab, vm: &Vm, console: &std::path::Path) -> Proc {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns("sw"), QEMU])
        .args([
            "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
        ])
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(vm.firmware)
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            vm.tap
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,mac={}{}",
            vm.mac, vm.nic_extra
        ))
        .arg("-smbios")
        .arg(format!("type=1,{}", vm.smbios))
        .args(["-uuid", vm.uuid]);
    for (i, d) in vm.disks.iter().enumerate() {
        // A serial per disk, as real disks have (plans name disks by
        // serial and size): a virtio-blk device per drive, in order.
        let serial = d
            .file_stem()
            .map(|s| s.to_string_lossy().to_uppercase())
            .unwrap_or_default();
        c.arg("-drive")
            .arg(format!(
                "file={},if=none,id=disk{i},format=raw",
                d.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i},serial={serial}"));
    }
    Proc(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

impl Appliance {
    /// Wait (bounded) for `done`; on timeout show what the appliance and
    /// the machine's console said.
    fn wait_for(
        &self,
        what: &str,
        secs: u64,
        console: &std::path::Path,
        mut ok: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !ok() {
            if Instant::now() > deadline {
                let con = fs::read_to_string(console).unwrap_or_default();
                let tail: String = con
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!(
                    "{what}: not within {secs} s\n--- appliance ---\n{}\n--- console ---\n{tail}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The appliance's bundle-signing key fingerprint (`rackcast key`).
    fn key(&self) -> String {
        let out = self.cli(&["key"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn cli_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let out = self.cli(&args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The device's event-log details, in order.
    fn log_details(&self, mac: &str) -> Vec<String> {
        self.cli_json(&["log", mac])
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["step"].as_str().unwrap_or(""),
                    e["kind"].as_str().unwrap_or(""),
                    e["detail"].as_str().unwrap_or("")
                )
            })
            .collect()
    }
}

fn dhcp_full_with_http(files: &std::path::Path) -> String {
    format!(
        "[boot.dhcp]\nmode = \"full\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n\
         pool_start = \"198.18.0.100\"\npool_end = \"198.18.0.120\"\n\
         netmask = \"255.255.255.0\"\nlease_time = \"10m\"\n\n\
         [boot.http]\nfiles = \"{}\"\ncmdline = \"console=ttyS0 panic=-1\"\n",
        files.join("loader").display()
    )
}

fn assert_inventory(
    a: &Appliance,
    mac: &str,
    product: &str,
    serial: &str,
    uuid: &str,
) -> serde_json::Value {
    let inv = a
        .cli_json(&["inventory", mac])
        .expect("the loader reported an inventory");
    assert_eq!(inv["dmi"]["vendor"], "RackcastLab", "{inv}");
    assert_eq!(inv["dmi"]["model"], product, "{inv}");
    assert_eq!(inv["dmi"]["serial"], serial, "{inv}");
    assert_eq!(inv["dmi"]["uuid"], uuid, "{inv}");
    assert_eq!(inv["nics"][0]["mac"], mac, "{inv}");
    // virtio-net's PCI id: the inventory came from the machine's /sys.
    assert_eq!(inv["nics"][0]["pci_id"], "1af4:0001", "{inv}");
    inv
}

/// Machines of model `model`: their BMC answers on the lab network at
/// `bmc_ip` (a Redfish emulator in a device namespace); RAID1 over their
/// two smallest disks, whatever their order, with md superblock format
/// `metadata`.
fn bios_and_raid1_profile(name: &str, model: &str, bmc_ip: &str, metadata: &str) -> String {
    format!(
        "[[profiles]]\nname = \"{name}\"\nmodel = \"{model}\"\nimage = \"img\"\n\
         [profiles.bios]\nattributes = {{ ProcTurboMode = \"Disabled\", BootMode = \"Uefi\" }}\n\
         [profiles.bios.redfish]\nurl = \"http://{bmc_ip}:{BMC_PORT}\"\nusername = \"{BMC_USER}\"\n\
         password = \"{BMC_PASSWORD}\"\nsettle_timeout = \"30s\"\n\
         [profiles.raid]\nlevel = \"raid1\"\ndisks = {{ order = \"smallest\", count = 2 }}\n\
         array = \"/dev/md/rackcast\"\nmetadata = \"{metadata}\"\n"
    )
}

/// Sparse disk files for a machine, old data in their first MiB (a wrong
/// write cannot pass as the image).
fn machine_disks(lab: &Lab, sizes_mib: &[(&str, u64)]) -> Vec<PathBuf> {
    sizes_mib
        .iter()
        .map(|(n, mib)| {
            let p = lab.file(&format!("{n}.raw"));
            fs::write(&p, vec![0xa5u8; 1 << 20]).unwrap();
            fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(mib << 20)
                .unwrap();
            p
        })
        .collect()
}

/// A RAID1 member disk holds `image[range]` at md's data offset (read
/// with the host's mdadm from the disk file: this host kernel has no md,
/// so the arrays live in the emulated machines). Returns the offset in
/// sectors.
fn assert_mirror_half_holds(
    d: &std::path::Path,
    image: &[u8],
    range: std::ops::Range<usize>,
) -> u64 {
    let out = Command::new("mdadm")
        .arg("--examine")
        .arg(d)
        .output()
        .unwrap();
    let text = text(&out);
    let sectors: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Data Offset : "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(text.contains("Raid Level : raid1"), "{text}");
    let bytes = fs::read(d).unwrap();
    let at = (sectors * 512) as usize;
    assert!(
        bytes[at + range.start..at + range.end] == image[range.clone()],
        "{} does not hold the image's bytes {range:?} at offset {at}",
        d.display()
    );
    sectors
}

/// Where a machine's state is, by MAC.
fn state_of(a: &Appliance, mac: &str) -> String {
    a.cli_json(&["devices"])
        .and_then(|d| d.as_array().cloned())
        .and_then(|d| d.into_iter().find(|r| r["mac"] == mac))
        .map(|r| r["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Two machines of a rack power on together: a legacy-BIOS one (SeaBIOS +
/// Debian's iPXE ROM) and a UEFI one (OVMF's own PXE, which gets ipxe.efi
/// by TFTP). Each has a BMC (Redfish emulator) and three virtio disks;
/// each gets its BIOS set through its BMC and a RAID1 made by mdadm on
/// its two smallest disks, at its own pace; then the wave writes the
/// image onto each array. The BIOS machine then boots a mirror half;
/// the UEFI one is reinstalled: BIOS already as wanted, array reused.
/// (This host kernel has no md: the arrays live in the emulated machines.)
#[test]
fn two_pxe_machines_get_bios_and_raid1_at_their_pace_then_the_image_onto_their_arrays() {
    if !can_run() || !qemu_ready() {
        return;
    }
    let files = loader_files();
    let tftp = tftp_root(&files);
    let boot = format!(
        "{}\n[boot.tftp]\nroot = \"{}\"\niface = \"srv0\"\n",
        dhcp_full_with_http(files.path()),
        tftp.display()
    );
    // The BIOS machine's OS: a GPT disk that boots Debian's kernel and
    // prints the hostname its NoCloud seed names (the identity step adds
    // the seed). The UEFI machine gets patterned data (it never boots it).
    let os = files.path().join("os.img");
    let out = Command::new(root().join("tests/fixtures/mk-seedable-os.sh"))
        .arg(&os)
        .output()
        .unwrap();
    assert!(out.status.success(), "mk-seedable-os.sh: {}", text(&out));
    let os_bytes = fs::read(&os).unwrap();
    let os_part = match rack::gpt(&os).as_deref() {
        Some([(start, size, _), ..]) => (*start as usize * 512)..((start + size) as usize * 512),
        other => panic!("{}: {other:?}", os.display()),
    };
    let user_data = files.path().join("user-data.j2");
    fs::write(
        &user_data,
        "#cloud-config\nhostname: {{ hostname | tojson }}\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJhY2tjYXN0LXB4ZS10ZXN0 pxe@rackcast\n",
    )
    .unwrap();
    let profiles = format!(
        "[[images]]\nname = \"os\"\npath = \"{}\"\n\n{}\n{}",
        os.display(),
        // md superblock at the end: each mirror half is a disk the legacy
        // BIOS can boot.
        bios_and_raid1_profile("pxe-box", "PXE-Box-7", "198.18.0.11", "1.0").replace(
            "image = \"img\"\n",
            &format!(
                "image = \"os\"\nidentity = {{ user_data = \"{}\" }}\n",
                user_data.display()
            )
        ),
        bios_and_raid1_profile("uefi-box", "UEFI-Box-2", "198.18.0.12", "1.2")
    );
    let image = bootable_image(4 << 20);
    let mut a = Appliance::with_parts(
        "px",
        2,
        &boot,
        "DHCP service listening",
        Install {
            agent: &files.path().join("agent"),
            image: &image,
            profile: &profiles,
            // The two machines are in the rack inventory, with the serials
            // their firmware reports (checked at inventory).
            known: &[
                ("52:54:00:18:00:01", "SN-PXE-0001"),
                ("52:54:00:18:00:02", "SN-UEFI-0002"),
            ],
        },
    );
    let bmc_b = Bmc::start_on(&a.lab, "d1", "198.18.0.11");
    let bmc_u = Bmc::start_on(&a.lab, "d2", "198.18.0.12");
    let (mac_b, uuid_b) = ("52:54:00:18:00:01", "6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7d01");
    let (mac_u, uuid_u) = ("52:54:00:18:00:02", "6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7d02");
    // BIOS machine: vda and vdb (the two smallest) become the mirror; vda
    // boots. UEFI machine: vdb and vdc; vda (the largest) stays untouched.
    let disks_b = machine_disks(&a.lab, &[("b-vda", 64), ("b-vdb", 64), ("b-vdc", 96)]);
    let disks_u = machine_disks(&a.lab, &[("u-vda", 96), ("u-vdb", 64), ("u-vdc", 64)]);
    let refs_b: Vec<&std::path::Path> = disks_b.iter().map(|p| p.as_path()).collect();
    let refs_u: Vec<&std::path::Path> = disks_u.iter().map(|p| p.as_path()).collect();
    lab_tap(&a.lab, "pxtap0");
    lab_tap(&a.lab, "pxtap1");
    let vm_b = Vm {
        tap: "pxtap0",
        mac: mac_b,
        smbios: "manufacturer=RackcastLab,product=PXE-Box-7,serial=SN-PXE-0001",
        uuid: uuid_b,
        // Network first, then the first disk: what a rack's BIOS is set to.
        firmware: &["-boot", "order=nc"],
        nic_extra: "",
        disks: &refs_b,
    };
    let vm_u = Vm {
        tap: "pxtap1",
        mac: mac_u,
        smbios: "manufacturer=RackcastLab,product=UEFI-Box-2,serial=SN-UEFI-0002",
        uuid: uuid_u,
        firmware: &["-bios", "/usr/share/ovmf/OVMF.fd", "-boot", "n"],
        // No iPXE option ROM: OVMF's own PXE client starts the chain.
        nic_extra: ",romfile=",
        disks: &refs_u,
    };

    // Power-on: firmware DHCP (the trigger) -> iPXE -> per-device script
    // over HTTP -> kernel + loader initrd -> inventory -> bundle -> BIOS
    // -> RAID -> wave.
    let console_b = a.lab.file("console-b1.log");
    let console_u = a.lab.file("console-u1.log");
    let run_b = start_vm(&a.lab, &vm_b, &console_b);
    let run_u = start_vm(&a.lab, &vm_u, &console_u);
    a.wait_for("both machines installed", 480, &console_u, || {
        state_of(&a, mac_b) == "done" && state_of(&a, mac_u) == "done"
    });
    drop(run_b);
    drop(run_u);
    assert_inventory(&a, mac_b, "PXE-Box-7", "SN-PXE-0001", uuid_b);
    assert_inventory(&a, mac_u, "UEFI-Box-2", "SN-UEFI-0002", uuid_u);
    let key = a.key();
    for (mac, uuid, firmware, members, meta, img) in [
        (
            mac_b,
            uuid_b,
            "legacy BIOS PXE",
            "/dev/vda /dev/vdb",
            "1.0",
            "os",
        ),
        (
            mac_u,
            uuid_u,
            "x86-64 UEFI PXE",
            "/dev/vdb /dev/vdc",
            "1.2",
            "img",
        ),
    ] {
        let log = a.log_details(mac);
        let pos = |s: &str| log_pos(&log, mac, s);
        // Option 97 from the real firmware, shown as the BMC shows it.
        let on = pos(&format!("power-on: iPXE ({firmware}), uuid {uuid}"));
        let script = pos("discovered info power-on: iPXE fetched its script (loader)");
        pos("HTTP GET vmlinuz: 200");
        pos("HTTP GET initrd.img: 200");
        let loader = pos("loader_booted ok loader network-booted");
        // The loader took the appliance key's fingerprint from the kernel
        // command line the iPXE script wrote, and checked the bundle.
        let signed = pos(&format!("verified with appliance key {key}"));
        let bios = pos("bios-verify ok");
        pos(&format!(
            "raid-inspect ok: /dev/md/rackcast: not running; {}",
            members
                .split(' ')
                .map(|m| format!("{m}: no RAID metadata"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        pos(&format!(
            "mdadm ok (exit 0): mdadm --create /dev/md/rackcast --run --metadata={meta} --name=rackcast --level=raid1 --raid-devices=2 {members}"
        ));
        let raid = pos(&format!(
            "raid-verify ok: /dev/md/rackcast: raid1 over {members}"
        ));
        let imaged = pos(&format!(
            "imaging ok image {img} written to /dev/md/rackcast and verified"
        ));
        pos("image_verified ok whole-image BLAKE3");
        pos("done ok");
        assert!(
            on < script
                && script < loader
                && loader < signed
                && signed < bios
                && bios < raid
                && raid < imaged,
            "{mac}: out of order:\n{}",
            log.join("\n")
        );
    }
    // The UEFI firmware's own PXE came first and got ipxe.efi by TFTP.
    assert_uefi_pxe_chained_to_ipxe(&a, mac_u);
    // Each machine was a verified member of a finished wave (one wave for
    // both when they were ready together; the faster one does not wait
    // for a machine still being inventoried: that one joins late or gets
    // the next wave).
    let waves = a.cli_json(&["waves"]).unwrap();
    for mac in [mac_b, mac_u] {
        let devs = a.devices();
        let w = devs
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["mac"] == mac)
            .map(|d| d["wave"].clone())
            .unwrap();
        let rec = waves
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == w)
            .unwrap_or_else(|| panic!("{mac}: wave {w} not in {waves}"));
        assert_eq!(rec["state"], "finished", "{rec}");
        assert!(rec["verified"].as_u64().unwrap() >= 1, "{rec}");
    }
    for bmc in [&bmc_b, &bmc_u] {
        assert_eq!(bmc.bios()["ProcTurboMode"], "Disabled");
        assert_eq!(bmc.count("PATCH", "/BIOS/Settings"), 1);
    }
    // Every mirror half holds its image (metadata 1.0: at offset 0; the
    // BIOS machine's OS partition byte for byte, its partition table the
    // identity step's to change); the disks outside the arrays were not
    // written.
    for d in &disks_b[..2] {
        assert_eq!(
            assert_mirror_half_holds(d, &os_bytes, os_part.clone()),
            0,
            "metadata 1.0: data at 0"
        );
    }
    for d in &disks_u[1..] {
        assert!(
            assert_mirror_half_holds(d, &image, 0..image.len()) > 0,
            "metadata 1.2: data after it"
        );
    }
    // The BIOS machine's identity, read back from a mirror half on this
    // host (mtools): the seed the agent wrote on the array.
    let meta = rack::seed_file(&disks_b[0], "meta-data");
    assert!(meta.contains("local-hostname: \"node1\""), "{meta}");
    assert!(rack::seed_file(&disks_b[1], "user-data").contains("pxe@rackcast"));
    assert!(a
        .log_details(mac_b)
        .iter()
        .any(|l| l.starts_with("identity_written ok")));
    for d in [&disks_b[2], &disks_u[0]] {
        assert!(
            fs::read(d).unwrap()[..1 << 20].iter().all(|&b| b == 0xa5),
            "{}",
            d.display()
        );
    }

    // Second power-on. The BIOS machine is installed: DHCP names no boot
    // file, iPXE gives up and the BIOS boots vda, a half of its mirror.
    // The UEFI machine the operator has installed again: BIOS already as
    // wanted, the stopped array found on its disks, assembled and reused.
    let again = a.log_details(mac_u).len();
    let out = a.cli(&["reinstall", mac_u]);
    assert!(out.status.success(), "{}", text(&out));
    let console_b = a.lab.file("console-b2.log");
    let console_u = a.lab.file("console-u2.log");
    let _run_b = start_vm(&a.lab, &vm_b, &console_b);
    let _run_u = start_vm(&a.lab, &vm_u, &console_u);
    // Its OS finds the seed and shows the hostname it names, as
    // cloud-init would set it.
    a.wait_for(
        "BIOS machine booting from its mirror half, showing its seeded hostname",
        240,
        &console_b,
        || {
            fs::read_to_string(&console_b)
                .unwrap_or_default()
                .contains("rackcast-test: seeded hostname node1 (NoCloud seed on /dev/vda2)")
        },
    );
    let log_b = a.log_details(mac_b);
    assert!(
        log_b.iter().any(|l| l.contains(&format!(
            "done info network boot: iPXE (legacy BIOS PXE), uuid {uuid_b}; installed: no boot file"
        ))),
        "{}",
        log_b.join("\n")
    );
    assert_eq!(state_of(&a, mac_b), "done");
    a.wait_for("UEFI machine installed again", 480, &console_u, || {
        state_of(&a, mac_u) == "done"
    });
    let log_u = a.log_details(mac_u);
    let second = &log_u[again..];
    let has = |s: &str| second.iter().any(|l| l.contains(s));
    for want in [
        "discovered info reinstall requested by the operator",
        "bios-diff ok: already as wanted, nothing to change (no PATCH, no reset)",
        "raid-inspect ok: /dev/md/rackcast: not running; /dev/vdb: raid1 member",
        "raid_configured ok existing raid1 array /dev/md/rackcast assembled and reused",
        "imaging ok image img written to /dev/md/rackcast and verified",
        "done ok",
    ] {
        assert!(
            has(want),
            "no {want:?} after the reinstall in\n{}",
            second.join("\n")
        );
    }
    assert_eq!(
        bmc_u.count("PATCH", "/BIOS/Settings"),
        1,
        "one PATCH in two installs"
    );
    assert_eq!(bmc_u.count("POST", "ComputerSystem.Reset"), 1);
    drop(_run_u);

    // The operator changes the UEFI profile to RAID0 and allows wiping:
    // the RAID1 metadata on its disks is destroyed and a RAID0 made.
    let cfg = fs::read_to_string(&a.config).unwrap();
    let old = bios_and_raid1_profile("uefi-box", "UEFI-Box-2", "198.18.0.12", "1.2");
    assert!(cfg.contains(&old));
    let new = old.replace("level = \"raid1\"", "level = \"raid0\"\nwipe = true");
    fs::write(&a.config, cfg.replace(&old, &new)).unwrap();
    a.stop();
    a.start();
    let out = a.cli(&["reinstall", mac_u]);
    assert!(out.status.success(), "{}", text(&out));
    let third = a.log_details(mac_u).len();
    let console_u = a.lab.file("console-u3.log");
    let _run_u = start_vm(&a.lab, &vm_u, &console_u);
    a.wait_for("UEFI machine on RAID0", 480, &console_u, || {
        state_of(&a, mac_u) == "done"
    });
    let log_u = a.log_details(mac_u);
    let rows = &log_u[third..];
    let has = |s: &str| rows.iter().any(|l| l.contains(s));
    for want in [
        "raid-inspect ok: /dev/md/rackcast: not running; /dev/vdb: raid1 member",
        "WipeAndCreate",
        "mdadm ok (exit 0): mdadm --zero-superblock /dev/vdb",
        "mdadm ok (exit 0): mdadm --zero-superblock /dev/vdc",
        "mdadm ok (exit 0): mdadm --create /dev/md/rackcast --run --metadata=1.2 --name=rackcast --level=raid0 --raid-devices=2 /dev/vdb /dev/vdc",
        "raid-verify ok: /dev/md/rackcast: raid0 over /dev/vdb /dev/vdc",
        "imaging ok image img written to /dev/md/rackcast and verified",
        "done ok",
    ] {
        assert!(has(want), "no {want:?} after the RAID0 change in\n{}", rows.join("\n"));
    }
    let out = Command::new("mdadm")
        .arg("--examine")
        .arg(&disks_u[1])
        .output()
        .unwrap();
    assert!(text(&out).contains("Raid Level : raid0"), "{}", text(&out));
}

/// proxyDHCP with real firmware, as most sites deploy it: the site's DHCP
/// server (dnsmasq) hands out the addresses, rackcast only the boot files.
/// A legacy-BIOS machine (SeaBIOS + Debian's iPXE ROM) and a UEFI one
/// (OVMF's own PXE, then ipxe.efi by TFTP) boot through it into the
/// loader, which reports their inventory.
#[test]
fn proxy_dhcp_beside_dnsmasq_boots_real_firmware_into_the_loader() {
    if !can_run() || !qemu_ready() {
        return;
    }
    let files = loader_files();
    let tftp = tftp_root(&files);
    let boot = format!(
        "[boot.dhcp]\nmode = \"proxy\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n\n\
         [boot.http]\nfiles = \"{}\"\ncmdline = \"console=ttyS0 panic=-1\"\n\n\
         [boot.tftp]\nroot = \"{}\"\niface = \"srv0\"\n",
        files.path().join("loader").display(),
        tftp.display()
    );
    let a = Appliance::with_parts(
        "pp",
        1,
        &boot,
        "DHCP service listening",
        Install {
            agent: &files.path().join("agent"),
            image: &[7u8; 1 << 20],
            profile: ANY_PROFILE,
            known: &[],
        },
    );
    let _dnsmasq = site_dhcp(&a.lab, "d1");
    let disks = machine_disks(&a.lab, &[("pb-vda", 8), ("pu-vda", 8)]);
    lab_tap(&a.lab, "pptap0");
    lab_tap(&a.lab, "pptap1");
    let (mac_b, uuid_b) = ("52:54:00:18:01:01", "6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7e01");
    let (mac_u, uuid_u) = ("52:54:00:18:01:02", "6a1c0e5e-8d0f-4a53-9f4e-0c9a3b6a7e02");
    let vm_b = Vm {
        tap: "pptap0",
        mac: mac_b,
        smbios: "manufacturer=RackcastLab,product=Proxy-BIOS,serial=SN-PB-1",
        uuid: uuid_b,
        firmware: &["-boot", "order=nc"],
        nic_extra: "",
        disks: &[&disks[0]],
    };
    let vm_u = Vm {
        tap: "pptap1",
        mac: mac_u,
        smbios: "manufacturer=RackcastLab,product=Proxy-UEFI,serial=SN-PU-1",
        uuid: uuid_u,
        firmware: &["-bios", "/usr/share/ovmf/OVMF.fd", "-boot", "n"],
        nic_extra: ",romfile=",
        disks: &[&disks[1]],
    };
    let console_b = a.lab.file("console-pb.log");
    let console_u = a.lab.file("console-pu.log");
    let run_b = start_vm(&a.lab, &vm_b, &console_b);
    let run_u = start_vm(&a.lab, &vm_u, &console_u);
    let booted = |mac: &str| {
        a.log_details(mac)
            .iter()
            .any(|l| l.starts_with("loader_booted ok"))
    };
    a.wait_for("both machines in the loader", 300, &console_u, || {
        booted(mac_b) && booted(mac_u)
    });
    // The loader reported what it runs on: the firmware, iPXE and the
    // loader all went through proxyDHCP to reach it.
    a.wait_for("both inventories", 120, &console_b, || {
        a.cli_json(&["inventory", mac_b]).is_some() && a.cli_json(&["inventory", mac_u]).is_some()
    });
    drop(run_b);
    drop(run_u);
    assert_eq!(
        a.cli_json(&["inventory", mac_b]).unwrap()["dmi"]["serial"],
        "SN-PB-1"
    );
    assert_eq!(
        a.cli_json(&["inventory", mac_u]).unwrap()["dmi"]["serial"],
        "SN-PU-1"
    );
    for (mac, uuid, firmware) in [
        (mac_b, uuid_b, "legacy BIOS PXE"),
        (mac_u, uuid_u, "x86-64 UEFI PXE"),
    ] {
        let log = a.log_details(mac);
        let pos = |s: &str| log_pos(&log, mac, s);
        let on = pos(&format!("power-on: iPXE ({firmware}), uuid {uuid}"));
        let script = pos("power-on: iPXE fetched its script (loader)");
        let loader = pos("loader_booted ok loader network-booted");
        assert!(on < script && script < loader, "{}", log.join("\n"));
    }
    // OVMF's own PXE came first and fetched ipxe.efi by TFTP.
    assert_uefi_pxe_chained_to_ipxe(&a, mac_u);
    // Every address came from the site's server: both MACs hold a dnsmasq
    // lease in its pool, and rackcast (proxy) handed out none.
    let leases = fs::read_to_string(a.lab.file("dnsmasq-d1.leases")).unwrap_or_default();
    for mac in [mac_b, mac_u] {
        let l = leases
            .lines()
            .find(|l| l.contains(mac))
            .unwrap_or_else(|| panic!("no dnsmasq lease for {mac}:\n{leases}"));
        assert!(
            l.contains(" 198.18.0.15") || l.contains(" 198.18.0.160"),
            "{l}"
        );
    }
    let served = a.log();
    assert!(!served.contains("DHCP lease bound"), "{served}");
}
