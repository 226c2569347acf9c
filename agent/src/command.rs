//! One run of a Debian tool a step calls (mdadm, sfdisk, mtools): stdin
//! given or closed, both outputs captured, bounded in time, the child
//! killed if the step gives up on it.
//!
//! Owns: spawning, feeding and timing the child. Must not: decide what a
//! result means or write log rows (each step words its own op rows).

use std::time::{Duration, Instant};

/// How a run ended.
pub struct Ran {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub ms: u64,
}

/// Run `prog args` with `env` added and `input` on its stdin, within
/// `timeout`. A child still running at the deadline is killed and the
/// error's kind is `TimedOut`; one that cannot start keeps the spawn
/// error (`NotFound`: not installed).
pub async fn run(
    prog: &str,
    args: &[&str],
    env: &[(&str, &str)],
    input: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Ran> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let t = Instant::now();
    let mut c = tokio::process::Command::new(prog);
    c.args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let go = async {
        let mut child = c.spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(timeout, go).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("timed out after {timeout:?}"),
        )
    })??;
    Ok(Ran {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ms: t.elapsed().as_millis() as u64,
    })
}
