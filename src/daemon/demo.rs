//! `evald demo`'s daemon half: start the service in this process on the generated
//! configuration, deliver a vendor submission the way vendors are told to (copy into a
//! hidden folder next to its destination, then rename into place), wait until it is
//! evaluated and stop the service cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::evaluation::Evaluation;
use crate::store::State;

use super::{DaemonEvent, Options};

/// What the demo produced.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The evaluation.
    pub evaluation: Arc<Evaluation>,
    /// `summary.json`.
    pub summary: PathBuf,
    /// `report.xlsx`.
    pub report: PathBuf,
    /// The email's `.eml` file (file transport), once the outbox delivered it.
    pub email: Option<PathBuf>,
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Run the service on `settings`, deliver `staging` to `dest` (a submission folder under
/// the drop folder) and wait up to `deadline` for its report.
///
/// # Errors
/// The service failed to start, the submission was rejected or failed, or the deadline
/// passed.
pub fn run_demo(
    settings: Settings,
    staging: &Path,
    dest: &Path,
    deadline: Duration,
) -> Result<DemoOutcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let shutdown = CancellationToken::new();
    let (events, mut rx) = broadcast::channel(64);
    let outcome = rt.block_on(async {
        let daemon = tokio::spawn(super::run(
            settings,
            Options::default(),
            shutdown.clone(),
            events,
        ));
        let waited = tokio::time::timeout(deadline, async {
            let mut delivered = false;
            // The email goes out from the outbox loop, before or after the runner says
            // the evaluation finished: wait for both.
            let mut finished: Option<super::Finished> = None;
            let mut mailed: std::collections::HashMap<i64, Option<PathBuf>> =
                std::collections::HashMap::new();
            loop {
                if let Some(f) = &finished {
                    if f.state != State::Reported {
                        return Ok((finished.take().expect("checked"), None));
                    }
                    if let Some(email) = mailed.remove(&f.id) {
                        return Ok((finished.take().expect("checked"), email));
                    }
                }
                match rx.recv().await {
                    Ok(DaemonEvent::Ready) if !delivered => {
                        delivered = true;
                        let (from, to) = (staging.to_path_buf(), dest.to_path_buf());
                        tokio::task::spawn_blocking(move || deliver(&from, &to))
                            .await
                            .context("delivering the submission")??;
                        println!("submission delivered: {}", dest.display());
                    }
                    Ok(DaemonEvent::Finished(f)) if f.dir == dest => finished = Some(f),
                    Ok(DaemonEvent::Mailed { id, email }) => {
                        mailed.insert(id, email);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        bail!("the service stopped before the submission was evaluated")
                    }
                }
            }
        })
        .await;
        shutdown.cancel();
        let stopped = daemon.await.context("the service task failed")?;
        stopped?;
        match waited {
            Ok(r) => r,
            Err(_) => bail!(
                "no result for {} within {} s",
                dest.display(),
                deadline.as_secs()
            ),
        }
    })?;
    let (outcome, email) = outcome;
    match (
        outcome.state,
        outcome.evaluation,
        outcome.summary,
        outcome.report,
    ) {
        (State::Reported | State::Mailed, Some(evaluation), Some(summary), Some(report)) => {
            Ok(DemoOutcome {
                evaluation,
                summary,
                report,
                email,
            })
        }
        (state, ..) => bail!(
            "the demo submission was {state}: {}",
            outcome.error.unwrap_or_default()
        ),
    }
}

/// Copy into a hidden sibling folder (ignored by the watcher), then rename into place:
/// the protocol vendors are asked to follow.
fn deliver(staging: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().context("destination has no parent")?;
    let name = dest
        .file_name()
        .context("destination has no name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.uploading"));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    copy_dir(staging, &tmp).with_context(|| format!("copying into {}", tmp.display()))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}
