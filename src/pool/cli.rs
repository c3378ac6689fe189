//! The pool's command-line edge: the test-only `evald worker-selfcheck`. (anyhow here
//! only: it is called straight from `cli`.)

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::{PoolSettings, SandboxPolicy};

/// `evald worker-selfcheck`: print the probe report as JSON; fail when not confined.
///
/// # Errors
/// The worker cannot start, or it is not confined.
pub fn selfcheck_cli(images: &Path, labels: &Path, sandbox: &str) -> Result<()> {
    let policy = match sandbox {
        "required" => SandboxPolicy::Required,
        "best-effort" => SandboxPolicy::BestEffort,
        "off" => SandboxPolicy::Off,
        other => anyhow::bail!("--sandbox {other}: use required, best-effort or off"),
    };
    let settings = PoolSettings {
        workers: 1,
        devices: vec!["cpu".into()],
        case_timeout: std::time::Duration::from_secs(30),
        max_attempts: 1,
        max_consecutive_timeouts: 0,
        submission_budget: None,
        threads_per_worker: 1,
        memory_max_bytes: 0,
        sandbox: policy,
    };
    let scratch = tempfile::Builder::new()
        .prefix("evald-selfcheck-")
        .tempdir()
        .context("creating a scratch folder")?;
    let r = super::selfcheck(&settings, images, labels, scratch.path())?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    if !r.confined {
        anyhow::bail!("the worker is NOT confined: {}", r.problems.join("; "));
    }
    Ok(())
}
