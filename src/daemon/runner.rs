//! The evaluation queue: take the oldest `queued` submission, evaluate it on its own
//! thread, write its outputs, record the outcome with its results, queue the team's email
//! (the outbox loop delivers it); one at a time (the GPU pool is shared).
//!
//! Shutdown: the cancel flag makes the pipeline stop taking new cases; cases in flight
//! finish within `daemon.shutdown_grace_secs`. An evaluation that did not complete goes
//! back to `queued` (it runs again from the start at the next start); a thread that
//! outlives the grace period is abandoned and the process exits without waiting for it.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::Settings;
use crate::evaluation::{Evaluation, Stage};
use crate::mail;
use crate::pipeline::Progress;
use crate::store::{
    EvaluationResults, ReportedOutcome, State, Store, StoreError, StoreHandle, Submission,
};
use crate::submission;

use super::ingest::{self, RejectCode, Rejection};
use super::{sd, DaemonEvent, Finished, Shared};

/// How often an idle runner looks at the queue even without a wake-up (another process,
/// `evald requeue`, may have queued something).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// How an evaluation ended.
enum Outcome {
    /// Outputs written.
    Reported {
        eval: Arc<Evaluation>,
        summary: PathBuf,
        report: PathBuf,
    },
    /// Stopped by shutdown before every case ran.
    Cancelled { done: usize, total: usize },
    /// The vendor's problem (REJECTED.txt).
    Rejected(Rejection),
    /// Not the vendor's problem, or nothing more to do (error column).
    Failed(String),
    /// The vendor is replacing the model: this content is not evaluated; the new one is
    /// a new submission with its own outcome (nothing to tell anyone about this one).
    Superseded(String),
    /// evald's own side failed (disk, state folder, device, worker start-up): queued
    /// again after a backoff; failed only after `pool.max_attempts`.
    Retry(String),
}

/// Longest wait between retries of evald's own failures.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

/// Where evaluations keep the snapshot of the model they run (one folder each, removed
/// when the evaluation ends; whatever is left there at start is from a crash).
pub(crate) fn snapshot_dir(settings: &Settings) -> PathBuf {
    settings.daemon.state_dir.join("snapshots")
}

