//! The pool's command-line edge: `evald run` through the pool, and the test-only
//! `evald worker-selfcheck`. (anyhow here only: these are called straight from `cli`.)

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};

use super::{PoolPredictor, Totals};
use crate::config::{PoolSettings, SandboxPolicy, Settings, TaskSettings};
use crate::evaluation::Evaluation;
use crate::pipeline::Progress;
use crate::submission::{self, Prepared};

/// Evaluate a prepared submission with a worker pool built from `settings.pool`
/// (`device` replaces `pool.devices` when given). Logs forward time against wall time.
///
/// # Errors
/// The pool cannot start (model not loadable, sandbox required but unavailable, ...) or the
/// test set cannot be listed.
pub fn evaluate_with_pool(
    settings: &Settings,
    sub: &Prepared,
    task: &TaskSettings,
    device: Option<&str>,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<Evaluation> {
    let mut pool_settings = settings.pool.clone();
    if let Some(d) = device {
        pool_settings.devices = vec![d.to_string()];
    }
    let scratch = tempfile::Builder::new()
        .prefix("evald-pool-")
        .tempdir()
        .context("creating the workers' scratch folder")?;
    // Workers load this copy, never the file a vendor may still be replacing.
    let model = sub.snapshot(&scratch.path().join("models"))?;
    let t0 = Instant::now();
    let pool = PoolPredictor::for_submission(&pool_settings, sub, &model, task, scratch.path())
        .with_context(|| format!("starting the worker pool for {}", sub.model_path.display()))?;
    let started = t0.elapsed().as_secs_f64();
    let eval = submission::evaluate(
        sub,
        task,
        &pool,
        pool.devices(),
        Some(settings.digest()),
        on_progress,
        &AtomicBool::new(false),
    )?;
    log_totals(
        &pool.totals(),
        pool_settings.workers,
        started,
        t0.elapsed().as_secs_f64(),
    );
    drop(pool);
    Ok(eval)
}

/// One log line: forward seconds (summed and per worker) against the evaluation's wall time.
pub fn log_totals(t: &Totals, workers: usize, startup_secs: f64, wall_secs: f64) {
    let floor = t.forward_secs / workers.max(1) as f64;
    tracing::info!(
        cases = t.done,
        failed = t.failed,
        retries = t.retries,
        worker_losses = t.worker_losses,
        timeouts = t.timeouts,
        forward_sum = format!("{:.2}", t.forward_secs),
        forward_per_worker = format!("{floor:.2}"),
        decode_sum = format!("{:.2}", t.decode_secs),
        predict_sum = format!("{:.2}", t.predict_secs),
        startup = format!("{startup_secs:.2}"),
        wall = format!("{wall_secs:.2}"),
        wall_over_forward = format!(
            "{:.2}",
            if floor > 0.0 {
                wall_secs / floor
            } else {
                f64::NAN
            }
        ),
        "pool: model forward time vs wall time"
    );
}

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
