//! The live view, as operators watch it: `rackcast watch` in a terminal
//! (tmux, read with capture-pane) and the web page in a real browser
//! (Debian's Chromium, driven by chromedriver over WebDriver), both
//! following a wave as the appliance pushes changes. Needs root (netns).

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::rack::*;
use common::*;
use serde_json::{json, Value};

/// A WebDriver session of Chromium in the appliance's namespace; ended
/// and its driver stopped on drop.
struct Browser {
    ns: String,
    driver: Child,
    session: String,
    port: u16,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(lab: &Lab) -> Option<Browser> {
        for exe in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            if !std::path::Path::new(exe).exists() {
                skip(&format!("{exe} missing: run netlab/ensure-deps.sh test"));
                return None;
            }
        }
        let ns = lab.ns("app");
        let port = 9515;
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns, "chromedriver"])
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut b = Browser {
            ns,
            driver,
            session: String::new(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.call("GET", "/status", None)["value"]["ready"] != true {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        let profile = lab.file("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1400,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut c = Command::new("ip");
        c.args([
            "netns", "exec", &self.ns, "curl", "-s", "-m", "60", "-X", method,
        ])
        .args(["-H", "content-type: application/json"]);
        if let Some(b) = body {
            c.args(["-d", &b.to_string()]);
        }
        let out = c
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v["value"][ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no {css}: {v}"))
            .to_string()
    }

    fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": js, "args": []})),
        )["value"]
            .clone()
    }

    /// The page's text once it contains `needle` (a click's navigation
    /// may still be under way), or what it shows after 15 s.
    fn wait_text(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let t = self
                .script("return document.body ? document.body.innerText : ''")
                .as_str()
                .unwrap_or("")
                .to_string();
            if t.contains(needle) || Instant::now() >= deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, to: &std::path::Path) {
        use base64_png::decode;
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = decode(v["value"].as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.call("DELETE", &self.s(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (WebDriver screenshots), without a crate for one call.
mod base64_png {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| -> Option<u32> {
            Some(match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            } as u32)
        };
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter_map(val) {
            acc = (acc << 6) | c;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }
}

/// A tmux session running `rackcast watch` where an operator runs it.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(rack: &Rack) -> Tmux {
        let name = format!("rcwatch{}", std::process::id());
        let cmd = format!(
            "ip netns exec {} env RACKCAST_TOKEN={} {} watch --config {}",
            rack.lab.ns("app"),
            operator_token(&rack.config, "viewer"),
            bin("rackcast").display(),
            rack.config.display()
        );
        let st = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "180",
                "-y",
                "45",
                &cmd,
            ])
            .status()
            .expect("tmux");
        assert!(st.success());
        Tmux { name }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

#[test]
fn the_live_view_follows_a_wave_in_a_terminal_and_a_browser() {
    if !can_run() {
        return;
    }
    let n = 2;
    // One wave of both devices, slow enough (64 MiB at 20 Mbit/s, ~25 s)
    // to be watched while it runs.
    let extra = format!(
        "[waves]\nmin_members = 2\nstart_after = \"2s\"\nmember_timeout = \"30s\"\n{}",
        (1..=n)
            .map(|i| format!("[[devices]]\nmac = \"{}\"\nprofile = \"r650\"\n", mac(i)))
            .collect::<String>()
    );
    let mut rack = Rack::build("lv", n, "100mbit", (64, 8), &extra, false, 20);
    let Some(browser) = Browser::start(&rack.lab) else {
        return;
    };
    let tmux = Tmux::start(&rack);
    let base = format!("https://{}", ApplianceConfig::OPERATOR);

    // Sign in with a viewer token; an admin token is refused.
    browser.go(&format!("{base}/ui"));
    let url = browser.call("GET", &browser.s("/url"), None)["value"].clone();
    assert!(url.as_str().unwrap_or("").ends_with("/ui/login"), "{url}");
    let sign_in = |token: &str| {
        let field = browser.find("input[name=token]");
        browser.call(
            "POST",
            &browser.s(&format!("/element/{field}/value")),
            Some(json!({ "text": token })),
        );
        let button = browser.find("button[type=submit]");
        // W3C WebDriver wants a JSON body, `{}`, even for a click.
        browser.call(
            "POST",
            &browser.s(&format!("/element/{button}/click")),
            Some(json!({})),
        );
    };
    sign_in(&operator_token(&rack.config, "admin"));
    let refused = browser.wait_text("That is an admin token");
    assert!(refused.contains("That is an admin token"), "{refused}");
    sign_in(&operator_token(&rack.config, "viewer"));
    let page = browser.wait_text("Devices");
    assert!(page.contains("Waves") && page.contains("Devices"), "{page}");
    let url = browser.call("GET", &browser.s("/url"), None)["value"].clone();
    assert!(url.as_str().unwrap_or("").ends_with("/ui"), "{url}");

    for i in 1..=n {
        rack.start_agent(i);
    }
    rack.wait_for(
        "both imaging with progress",
        Duration::from_secs(120),
        |d| {
            d.len() == n
                && d.iter().all(|x| {
                    x["step"] == "imaging" && x["progress"].as_f64().is_some_and(|p| p > 5.0)
                })
        },
    );
    // SIGHUP while the wave runs: a config that does not load is refused
    // and changes nothing; a valid one changes a wave policy, and the
    // running wave still finishes (checked below).
    let hup = |rack: &Rack, marker: &str| {
        let pid = rack.serve.as_ref().unwrap().id();
        let before = rack.serve_log().matches(marker).count();
        let st = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while rack.serve_log().matches(marker).count() == before {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} after SIGHUP:\n{}",
                tail(&rack.serve_log(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let good = fs::read_to_string(&rack.config).unwrap();
    fs::write(&rack.config, "[appliance\n").unwrap();
    hup(&rack, "config reload (SIGHUP) refused");
    assert!(good.contains("member_timeout = \"30s\""), "{good}");
    fs::write(
        &rack.config,
        good.replace(
            "member_timeout = \"30s\"",
            "member_timeout = \"45s\"\nslow_members = \"wait\"",
        ),
    )
    .unwrap();
    hup(&rack, "config reloaded (SIGHUP)");
    let log = rack.serve_log();
    assert!(
        log.contains("waves.member_timeout 30s -> 45s") && log.contains("waves.slow_members"),
        "{}",
        tail(&log, 10)
    );
    // The page: every device with its state, and the wave's progress
    // moving without a reload.
    let rows = |b: &Browser| -> Value {
        b.script(
            "return Array.from(document.querySelectorAll('#devices tbody tr')).map(r => \
             Array.from(r.cells).map(c => c.innerText))",
        )
    };
    let progress = |b: &Browser| -> f64 {
        b.script("var p = document.querySelector('#waves progress'); return p ? p.value : -1")
            .as_f64()
            .unwrap_or(-1.0)
    };
    let first = progress(&browser);
    let r = rows(&browser);
    for i in 1..=n {
        assert!(
            r.as_array()
                .unwrap()
                .iter()
                .any(|row| row[0] == device_id(i) && row[2] == "running" && row[3] == "imaging"),
            "device {i} on the page: {r}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut later = first;
    while later <= first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        later = progress(&browser);
    }
    assert!(
        first >= 0.0 && later > first,
        "the wave's progress moved on the page: {first} -> {later}"
    );
    browser.screenshot(&root().join("target/test-artifacts/live-view.png"));

    // The terminal, at the same time.
    let screen = tmux.screen();
    assert!(screen.contains("WAVES (1 running)"), "{screen}");
    assert!(
        screen.contains("debian") && screen.contains('%') && screen.contains("Mbit/s"),
        "{screen}"
    );
    for i in 1..=n {
        assert!(
            screen
                .lines()
                .any(|l| l.contains(&device_id(i)) && l.contains("imaging")),
            "{screen}"
        );
    }

    rack.wait_for("all devices done", Duration::from_secs(240), all_done(n));
    let waves = rack.cli(&["waves"]);
    let w = &waves.as_array().unwrap()[0];
    assert!(
        w["state"] == "finished" && w["verified"] == 2,
        "the wave running at the SIGHUP finished: {w}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut screen = tmux.screen();
    while !screen.contains(&format!("done {n}")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        screen = tmux.screen();
    }
    assert!(screen.contains(&format!("done {n}")), "{screen}");
    assert!(screen.contains("WAVES (0 running)"), "{screen}");
    // The device page: its log and inventory, read with the cookie.
    browser.go(&format!("{base}/ui/devices/{}", device_id(1)));
    let text = browser.wait_text("image_verified");
    assert!(
        text.contains("PowerEdge R650")
            && text.contains("image_verified")
            && text.contains("SN0001"),
        "{text}"
    );
    // The page's script and the cookie act on nothing: a POST with the
    // cookie alone is refused.
    let status = browser.script(
        "var x = new XMLHttpRequest(); x.open('POST', '/api/devices/x/retry', false); \
         x.setRequestHeader('content-type', 'application/json'); x.send('{}'); return x.status",
    );
    assert_eq!(status, 401, "the cookie is no bearer token for actions");
}