/// Why a finished evaluation could not be handed to mail (the submission stays
/// `reported` and is handed again at the next start).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    /// The outbox could not be opened or could not record the message.
    #[error("queueing the email: {0}")]
    Outbox(#[from] mail::OutboxError),
    /// The message could not be composed.
    #[error("composing the email: {0}")]
    Compose(#[from] mail::ComposeError),
    /// The store could not say what the previous submission was.
    #[error("reading the previous submission: {0}")]
    Store(#[from] StoreError),
}

/// What handing a reported submission to mail did.
#[derive(Debug)]
pub(crate) enum MailStep {
    /// The task has no recipients: nothing to send, the submission is done.
    NoRecipients,
    /// In the outbox (row id); the outbox loop delivers it and marks the submission mailed.
    Queued(i64),
    /// Already delivered (a stop came between delivery and marking it): where it went.
    Sent(String),
    /// Not in the outbox, and the evaluation is no longer in memory to compose it (a stop
    /// between `reported` and queueing): the team reads the report in the folder.
    Lost,
}

/// The outbox key of a submission's report email: one per requested evaluation, so a
/// re-run after a crash never mails twice, and an `evald requeue` (a new `queue_seq`)
/// mails again.
fn mail_key(sub: &Submission) -> String {
    format!("submission-{}-{}", sub.id, sub.queue_seq.unwrap_or(0))
}

/// The submission and evaluation a report email's key names (see [`mail_key`]).
pub(crate) fn parse_mail_key(key: &str) -> Option<(i64, i64)> {
    let (id, seq) = key.strip_prefix("submission-")?.split_once('-')?;
    Some((id.parse().ok()?, seq.parse().ok()?))
}

/// The single place a finished evaluation is handed to the team's email: compose it (with
/// the change against the vendor's previous reported submission, from the store), record
/// it in the durable outbox under [`mail_key`] and wake the outbox loop, which delivers it
/// (nothing is sent from here). Blocking: call it on a blocking thread.
///
/// After a restart the evaluation is no longer in memory (`eval` is `None`): a message
/// already queued is left to the loop (or, if it went, reported as sent).
///
/// # Errors
/// [`NotifyError`]; the submission stays `reported` and is handed again at the next start.
pub(crate) fn notify_team(
    settings: &Settings,
    store: &StoreHandle,
    wake: &Notify,
    sub: &Submission,
    eval: Option<&Evaluation>,
) -> Result<MailStep, NotifyError> {
    let key = mail_key(sub);
    let outbox = mail::Outbox::open(&mail::db_path(settings))?;
    if let Some(e) = outbox.entry_by_key(&key)? {
        return Ok(match e.state {
            mail::State::Sent => MailStep::Sent(e.delivered_to.unwrap_or_default()),
            _ => {
                wake.notify_one();
                MailStep::Queued(e.id)
            }
        });
    }
    let Some(eval) = eval else {
        return Ok(MailStep::Lost);
    };
    let recipients = recipients_of(settings, &sub.task);
    if recipients.is_empty() {
        tracing::info!(id = sub.id, task = %sub.task, "task has no recipients: no email");
        return Ok(MailStep::NoRecipients);
    }
    let id = sub.id;
    let previous = store
        .call_blocking(move |s| s.previous_results(id))?
        .map(|(p, r)| mail::Previous::from_results(&p.name, &r.results));
    let report = sub.path.join(crate::layout::REPORT_XLSX);
    let composed = mail::compose(
        eval,
        &recipients,
        previous.as_ref(),
        report.is_file().then_some(report.as_path()),
        &settings.mail,
    )?;
    let row = outbox.enqueue(&composed.message, &composed.label, Some(&key))?;
    wake.notify_one();
    Ok(MailStep::Queued(row))
}

/// The outbox loop delivered the message queued under `key`: if it is the report email of
/// a submission's current evaluation, the submission becomes `mailed` (runs on the store
/// thread). Messages of an older evaluation (requeued since) or of no submission are only
/// logged by the loop.
///
/// # Errors
/// SQLite errors.
pub(crate) fn delivered(
    s: &mut Store,
    key: &str,
    to: &str,
    events: &tokio::sync::broadcast::Sender<DaemonEvent>,
) -> Result<(), StoreError> {
    let Some((id, seq)) = parse_mail_key(key) else {
        return Ok(());
    };
    let sub = match s.get(id) {
        Ok(sub) => sub,
        Err(StoreError::NoSuchSubmission(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    if sub.state != State::Reported || sub.queue_seq.unwrap_or(0) != seq {
        tracing::debug!(id, state = %sub.state, "email of an earlier evaluation delivered");
        return Ok(());
    }
    s.mailed(id, to)?;
    let p = PathBuf::from(to);
    let _ = events.send(DaemonEvent::Mailed {
        id,
        email: p.is_file().then_some(p),
    });
    Ok(())
}

/// Evaluate one running submission (blocking; on the evaluation thread).
fn evaluate(
    sub: &Submission,
    settings: &Settings,
    shared: &Shared,
    cancel: &AtomicBool,
) -> Outcome {
    let Some(task) = settings.tasks.get(&sub.task) else {
        return Outcome::Rejected(Rejection::new(
            RejectCode::UnknownTask,
            format!("'{}' is no longer a task evaluated here", sub.task),
            format!(
                "Put the submission under one of: {}.",
                settings.task_names(", ")
            ),
        ));
    };
    // A DICOM test set: decoded once into its NIfTI view (cache hits after the first).
    let ready = match crate::testset::materialise(task, &settings.daemon.state_dir) {
        Ok(r) => r,
        // The team's mapping is incomplete: not the vendor's problem, not transient.
        Err(e @ crate::testset::TestSetError::Unmapped { .. }) => {
            return Outcome::Failed(e.to_string())
        }
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let task = &ready.task;
    // The folder may have changed since it was queued: validate again.
    let prepared = match submission::prepare(&sub.path, task) {
        Ok(p) => p,
        Err(e) => {
            return match Rejection::from_submission_error(&e) {
                Some(r) => Outcome::Rejected(r),
                None => Outcome::Failed(e.to_string()),
            }
        }
    };
    if sub.model_sha256.as_deref() != Some(prepared.model_sha256.as_str()) {
        return Outcome::Superseded(
            "the model file changed after it was queued; the new content is evaluated as a new \
             submission once the copy is complete"
                .into(),
        );
    }
    // The bytes recorded at queue time, copied where no vendor can change them.
    let model = match prepared.snapshot(&snapshot_dir(settings)) {
        Ok(m) => m,
        Err(e @ submission::SubmissionError::Snapshot { .. }) => {
            return Outcome::Retry(e.to_string())
        }
        Err(e @ submission::SubmissionError::Changed { .. }) => {
            return Outcome::Superseded(e.to_string())
        }
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let job = prepared.job(&model, task, &settings.daemon.state_dir.join("scratch"));
    let backend = match crate::backend::start(settings, &job) {
        Ok(b) => b,
        // The worker could not load the model (not the device, not the sandbox): the
        // vendor's file is at fault.
        Err(e) if e.is_model_problem() => {
            return Outcome::Rejected(Rejection::new(
                RejectCode::NotLoadable,
                e.to_string(),
                job.format.reload_fix(),
            ))
        }
        // The device, the sandbox, the scratch folder: the admin's to fix, then it runs.
        Err(e) => return Outcome::Retry(format!("cannot start inference: {e}")),
    };
    let total = AtomicUsize::new(0);
    let decile = AtomicUsize::new(0);
    let started = Instant::now();
    let (store, id, systemd) = (shared.store.clone(), sub.id, shared.systemd);
    let label = format!("#{} {}/{}/{}", sub.id, sub.task, sub.vendor, sub.name);
    let on_progress = |p: Progress| {
        let done = match &p {
            Progress::Start { total: t } => {
                total.store(*t, Ordering::SeqCst);
                0
            }
            Progress::Scored { case, dice, done } => {
                tracing::debug!(id, case, dice = format!("{dice:.4}"), done, "case scored");
                *done
            }
            Progress::Failed { failure, done } => {
                tracing::warn!(
                    id,
                    case = failure.case,
                    stage = failure.stage.as_str(),
                    reason = failure.reason,
                    "case failed"
                );
                *done
            }
        };
        let t = total.load(Ordering::SeqCst);
        store.send(move |s| s.progress(id, done as u64, t as u64));
        let d = (done * 10).checked_div(t).unwrap_or(10);
        if d > decile.swap(d, Ordering::SeqCst) {
            tracing::info!(
                id,
                done,
                total = t,
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                "evaluation progress"
            );
            sd(
                systemd,
                &[sd_notify::NotifyState::Status(&format!(
                    "evaluating {label}: {done}/{t} cases"
                ))],
            );
        }
    };
    let eval = match submission::evaluate(
        &prepared,
        task,
        backend.as_ref(),
        &submission::RunContext::of(settings).with_task_predictions(settings, task, &prepared),
        &on_progress,
        cancel,
    ) {
        Ok(e) => e,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    if cancel.load(Ordering::SeqCst) && eval.failures.iter().any(|f| f.stage == Stage::Cancelled) {
        return Outcome::Cancelled {
            done: eval.total_cases()
                - eval
                    .failures
                    .iter()
                    .filter(|f| f.stage == Stage::Cancelled)
                    .count(),
            total: eval.total_cases(),
        };
    }
    // A vendor who deleted the folder withdrew the submission: writing the outputs would
    // bring the folder back (and mail about it).
    if !sub.path.is_dir() {
        return Outcome::Superseded(
            "the submission folder was deleted during its evaluation; no outputs written".into(),
        );
    }
    // The results are computed: a full disk or a failing share must not throw them away.
    // Retry the writing here, with the evaluation kept in memory.
    // The paired comparison with the vendor's previous submission, before any output is
    // written, so that summary.json, the report and the email say the same.
    let mut eval = eval;
    let id = sub.id;
    match shared.store.call_blocking(move |s| s.previous_results(id)) {
        Ok(Some((p, r))) => {
            let this = crate::evaluation::compare::Side::of(&eval, sub.name.clone());
            eval.comparison = Some(match r.results.side(p.name.clone()) {
                Some(before) => crate::evaluation::compare::compare(&before, &this),
                None => crate::evaluation::compare::Against::Unpaired {
                    against: p.name.clone(),
                    reason: format!(
                        "not compared as paired: {} was reported by an evald that kept no \
                         per-case values",
                        p.name
                    ),
                },
            });
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(id, "no comparison with the previous submission: {e}"),
    }
    let mut written = submission::write_outputs(&eval, &prepared.dir);
    let mut wait = settings.daemon.retry_backoff;
    for attempt in 1..=OUTPUT_RETRIES {
        let Err(e) = &written else { break };
        tracing::error!(
            id = sub.id,
            attempt,
            "cannot write the outputs (retrying in {} s; free space or fix the folder): {e}",
            wait.as_secs()
        );
        if !sleep_unless(cancel, wait) {
            break;
        }
        wait = (wait * 2).min(RETRY_BACKOFF_MAX);
        written = submission::write_outputs(&eval, &prepared.dir);
    }
    match written {
        Ok((summary, report)) => {
            // A REJECTED.txt written for a newer submission of this folder (its model was
            // replaced while this one ran) is that submission's outcome: keep it.
            let dir = sub.path.clone();
            match shared.store.call_blocking(move |s| s.latest_for_path(&dir)) {
                Ok(Some(l)) if l.id != sub.id => tracing::info!(
                    id = sub.id,
                    newer = l.id,
                    "a newer submission of this folder exists; its outcome files are kept"
                ),
                _ => ingest::remove_stale_rejection(&prepared.dir),
            }
            Outcome::Reported {
                eval: Arc::new(eval),
                summary,
                report,
            }
        }
        Err(e) => Outcome::Retry(format!("cannot write the outputs: {e}")),
    }
}

/// Times `write_outputs` is tried again before the evaluation counts as a retryable failure.
const OUTPUT_RETRIES: u32 = 3;

/// Sleep `d` unless `cancel` is set meanwhile; whether the whole time passed.
fn sleep_unless(cancel: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    !cancel.load(Ordering::SeqCst)
}

/// Set when an evaluation thread was left running at shutdown.
fn spawn_evaluation(
    sub: Submission,
    settings: Arc<Settings>,
    shared: Shared,
    cancel: Arc<AtomicBool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Outcome>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("evald-eval-{}", sub.id))
        .spawn(move || {
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
                evaluate(&sub, &settings, &shared, &cancel)
            }))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Failed(format!("internal error (a bug in evald): {msg}"))
            });
            let _ = tx.send(out);
        })?;
    Ok(rx)
}

/// The runner task. Returns whether an evaluation thread was abandoned at shutdown.
pub(super) async fn run(shared: Shared) -> bool {
    mail_reported_backlog(&shared).await;
    // Retryable failures in a row: the queue waits before the next evaluation (a full
    // disk or a missing GPU fails every submission alike; retrying at once fixes nothing).
    let mut retries_in_a_row = 0u32;
    loop {
        if shared.cancel.is_cancelled() {
            return false;
        }
        let next = match shared.store.call(|s| s.next_queued()).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("reading the queue: {e}");
                None
            }
        };
        let Some(sub) = next else {
            sd(
                shared.systemd,
                &[sd_notify::NotifyState::Status(
                    "idle: watching the drop folder",
                )],
            );
            tokio::select! {
                _ = shared.cancel.cancelled() => return false,
                _ = shared.work.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        };
        let settings = shared.settings.borrow().clone();
        if sub.attempts >= settings.pool.max_attempts {
            let (id, n) = (sub.id, sub.attempts);
            let note =
                format!(
                "evaluation tried {n} times without finishing (pool.max_attempts = {}); last: {}; \
                 `evald requeue {id}` tries again",
                settings.pool.max_attempts,
                sub.error.as_deref().unwrap_or("evald stopped or crashed during it")
            );
            match shared
                .store
                .call({
                    let note = note.clone();
                    move |s| s.fail(id, &note)
                })
                .await
            {
                Ok(failed) => tell_failed(&shared, &settings, failed, note).await,
                Err(e) => tracing::error!(id, "{e}"),
            }
            continue;
        }
        let id = sub.id;
        let sub = match shared.store.call(move |s| s.start(id)).await {
            Ok(s) => s,
            Err(e) => {
                // Changed by another process (e.g. requeue) in between: look again.
                tracing::warn!(id, "cannot start: {e}");
                continue;
            }
        };
        let (abandoned, retry) = evaluate_one(&shared, sub, Arc::clone(&settings)).await;
        if let Some(abandoned) = abandoned {
            return abandoned;
        }
        if !retry {
            retries_in_a_row = 0;
            continue;
        }
        retries_in_a_row += 1;
        let wait = settings
            .daemon
            .retry_backoff
            .saturating_mul(1 << (retries_in_a_row - 1).min(10))
            .min(RETRY_BACKOFF_MAX);
        tracing::warn!(
            failures_in_a_row = retries_in_a_row,
            "evald's own side failed; the queue waits {} s before the next evaluation",
            wait.as_secs()
        );
        sd(
            shared.systemd,
            &[sd_notify::NotifyState::Status(&format!(
                "waiting {} s after a failure on evald's side (see the log)",
                wait.as_secs()
            ))],
        );
        tokio::select! {
            _ = shared.cancel.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A submission ended `failed`: the vendor reads why in `FAILED.txt` (unless a newer
/// submission of the folder exists, or the folder is gone), the team gets an email.
async fn tell_failed(shared: &Shared, settings: &Arc<Settings>, sub: Submission, reason: String) {
    let (store, settings) = (shared.store.clone(), Arc::clone(settings));
    let wake = Arc::clone(&shared.mail_wake);
    let res = tokio::task::spawn_blocking(move || {
        let id = sub.id;
        let dir = sub.path.clone();
        let newer = store
            .call_blocking(move |s| s.latest_for_path(&dir))
            .ok()
            .flatten()
            .is_some_and(|l| l.id != id);
        if newer {
            tracing::info!(id, "failed, but a newer submission of this folder exists: no FAILED.txt");
        } else if !sub.path.is_dir() {
            tracing::warn!(id, dir = %sub.path.display(), "failed, and the folder is gone: no FAILED.txt");
        } else if let Err(e) = ingest::write_failed(&sub, &reason) {
            tracing::error!(id, dir = %sub.path.display(), "cannot write {}: {e}", crate::layout::FAILED_TXT);
        }
        notify_team_failed(&settings, &wake, &sub, &reason)
    })
    .await;
    match res {
        Ok(Ok(note)) => tracing::info!("team told of the failure: {note}"),
        Ok(Err(e)) => tracing::error!("telling the team of a failure: {e}"),
        Err(e) => tracing::error!("telling the team of a failure: {e}"),
    }
}

/// The team's addresses for `task` (none for a task no longer configured).
fn recipients_of(settings: &Settings, task: &str) -> Vec<String> {
    settings
        .tasks
        .get(task)
        .map(|t| t.recipients.clone())
        .unwrap_or_default()
}

/// Queue the team's email about a failed submission and wake the outbox loop. A note for
/// the log.
fn notify_team_failed(
    settings: &Settings,
    wake: &Notify,
    sub: &Submission,
    reason: &str,
) -> Result<String, NotifyError> {
    let recipients = recipients_of(settings, &sub.task);
    if recipients.is_empty() {
        return Ok("task has no recipients: no email".into());
    }
    let who = format!("{} / {} / {}", sub.task, sub.vendor, sub.name);
    let next = format!(
        "See the evald log for submission #{id}, fix what it names (disk, state folder, \
         device, test set), then `evald requeue {id}`.",
        id = sub.id
    );
    let composed = mail::compose_failure(&who, reason, &next, &recipients, &settings.mail)?;
    let key = format!("failed-{}-{}", sub.id, sub.queue_seq.unwrap_or(0));
    let outbox = mail::Outbox::open(&mail::db_path(settings))?;
    let row = outbox.enqueue(&composed.message, &composed.label, Some(&key))?;
    wake.notify_one();
    Ok(format!("outbox #{row}: queued"))
}

/// Run one evaluation to its end. `Some(abandoned)` when shutdown interrupted it; `true`
/// when it ended in a retryable failure of evald's own side (the queue then backs off).
async fn evaluate_one(
    shared: &Shared,
    sub: Submission,
    settings: Arc<Settings>,
) -> (Option<bool>, bool) {
    let id = sub.id;
    tracing::info!(
        id,
        task = %sub.task,
        vendor = %sub.vendor,
        name = %sub.name,
        attempt = sub.attempts,
        "evaluation started"
    );
    sd(
        shared.systemd,
        &[sd_notify::NotifyState::Status(&format!(
            "evaluating #{} {}/{}/{}",
            sub.id, sub.task, sub.vendor, sub.name
        ))],
    );
    let started = Instant::now();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut rx = match spawn_evaluation(
        sub.clone(),
        Arc::clone(&settings),
        shared.clone(),
        Arc::clone(&cancel),
    ) {
        Ok(rx) => rx,
        Err(e) => {
            let note = format!("cannot start the evaluation thread: {e}");
            let _ = shared.store.call(move |s| s.interrupt(id, &note)).await;
            return (None, true);
        }
    };
    let mut interrupted = false;
    let outcome = tokio::select! {
        o = &mut rx => o.ok(),
        _ = shared.cancel.cancelled() => {
            interrupted = true;
            cancel.store(true, Ordering::SeqCst);
            let grace = settings.daemon.shutdown_grace;
            tracing::info!(id, "letting the cases in flight finish (up to {} s)", grace.as_secs());
            match tokio::time::timeout(grace, &mut rx).await {
                Ok(o) => o.ok(),
                Err(_) => {
                    let note = format!(
                        "interrupted: shutdown grace period ({} s) ran out; queued again",
                        grace.as_secs()
                    );
                    if let Err(e) = shared.store.call(move |s| s.interrupt(id, &note)).await {
                        tracing::error!(id, "{e}");
                    }
                    return (Some(true), false);
                }
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let outcome =
        outcome.unwrap_or_else(|| Outcome::Failed("the evaluation thread vanished".into()));
    let retry = finish(shared, &sub, &settings, outcome, secs).await;
    (interrupted.then_some(false), retry)
}

/// Record how an evaluation ended; `true` for a retryable failure.
async fn finish(
    shared: &Shared,
    sub: &Submission,
    settings: &Arc<Settings>,
    outcome: Outcome,
    secs: f64,
) -> bool {
    let id = sub.id;
    let store = &shared.store;
    let finished = match outcome {
        Outcome::Reported {
            eval,
            summary,
            report,
        } => {
            let o = ReportedOutcome {
                cases_scored: eval.cases.len() as u64,
                cases_failed: eval.failures.len() as u64,
                headline: eval.status_line(),
                summary_path: summary.clone(),
                report_path: report.clone(),
                results: EvaluationResults::of(&eval),
            };
            tracing::info!(
                id,
                task = %sub.task,
                vendor = %sub.vendor,
                seconds = format!("{secs:.1}"),
                report = %report.display(),
                "evaluation finished: {}",
                o.headline
            );
            let reported = match store.call(move |s| s.reported(id, &o)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(id, "{e}");
                    return false;
                }
            };
            let mailed = mail(shared, settings, reported, Some(Arc::clone(&eval))).await;
            Finished {
                id,
                dir: sub.path.clone(),
                state: if mailed {
                    State::Mailed
                } else {
                    State::Reported
                },
                evaluation: Some(eval),
                summary: Some(summary),
                report: Some(report),
                error: None,
            }
        }
        Outcome::Cancelled { done, total } => {
            let note = format!(
                "interrupted by shutdown after {done} of {total} cases; evaluated again from the start"
            );
            if let Err(e) = store.call(move |s| s.interrupt(id, &note)).await {
                tracing::error!(id, "{e}");
            }
            return false;
        }
        Outcome::Superseded(reason) => {
            tracing::info!(id, "not evaluated: {reason}");
            if let Err(e) = store.call(move |s| s.fail(id, &reason)).await {
                tracing::error!(id, "{e}");
            }
            return false;
        }
        Outcome::Retry(reason) => {
            tracing::error!(
                id,
                attempt = sub.attempts,
                max_attempts = settings.pool.max_attempts,
                "evaluation failed on evald's side, not the vendor's (the admin must fix this; \
                 it is queued again): {reason}"
            );
            let note = format!("queued again after a failure on evald's side: {reason}");
            if let Err(e) = store.call(move |s| s.interrupt(id, &note)).await {
                tracing::error!(id, "{e}");
            }
            return true;
        }
        Outcome::Rejected(rej) => {
            let sub = sub.clone();
            let r = tokio::task::spawn_blocking({
                let store = store.clone();
                move || ingest::reject(&store, &sub, &rej, None)
            })
            .await;
            match r {
                Ok(Ok(ingest::Ingested::Rejected(f))) => f,
                Ok(Ok(_)) => return false,
                Ok(Err(e)) => {
                    tracing::error!(id, "{e}");
                    return false;
                }
                Err(e) => {
                    tracing::error!(id, "{e}");
                    return false;
                }
            }
        }
        Outcome::Failed(reason) => {
            let r = reason.clone();
            match store.call(move |s| s.fail(id, &r)).await {
                Ok(failed) => tell_failed(shared, settings, failed, reason.clone()).await,
                Err(e) => tracing::error!(id, "{e}"),
            }
            Finished {
                id,
                dir: sub.path.clone(),
                state: State::Failed,
                evaluation: None,
                summary: None,
                report: None,
                error: Some(reason),
            }
        }
    };
    let _ = shared.events.send(DaemonEvent::Finished(finished));
    false
}

/// Hand a reported submission to mail; whether it became `mailed` now (no recipients, or
/// its message had gone before a stop). A queued message makes it `mailed` when the outbox
/// loop delivers it ([`delivered`]).
async fn mail(
    shared: &Shared,
    settings: &Arc<Settings>,
    sub: Submission,
    eval: Option<Arc<Evaluation>>,
) -> bool {
    let id = sub.id;
    let (s, store, wake) = (
        Arc::clone(settings),
        shared.store.clone(),
        Arc::clone(&shared.mail_wake),
    );
    let res =
        tokio::task::spawn_blocking(move || notify_team(&s, &store, &wake, &sub, eval.as_deref()))
            .await;
    let note = match res {
        Ok(Ok(MailStep::NoRecipients)) => "no recipients configured".to_string(),
        Ok(Ok(MailStep::Sent(to))) => to,
        Ok(Ok(MailStep::Queued(row))) => {
            tracing::info!(id, outbox = row, "email queued");
            return false;
        }
        Ok(Ok(MailStep::Lost)) => {
            tracing::warn!(
                id,
                "reported before a stop, and its email was never queued; the report is in \
                 the submission folder"
            );
            return false;
        }
        Ok(Err(e)) => {
            tracing::error!(id, "{e} (handed to mail again at the next start)");
            return false;
        }
        Err(e) => {
            tracing::error!(
                id,
                "queueing the email failed (retried at the next start): {e}"
            );
            return false;
        }
    };
    match shared.store.call(move |s| s.mailed(id, &note)).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(id, "{e}");
            false
        }
    }
}

/// At start: submissions reported but not handed to mail (a stop in between).
async fn mail_reported_backlog(shared: &Shared) {
    let backlog = match shared.store.call(|s| s.in_state(State::Reported)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("reading reported submissions: {e}");
            return;
        }
    };
    if backlog.is_empty() {
        return;
    }
    tracing::info!(count = backlog.len(), "submissions reported but not mailed");
    let settings = shared.settings.borrow().clone();
    for sub in backlog {
        if shared.cancel.is_cancelled() {
            return;
        }
        mail(shared, &settings, sub, None).await;
    }
}
