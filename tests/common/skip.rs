//! How a test that cannot run here says so. Self-contained (std only) so
//! unit tests in `src/` include it too.

/// A test that cannot run here says why and returns. The skip is
/// recorded in the file `RACKCAST_SKIP_LOG` names (netlab/run-tests.sh
/// counts them in its closing line), and under `CI=true` a skip fails: CI
/// installs everything the tests need.
pub fn skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} would be skipped in CI: {why}"
    );
    eprintln!("skipping {test}: {why}");
    if let Some(path) = std::env::var_os("RACKCAST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
