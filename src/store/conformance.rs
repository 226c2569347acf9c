//! What every [`Store`] back end must do, as one suite both run: the
//! SQLite file in its unit tests, a real PostgreSQL server in its own.
//!
//! Owns: the behaviour the controller relies on (atomic commits, log
//! order and paging, retention, waves, DHCP leases, tokens). Must not:
//! reach into a back end's connection; what only one back end can show
//! (file modes) stays in its own tests.

use rackcast_core::model::Step;
use rackcast_core::workflow::{self, Device, Event, LogRow, Millis, WorkflowConfig};

use super::{known_version, Store, WaveState};

fn row(at: Millis, kind: &str, detail: &str) -> LogRow {
    LogRow {
        at,
        step: Step::Discovered,
        kind: kind.into(),
        from_state: String::new(),
        to_state: String::new(),
        duration_ms: None,
        detail: detail.into(),
    }
}

/// Run the suite on an empty store. `open` gives a new handle to the same
/// store each call; `break_events` drops its events table (to make the
/// next commit fail half-way), and is called last.
pub(super) fn suite(open: &dyn Fn() -> Box<dyn Store>, break_events: &dyn Fn()) {
    let mut s = open();
    assert_eq!(s.schema_version().unwrap(), known_version());
    tokens(s.as_mut());
    commits_reload(s.as_mut(), open);
    leases_and_waves(s.as_mut());
    paging_and_retention(s.as_mut());
    leases(open);
    // A second opener (the appliance and the CLI at once) migrates
    // nothing twice.
    assert_eq!(open().schema_version().unwrap(), known_version());
    drop(s);
    failed_commit_rolls_back(open, break_events);
}

fn tokens(s: &mut dyn Store) {
    // Found by their hash, names unique, revoked for good.
    s.put_token("ops", "admin", "h1").unwrap();
    assert!(s.put_token("ops", "viewer", "h2").is_err());
    // The store stays usable after a refused statement.
    s.put_token("view", "viewer", "h3").unwrap();
    assert_eq!(s.token_role("h1").unwrap().as_deref(), Some("admin"));
    assert_eq!(s.token_role("h2").unwrap(), None);
    let names: Vec<String> = s.tokens().unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["ops", "view"]);
    assert!(s.revoke_token("ops").unwrap());
    assert_eq!(s.token_role("h1").unwrap(), None);
    assert!(!s.revoke_token("ops").unwrap());
}

