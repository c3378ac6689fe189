//! The emailed summary of an evaluation, and its durable delivery.
//!
//! Layout:
//! - [`compose`](mod@compose): the message (subject with the headline, text + HTML
//!   alternatives, the Dice plot inline, the workbook attached under the size cap);
//! - [`outbox`](mod@outbox): the SQLite outbox (`mail_outbox` table): record before
//!   sending, mark sent after acceptance, retry transient failures with exponential backoff
//!   across restarts, stop on permanent ones; the daemon's delivery loop [`run_outbox`];
//! - [`transport`](mod@transport): the configured transport (`file`: `.eml` files in
//!   `outbox_dir`; `smtp`: none | starttls | tls, optional AUTH) and error classification.
//!
//! The daemon's use: `compose(..)` -> [`Outbox::enqueue`] (keyed by submission, so a crash
//! and retry cannot queue it twice) -> `wake.notify_one()` on the `Notify` the loop holds;
//! [`run_outbox`] is the daemon's only deliverer. `evald run` uses [`send_now`], which
//! queues and delivers its own message in one shot and says what became of it.
//!
//! The change against the vendor's previous submission comes from the store's results
//! ([`crate::store::Store::previous_results`]), never from files beside the submission.

pub mod compose;
pub mod outbox;
pub mod transport;

use std::path::{Path, PathBuf};

pub use compose::{
    compose, compose_failure, subject, ComposeError, Composed, Previous, ReportInMail,
};
pub use outbox::{
    counts as outbox_counts, run_outbox, Delivery, Outbox, OutboxEntry, OutboxError, Outcome,
    RetryPolicy, State,
};
pub use transport::{FailureKind, SendError};

use crate::config::{MailTransport, Settings};
use crate::evaluation::Evaluation;

/// The state database's file name inside `daemon.state_dir` (shared with the daemon's
/// store; the outbox only creates and uses its own `mail_outbox` table).
pub const DB_FILE: &str = "evald.db";

/// The outbox database of a configuration.
pub fn db_path(settings: &Settings) -> PathBuf {
    settings.daemon.state_dir.join(DB_FILE)
}

/// Sending the one-shot email failed before the outbox had it.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The message could not be composed.
    #[error(transparent)]
    Compose(#[from] ComposeError),
    /// The outbox could not record it.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// No async runtime could be started for the send.
    #[error("starting the mail runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What became of the email of a one-shot run (the CLI prints it after `email: `).
#[derive(Debug, Clone, PartialEq)]
pub enum SentMail {
    /// File transport: the `.eml` file.
    File(PathBuf),
    /// Accepted by the SMTP server.
    Smtp {
        /// Recipients.
        to: Vec<String>,
        /// The server's acceptance.
        reply: String,
    },
    /// Not sent yet; it waits in the outbox (the daemon's loop retries it).
    Queued {
        /// The outbox database.
        db: PathBuf,
        /// Next attempt.
        at: chrono::DateTime<chrono::Utc>,
        /// Why it was not sent.
        error: String,
    },
    /// Refused for good.
    Failed {
        /// The outbox database (the row stays there as failed).
        db: PathBuf,
        /// The server's reply.
        error: String,
    },
}

impl std::fmt::Display for SentMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SentMail::File(p) => write!(f, "{}", p.display()),
            SentMail::Smtp { to, reply } => write!(f, "sent to {} ({reply})", to.join(", ")),
            SentMail::Queued { db, at, error } => write!(
                f,
                "queued in {} for {} ({error}); `evald serve` keeps retrying it",
                db.display(),
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            SentMail::Failed { db, error } => {
                write!(f, "refused: {error} (kept as failed in {})", db.display())
            }
        }
    }
}

/// Compose the email of `eval`, queue it in the outbox of `settings` and try to deliver it
/// once, now. The previous submission is the vendor's newest reported one of the task in
/// the configured state folder's store, opened read-only ([`previous_in_store`]); without
/// a store there is no comparison. Blocking: it runs its own small async runtime, so call
/// it from synchronous code (the CLI), never from inside a tokio runtime.
///
/// # Errors
/// [`MailError`] when the message cannot be composed or recorded; a failed send is a
/// [`SentMail`], not an error (the message is safe in the outbox).
pub fn send_now(
    eval: &Evaluation,
    recipients: &[String],
    report: Option<&Path>,
    settings: &Settings,
) -> Result<SentMail, MailError> {
    let previous = previous_in_store(eval, &settings.daemon.state_dir);
    let mail = compose(eval, recipients, previous.as_ref(), report, &settings.mail)?;
    let db = db_path(settings);
    let outbox = Outbox::open(&db)?;
    let id = outbox.enqueue(&mail.message, &mail.label, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MailError::Runtime)?;
    let delivery = rt.block_on(outbox.deliver_one(id, &settings.mail))?;
    Ok(match delivery.map(|d| d.outcome) {
        Some(Outcome::Sent(to)) => match settings.mail.transport {
            MailTransport::File => SentMail::File(PathBuf::from(to)),
            MailTransport::Smtp { .. } => SentMail::Smtp {
                to: recipients.to_vec(),
                reply: to,
            },
        },
        Some(Outcome::Retry { at, error }) => SentMail::Queued { db, at, error },
        Some(Outcome::Failed(error)) => SentMail::Failed { db, error },
        // Claimed by another deliverer in between (a running daemon): it is in its hands.
        None => SentMail::Queued {
            db,
            at: chrono::Utc::now(),
            error: "being delivered by another evald process".into(),
        },
    })
}

/// The vendor's newest reported submission of `eval`'s task (other than `eval`'s own
/// folder) in the store of `state_dir`, opened read-only: nothing is created or migrated.
/// `None` without a store, without such a submission, or when the store cannot be read
/// (logged: the email goes without the comparison).
pub fn previous_in_store(eval: &Evaluation, state_dir: &Path) -> Option<Previous> {
    let vendor = eval.meta.vendor.as_deref()?;
    let dir = eval.meta.submission_dir.as_deref()?;
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let found = crate::store::Store::open_read_only(state_dir).and_then(|s| match s {
        Some(s) => s.latest_results_of(&eval.meta.task, vendor, &dir),
        None => Ok(None),
    });
    match found {
        Ok(p) => p.map(|(sub, r)| Previous::from_results(sub.name, &r.results)),
        Err(e) => {
            tracing::warn!(error = %e, "no comparison with the previous submission");
            None
        }
    }
}
