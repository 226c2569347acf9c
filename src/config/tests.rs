//! Config parsing and validation tests.

pub(crate) mod parse_tests {
    use crate::config::*;

    pub const MINIMAL: &str = r#"
[appliance]
control_listen = "198.18.0.1:7100"
state_dir = "/tmp/rc"

[dataplane]
bind = "198.18.0.1"
total_rate = "500M"
group_base = "239.255.10.1"

[agents]
x86_64 = "/usr/bin/rackcast-agent"

[[profiles]]
name = "any"
image = "img"
target = { order = "largest", count = 1 }
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.dataplane.total_rate, 500_000_000);
        assert_eq!(c.waves.start_after, Duration::from_secs(30));
        assert_eq!(c.waves.hello_timeout, Duration::from_secs(10));
        assert_eq!(c.dataplane.feedback, Duration::from_millis(20));
        assert_eq!(c.dataplane.gso_segments, 16);
        assert_eq!(c.dataplane.zstd_level, 6);
        assert_eq!(c.workflow.max_attempts, 3);
        assert_eq!(
            c.store_location(),
            crate::store::StoreLocation::Sqlite(PathBuf::from("/tmp/rc/rackcast.db"))
        );
        assert_eq!(c.profiles[0].vendor, "*");
    }

    #[test]
    fn a_postgres_store_takes_its_password_and_ca_from_files_and_never_shows_them() {
        let c = parse(&MINIMAL.replace(
            "state_dir",
            "store = \"postgres://rackcast@198.18.0.5:5433/fleet?sslmode=require\"\n\
             store_password_file = \"/etc/rackcast/pg.pw\"\n\
             store_ca = \"/etc/rackcast/pg-ca.pem\"\nstate_dir",
        ))
        .unwrap();
        let crate::store::StoreLocation::Postgres(t) = c.store_location() else {
            panic!("not a PostgreSQL store");
        };
        assert_eq!(t.password_file, Some(PathBuf::from("/etc/rackcast/pg.pw")));
        assert_eq!(t.ca_file, Some(PathBuf::from("/etc/rackcast/pg-ca.pem")));
        assert_eq!(t.redacted(), "postgres://198.18.0.5:5433/fleet");
        // Even a URL that slipped a password past validation is shown
        // without it.
        let loc = crate::store::StoreLocation::parse("postgresql://u:secret@h/db?x=1");
        assert_eq!(loc.to_string(), "postgres://h/db");
        assert!(!format!("{loc:?}").contains("secret"));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            (MINIMAL.replace("500M", "fast"), "total_rate"),
            (MINIMAL.replace("239.255.10.1", "198.18.0.9"), "group_base"),
            (
                MINIMAL.replace("group_base", "feedback = \"2s\"\ngroup_base"),
                "dataplane.feedback",
            ),
            (
                MINIMAL.replace("group_base", "gso_segments = 0\ngroup_base"),
                "dataplane.gso_segments",
            ),
            (
                MINIMAL.replace("[agents]", "[waves]\nhello_timeout = \"100ms\"\n[agents]"),
                "waves.hello_timeout",
            ),
            (
                MINIMAL.replace("[agents]", "[waves]\nstart_after = \"soon\"\n[agents]"),
                "start_after",
            ),
            (
                MINIMAL.replace("[agents]", "[waves]\nmin_member = 2\n[agents]"),
                "min_member",
            ),
            (
                MINIMAL.replace("target = { order = \"largest\", count = 1 }", ""),
                "profiles[0]",
            ),
            (
                MINIMAL.replace(
                    "target = { order = \"largest\", count = 1 }",
                    "[profiles.raid]\nlevel = \"raid1\"\narray = \"/dev/md/x\"\ndisks = { count = 1 }",
                ),
                "raid1 needs at least 2",
            ),
            (MINIMAL.replace("control_listen = \"198.18.0.1:7100\"", ""), "control_listen"),
            (
                format!("{MINIMAL}\n[boot.dhcp]\nmode = \"full\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n"),
                "boot.dhcp.pool_start",
            ),
            (
                format!("{MINIMAL}\n[boot.dhcp]\nmode = \"relay\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n"),
                "expected \"full\" or \"proxy\"",
            ),
            (
                format!("{MINIMAL}\n[boot.dhcp]\nmode = \"full\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\npool_start = \"198.18.1.10\"\npool_end = \"198.18.1.20\"\nnetmask = \"255.255.255.0\"\n"),
                "not in the subnet",
            ),
            (
                format!("{MINIMAL}bios = {{ attributes = {{ A = \"1\" }} }}\n"),
                "expected a backend",
            ),
            (
                MINIMAL.replace(
                    "target = { order = \"largest\", count = 1 }",
                    "[profiles.raid]\nlevel = \"raid1\"\ndisks = { count = 2 }\nredfish = { url = \"http://198.18.1.1\", username = \"u\", password = \"p\" }",
                ),
                "needs `target`",
            ),
            (
                MINIMAL.replace(
                    "target = { order = \"largest\", count = 1 }",
                    "[profiles.raid]\nlevel = \"raid1\"\ndisks = { count = 2 }\narray = \"/dev/md0\"",
                ),
                "wants /dev/md/NAME",
            ),
            (
                format!("{MINIMAL}bios = {{ attributes = {{ A = \"1\" }}, redfish = {{ url = \"198.18.1.1\", username = \"u\", password = \"p\" }} }}\n"),
                "expected http:// or https://",
            ),
            (
                format!("{MINIMAL}bios = {{ attributes = {{ A = \"1\" }}, redfish = {{ url = \"http://198.18.1.1\", username = \"u\" }} }}\n"),
                "expected one of password and password_file",
            ),
            (
                format!("{MINIMAL}bios = {{ redfish = {{ url = \"http://198.18.1.1\", username = \"u\", password = \"p\" }} }}\n"),
                "needs the attributes wanted",
            ),
            (
                MINIMAL.replace(
                    "state_dir",
                    "store = \"postgres://rackcast:hunter2@198.18.0.5/fleet\"\nstate_dir",
                ),
                "holds a password",
            ),
            (
                MINIMAL.replace(
                    "state_dir",
                    "store = \"postgres://rackcast@198.18.0.5/fleet?sslmode=require\"\nstate_dir",
                ),
                "appliance.store_ca",
            ),
            (
                MINIMAL.replace(
                    "state_dir",
                    "store = \"postgres://rackcast@198.18.0.5/fleet?sslmode=sometimes\"\nstate_dir",
                ),
                "not a PostgreSQL URL",
            ),
            (
                MINIMAL.replace("state_dir", "store_ca = \"/etc/ca.pem\"\nstate_dir"),
                "only for a postgres:// store",
            ),
            (
                MINIMAL.replace("state_dir", "id = \"app a\"\nstate_dir"),
                "appliance.id",
            ),
            (
                MINIMAL.replace("state_dir", "lease_ttl = \"1s\"\nstate_dir"),
                "appliance.lease_ttl",
            ),
            (
                MINIMAL.replace("state_dir", "standby = true\nstate_dir"),
                "shares its fleet record",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).expect_err(want).to_string();
            // A refused store URL never repeats its password.
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.starts_with("test.toml"), "{e}");
        }
    }
}

mod example_tests {
    use crate::config::*;

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(
            include_str!("../../rackcast.example.toml"),
            Path::new("rackcast.example.toml"),
        )
        .unwrap();
        assert_eq!(c.profiles.len(), 2);
        assert_eq!(c.profiles[0].raid.as_ref().unwrap().level, "raid1");
        assert_eq!(c.devices[0].image.as_deref(), Some("rocky9"));
        assert_eq!(c.modules[0].pci_ids.len(), 2);
    }
}