fn commits_reload(s: &mut dyn Store, open: &dyn Fn() -> Box<dyn Store>) {
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
    let mut inv = rackcast_core::model::Inventory::default();
    inv.dmi.vendor = "QEMU".into();
    inv.dmi.serial = "S-1".into();
    inv.cpu.arch = "x86_64".into();
    inv.memory_bytes = 8 << 30;
    s.commit(&d, &rows, Some(&inv)).unwrap();
    // Another handle (a restart, the CLI) sees the record and the log.
    let mut s2 = open();
    let devs = s2.load_devices().unwrap();
    // Connection state is not stored: agents reconnect after a restart.
    let mut want = d.clone();
    want.connected = false;
    assert_eq!(devs, vec![want]);
    assert_eq!(s2.inventory("d-1").unwrap(), Some(inv));
    assert_eq!(s2.inventory("d-none").unwrap(), None);
    let ev = s2.events("d-1").unwrap();
    assert_eq!(
        ev.iter().map(|e| &e.row).collect::<Vec<_>>(),
        rows.iter().collect::<Vec<_>>()
    );
    assert!(ev.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(s2.event_count().unwrap(), rows.len() as u64);
    // An update replaces the record; rows append.
    d.reached = Step::Inventoried;
    d.updated = 2000;
    s.commit(&d, &[row(2000, "ok", "more")], None).unwrap();
    assert_eq!(s2.load_devices().unwrap()[0].reached, Step::Inventoried);
    assert_eq!(s2.events("d-1").unwrap().len(), rows.len() + 1);
}

fn leases_and_waves(s: &mut dyn Store) {
    let lease = rackcast_core::boot::dhcp::Lease {
        mac: [2, 0, 0, 0, 0, 9],
        ip: "198.18.0.100".parse().unwrap(),
        state: rackcast_core::boot::dhcp::LeaseState::Bound,
        expires: 99,
    };
    s.save_lease(&lease).unwrap();
    let mut moved = lease.clone();
    moved.expires = 199;
    s.save_lease(&moved).unwrap();
    assert_eq!(s.leases().unwrap(), vec![moved]);
    s.forget_lease(&lease.mac).unwrap();
    assert!(s.leases().unwrap().is_empty());

    let w1 = s
        .create_wave("img", "239.255.10.1:9000", "app-a", 5)
        .unwrap();
    let w2 = s
        .create_wave("img", "239.255.10.2:9000", "app-a", 6)
        .unwrap();
    assert!(w2 > w1);
    let mut rec = s.waves().unwrap()[0].clone();
    assert_eq!((rec.id, rec.state), (w1, WaveState::Running));
    rec.state = WaveState::Finished;
    rec.ended_at = Some(7);
    rec.members = 4;
    rec.verified = 3;
    rec.failed = 1;
    rec.detail = "1 failed".into();
    s.update_wave(&rec).unwrap();
    assert_eq!(s.waves().unwrap()[0], rec);
    // To app-b, app-a's sender is gone (app-a holds no live lease): its
    // wave still running is aborted, the finished one stays.
    assert_eq!(
        s.abort_waves("app-b", false, "restart", 8).unwrap(),
        vec![w2]
    );
    let waves = s.waves().unwrap();
    assert_eq!(waves[1].state, WaveState::Aborted);
    assert_eq!(waves[1].detail, "restart");
    assert_eq!(waves[0].state, WaveState::Finished);

    let img = super::ImageRecord {
        name: "deb12".into(),
        path: "/var/lib/rackcast/images/x.img".into(),
        size: 5 << 30,
        hash: "ab".repeat(32),
        block_size: 1 << 20,
        added_at: 9,
    };
    s.put_image(&img).unwrap();
    let mut newer = img.clone();
    newer.hash = "cd".repeat(32);
    s.put_image(&newer).unwrap();
    assert_eq!(s.images().unwrap(), vec![newer]);
}

fn paging_and_retention(s: &mut dyn Store) {
    let a = Device::new("d-a", "ma", 1);
    let b = Device::new("d-b", "mb", 1);
    let rows: Vec<LogRow> = (0..5)
        .map(|i| row(100 + i, "info", &format!("a{i}")))
        .collect();
    s.commit(&a, &rows, None).unwrap();
    s.commit(&b, &[row(100, "info", "b0")], None).unwrap();
    s.commit(&a, &[row(500, "info", "a5")], None).unwrap();
    // Pages of two, each after the last id of the one before; the other
    // device's row never shows.
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
    // Retention: rows before 103 go, in every device's log (d-1's rows
    // from commits_reload are at 1000 and later and stay).
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

/// One appliance drives a device at a time: a commit takes the device's
/// lease, another holder's live lease refuses it (nothing written), a
/// released or lapsed lease is taken over.
fn leases(open: &dyn Fn() -> Box<dyn Store>) {
    let (mut a, mut b) = (open(), open());
    a.set_lease_holder("app-a", 60_000);
    b.set_lease_holder("app-b", 60_000);
    let d = Device::new("d-l", "ml", 1);
    a.commit(&d, &[row(1, "info", "by a")], None).unwrap();
    let before = b.events("d-l").unwrap().len();
    match b.commit(&d, &[row(2, "info", "by b")], None) {
        Err(super::StoreError::Leased { device, holder }) => {
            assert_eq!((device.as_str(), holder.as_str()), ("d-l", "app-a"));
        }
        other => panic!("b wrote a device a drives: {other:?}"),
    }
    assert_eq!(
        b.events("d-l").unwrap().len(),
        before,
        "a refused commit wrote"
    );
    assert_eq!(
        b.leased_by_others("app-b").unwrap(),
        vec![("d-l".to_string(), "app-a".to_string())]
    );
    assert!(a.leased_by_others("app-a").unwrap().is_empty());
    assert_eq!(a.renew_leases("app-a", 60_000).unwrap(), ["d-l"]);
    // A's running wave stands while its leases live.
    let w = a.create_wave("img", "g", "app-a", 10).unwrap();
    assert!(b.abort_waves("app-b", true, "gone", 11).unwrap().is_empty());
    // A stops cleanly: B takes over at once; A is then refused.
    assert_eq!(a.release_leases("app-a").unwrap(), 1);
    assert_eq!(b.abort_waves("app-b", false, "gone", 12).unwrap(), [w]);
    b.commit(&d, &[row(3, "info", "by b")], None).unwrap();
    assert!(matches!(
        a.commit(&d, &[], None),
        Err(super::StoreError::Leased { .. })
    ));
    assert!(a.renew_leases("app-a", 60_000).unwrap().is_empty());
    // A lease that lapsed (its appliance died) is taken over.
    let mut c = open();
    c.set_lease_holder("app-c", -1_000);
    let e = Device::new("d-e", "me", 1);
    c.commit(&e, &[row(4, "info", "by c")], None).unwrap();
    b.commit(&e, &[row(5, "info", "by b")], None).unwrap();
    let log: Vec<String> = b
        .events("d-e")
        .unwrap()
        .into_iter()
        .map(|x| x.row.detail)
        .collect();
    assert_eq!(log, ["by c", "by b"]);
    assert_eq!(
        b.load_device("d-e").unwrap().map(|x| x.id),
        Some("d-e".into())
    );
    assert_eq!(b.load_device("d-none").unwrap(), None);
}

fn failed_commit_rolls_back(open: &dyn Fn() -> Box<dyn Store>, break_events: &dyn Fn()) {
    let mut s = open();
    let d = Device::new("d-x", "mx", 1);
    s.commit(&d, &[], None).unwrap();
    break_events();
    // The device update is the transaction's first statement, the log
    // row its second: the failure of the second must undo the first.
    let mut d2 = d.clone();
    d2.reached = Step::Inventoried;
    assert!(s.commit(&d2, &[row(2, "ok", "")], None).is_err());
    let mut s2 = open();
    let back = s2
        .load_devices()
        .unwrap()
        .into_iter()
        .find(|x| x.id == "d-x")
        .unwrap();
    assert_eq!(back.reached, Step::Discovered);
}
