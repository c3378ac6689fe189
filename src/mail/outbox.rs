//! The durable outbox: every email is a row in SQLite before anything is sent, and is
//! marked sent only after the transport accepted it.
//!
//! Table `mail_outbox` (created and versioned here, as component [`COMPONENT`] of
//! `evald_schema`; the database file is shared with the daemon's own tables, so nothing
//! else in it is touched, and nothing else touches this one: `evald status` reads its
//! counts through [`counts`]). States:
//! `queued -> sending -> sent`, `sending -> queued` (transient failure, with
//! `next_attempt_at` pushed back exponentially), `sending -> failed` (permanent refusal, or
//! given up after [`RetryPolicy::give_up_after`]; `last_error` holds the server's reply).
//!
//! Exactly-once, as far as SMTP allows: a deliverer *claims* a row with one atomic
//! `UPDATE ... RETURNING` that moves it to `sending` with a lease, so two deliverers (the
//! daemon and `evald run`, or two daemons by mistake) never send the same row. A process
//! that dies while sending leaves the row `sending`; after the lease expires another
//! deliverer takes it again. The one window SMTP itself cannot close is a crash after the
//! server accepted the message and before the row was marked sent: then the message goes
//! out twice, with the same Message-ID, so mail clients can tell. The file transport is
//! idempotent (the `.eml` name is fixed at enqueue time).
//!
//! Retries survive restarts: `next_attempt_at` is stored, and the delivery loop
//! ([`run_outbox`]) sleeps until the earliest one (or a wake-up, or shutdown).
//!
//! All methods here do blocking SQLite I/O except the `async` ones, which move it to
//! `spawn_blocking`; call the blocking ones from a blocking context.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lettre::address::{Address, Envelope};
use lettre::Message;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::transport::{FailureKind, SendError, Sender};
use crate::config::MailSettings;

/// The outbox failed (the database, not a send: send failures are recorded in rows).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite refused.
    #[error("mail outbox {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database folder cannot be created.
    #[error("mail outbox {path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A message cannot be queued (no envelope).
    #[error("mail outbox: message '{subject}' has no sender or recipient")]
    NoEnvelope {
        /// Its subject.
        subject: String,
    },
    /// The outbox tables were written by a newer evald.
    #[error("mail outbox {path}: schema version {found} is newer than this evald's ({SCHEMA_VERSION}); use the evald that wrote it or a newer one")]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: i64,
    },
    /// A blocking task died (a bug).
    #[error("mail outbox: a database task failed: {0}")]
    Task(String),
}

/// Component name of the outbox's tables in `evald_schema`.
pub const COMPONENT: &str = "mail_outbox";
/// Schema version of the outbox's tables this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// When to retry, and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure; doubled after each further one.
    pub first_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
    /// A message still unsent this long after it was queued is marked failed.
    pub give_up_after: Duration,
    /// How long a claim lasts before another deliverer may take the row again (longer than
    /// any send can take).
    pub lease: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(3 * 24 * 3600),
            lease: Duration::from_secs(15 * 60),
        }
    }
}

impl RetryPolicy {
    /// Delay before the attempt after `attempts` failed ones (1 -> first_delay).
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
        self.first_delay
            .checked_mul(factor)
            .map_or(self.max_delay, |d| d.min(self.max_delay))
    }
}

/// Where a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Waiting for its next attempt.
    Queued,
    /// Claimed by a deliverer right now.
    Sending,
    /// Accepted by the transport.
    Sent,
    /// Refused for good, or given up.
    Failed,
}

impl State {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sending => "sending",
            State::Sent => "sent",
            State::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "sending" => State::Sending,
            "sent" => State::Sent,
            "failed" => State::Failed,
            _ => State::Queued,
        }
    }
}

/// One row of the outbox (without the message bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Row id.
    pub id: i64,
    /// Caller's de-duplication key, if any.
    pub key: Option<String>,
    /// Subject.
    pub subject: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// State.
    pub state: State,
    /// Attempts made.
    pub attempts: u32,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
    /// Earliest next attempt (queued rows).
    pub next_attempt_at: DateTime<Utc>,
    /// When the transport accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// The last failure (server reply or local error).
    pub last_error: Option<String>,
    /// Where it went: the `.eml` path, or the SMTP server's acceptance.
    pub delivered_to: Option<String>,
    /// The `.eml` name used by the file transport.
    pub file_name: String,
}

/// What one attempt did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted; where it went.
    Sent(String),
    /// Will be retried at this time.
    Retry {
        /// Next attempt.
        at: DateTime<Utc>,
        /// Why it failed.
        error: String,
    },
    /// Will not be retried.
    Failed(String),
}

/// The result of one attempt on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Row id.
    pub id: i64,
    /// The caller's key the message was queued with (the daemon finds its submission by
    /// it).
    pub key: Option<String>,
    /// Subject (for logs).
    pub subject: String,
    /// What happened.
    pub outcome: Outcome,
}

/// The outbox: a handle on the `mail_outbox` table of a SQLite database. Cheap to clone
/// (clones share one connection).
#[derive(Clone)]
pub struct Outbox {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    policy: RetryPolicy,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mail_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    key             TEXT UNIQUE,
    created_at      INTEGER NOT NULL,
    subject         TEXT NOT NULL,
    sender          TEXT NOT NULL,
    recipients      TEXT NOT NULL,
    file_name       TEXT NOT NULL,
    message         BLOB NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_error      TEXT,
    sent_at         INTEGER,
    delivered_to    TEXT
);
CREATE INDEX IF NOT EXISTS mail_outbox_due ON mail_outbox (state, next_attempt_at);
";

/// Create the outbox's tables when missing and record their version (the file may be new,
/// or the daemon's store may have created it first: both keep their own component row in
/// `evald_schema`).
fn ensure_schema(conn: &Connection, db: &Path) -> Result<(), OutboxError> {
    let err = |source| OutboxError::Db {
        path: db.to_path_buf(),
        source,
    };
    let tx = conn.unchecked_transaction().map_err(err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS evald_schema (
             component TEXT PRIMARY KEY,
             version   INTEGER NOT NULL
         );",
    )
    .map_err(err)?;
    let found = crate::store::schema_version(&tx, COMPONENT).map_err(err)?;
    match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(OutboxError::NewerSchema {
                path: db.to_path_buf(),
                found: v,
            })
        }
        Some(_) => {}
        // A new file, or one from before the outbox recorded its version (the table, if
        // any, has this very layout: `IF NOT EXISTS` keeps it and its rows).
        None => {
            tx.execute_batch(SCHEMA).map_err(err)?;
            tx.execute(
                "INSERT INTO evald_schema (component, version) VALUES (?1, ?2)",
                params![COMPONENT, SCHEMA_VERSION],
            )
            .map_err(err)?;
        }
    }
    tx.commit().map_err(err)
}

/// Messages per state in the outbox of the database `conn` is open on (for `evald status`,
/// which holds the store's connection); `None` when no outbox was ever created there.
///
/// # Errors
/// [`OutboxError::Db`].
pub fn counts(conn: &Connection) -> Result<Option<Vec<(State, u64)>>, OutboxError> {
    let err = |source| OutboxError::Db {
        path: PathBuf::from(conn.path().unwrap_or_default()),
        source,
    };
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mail_outbox')",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if !exists {
        return Ok(None);
    }
    let mut st = conn
        .prepare("SELECT state, COUNT(*) FROM mail_outbox GROUP BY state")
        .map_err(err)?;
    let mut rows = st
        .query_map([], |r| {
            Ok((State::parse(&r.get::<_, String>(0)?), r.get::<_, u64>(1)?))
        })
        .map_err(err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(err)?;
    rows.sort();
    Ok(Some(rows))
}

fn ts(t: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(t, 0).single().unwrap_or_default()
}

/// A claimed row, ready to send.
struct Claimed {
    id: i64,
    key: Option<String>,
    subject: String,
    sender: String,
    recipients: Vec<String>,
    file_name: String,
    message: Vec<u8>,
    attempts: u32,
    created_at: i64,
}

impl Outbox {
    /// Open (or create) the outbox in the SQLite database at `db`: WAL mode, a busy timeout
    /// (the daemon and `evald run` may share the file), and the `mail_outbox` table.
    ///
    /// # Errors
    /// [`OutboxError`] when the folder or database cannot be created or opened.
    pub fn open(db: &Path) -> Result<Self, OutboxError> {
        if let Some(dir) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OutboxError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let err = |source| OutboxError::Db {
            path: db.to_path_buf(),
            source,
        };
        let conn = Connection::open(db).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // FULL: a queued message must survive a power cut too, not only a crash (emails are
        // few; one fsync per commit costs nothing here).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        ensure_schema(&conn, db)?;
        Ok(Outbox {
            conn: Arc::new(Mutex::new(conn)),
            path: db.to_path_buf(),
            policy: RetryPolicy::default(),
        })
    }

    /// Use another retry policy.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The retry policy in force.
    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, OutboxError> {
        // A poisoned lock only means another thread panicked mid-call; SQLite itself kept
        // its transaction boundaries, so the connection is still consistent.
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&conn).map_err(|source| OutboxError::Db {
            path: self.path.clone(),
            source,
        })
    }

    /// Queue a message for delivery (recorded durably before this returns).
    ///
    /// `label` names the `.eml` file (file transport); `key`, when given, makes the call
    /// idempotent: a second enqueue with the same key returns the first row's id and queues
    /// nothing (for the daemon: one email per submission even across crashes).
    ///
    /// # Errors
    /// [`OutboxError`] on a database error or a message without envelope.
    pub fn enqueue(
        &self,
        message: &Message,
        label: &str,
        key: Option<&str>,
    ) -> Result<i64, OutboxError> {
        self.enqueue_at(message, label, key, Utc::now())
    }

    /// [`Outbox::enqueue`] with an explicit "now" (tests, replay).
    ///
    /// # Errors
    /// As [`Outbox::enqueue`].
    pub fn enqueue_at(
        &self,
        message: &Message,
        label: &str,
        key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<i64, OutboxError> {
        let env = message.envelope();
        let subject = message
            .headers()
            .get_raw("Subject")
            .unwrap_or_default()
            .to_string();
        let Some(from) = env.from() else {
            return Err(OutboxError::NoEnvelope { subject });
        };
        if env.to().is_empty() {
            return Err(OutboxError::NoEnvelope { subject });
        }
        let recipients: Vec<String> = env.to().iter().map(ToString::to_string).collect();
        let raw = message.formatted();
        let t = now.timestamp();
        let label = if label.is_empty() { "evald" } else { label };
        self.db(|c| {
            let tx = c.unchecked_transaction()?;
            if let Some(k) = key {
                if let Some(id) = tx
                    .query_row("SELECT id FROM mail_outbox WHERE key = ?1", [k], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()?
                {
                    return Ok(id);
                }
            }
            tx.execute(
                "INSERT INTO mail_outbox (key, created_at, subject, sender, recipients, file_name, message, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, '', ?6, ?2)",
                params![
                    key,
                    t,
                    subject,
                    from.to_string(),
                    serde_json::to_string(&recipients).unwrap_or_else(|_| "[]".into()),
                    raw
                ],
            )?;
            let id = tx.last_insert_rowid();
            let file_name = format!("{}-{id:06}-{label}.eml", now.format("%Y%m%dT%H%M%SZ"));
            tx.execute(
                "UPDATE mail_outbox SET file_name = ?1 WHERE id = ?2",
                params![file_name, id],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn entry_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
        let recipients: String = r.get("recipients")?;
        Ok(OutboxEntry {
            id: r.get("id")?,
            key: r.get("key")?,
            subject: r.get("subject")?,
            recipients: serde_json::from_str(&recipients).unwrap_or_default(),
            state: State::parse(&r.get::<_, String>("state")?),
            attempts: r.get("attempts")?,
            created_at: ts(r.get("created_at")?),
            next_attempt_at: ts(r.get("next_attempt_at")?),
            sent_at: r.get::<_, Option<i64>>("sent_at")?.map(ts),
            last_error: r.get("last_error")?,
            delivered_to: r.get("delivered_to")?,
            file_name: r.get("file_name")?,
        })
    }

    const ENTRY_COLS: &'static str = "id, key, subject, recipients, state, attempts, created_at, next_attempt_at, sent_at, last_error, delivered_to, file_name";

    /// One row.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn entry(&self, id: i64) -> Result<Option<OutboxEntry>, OutboxError> {
        self.db(|c| {
            c.query_row(
                &format!("SELECT {} FROM mail_outbox WHERE id = ?1", Self::ENTRY_COLS),
                [id],
                Self::entry_of,
            )
            .optional()
        })
    }

    /// The row queued with idempotency `key`, if any.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn entry_by_key(&self, key: &str) -> Result<Option<OutboxEntry>, OutboxError> {
        self.db(|c| {
            c.query_row(
                &format!(
                    "SELECT {} FROM mail_outbox WHERE key = ?1",
                    Self::ENTRY_COLS
                ),
                [key],
                Self::entry_of,
            )
            .optional()
        })
    }

    /// All rows, oldest first.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn entries(&self) -> Result<Vec<OutboxEntry>, OutboxError> {
        self.db(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM mail_outbox ORDER BY id",
                Self::ENTRY_COLS
            ))?;
            let rows = st.query_map([], Self::entry_of)?;
            rows.collect()
        })
    }

    /// The raw RFC 5322 bytes of a queued message.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn raw_message(&self, id: i64) -> Result<Option<Vec<u8>>, OutboxError> {
        self.db(|c| {
            c.query_row("SELECT message FROM mail_outbox WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Rows per state (for `evald status`).
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn counts(&self) -> Result<Vec<(State, u64)>, OutboxError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(counts(&conn)?.unwrap_or_default())
    }

    /// Put a failed message back in the queue (the admin fixed the cause), due now.
    /// Returns whether a failed row was requeued.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn requeue(&self, id: i64) -> Result<bool, OutboxError> {
        let now = Utc::now().timestamp();
        self.db(|c| {
            c.execute(
                "UPDATE mail_outbox SET state = 'queued', next_attempt_at = ?1, created_at = ?1
                 WHERE id = ?2 AND state = 'failed'",
                params![now, id],
            )
            .map(|n| n > 0)
        })
    }

    /// The earliest time a queued (or abandoned `sending`) row becomes due.
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn next_due(&self) -> Result<Option<DateTime<Utc>>, OutboxError> {
        self.db(|c| {
            c.query_row(
                "SELECT MIN(CASE state WHEN 'queued' THEN next_attempt_at ELSE lease_until END)
                 FROM mail_outbox WHERE state IN ('queued', 'sending')",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|t| t.map(ts))
        })
    }

    /// Make every queued row due now (after a configuration change).
    ///
    /// # Errors
    /// [`OutboxError::Db`].
    pub fn retry_now(&self) -> Result<usize, OutboxError> {
        let now = Utc::now().timestamp();
        self.db(|c| {
            c.execute(
                "UPDATE mail_outbox SET next_attempt_at = ?1
                 WHERE state = 'queued' AND next_attempt_at > ?1",
                [now],
            )
        })
    }

    /// Claim the next due row (or `only` if it is due): one atomic statement.
    fn claim(&self, now: i64, only: Option<i64>) -> Result<Option<Claimed>, OutboxError> {
        let lease = now + self.policy.lease.as_secs() as i64;
        self.db(|c| {
            c.query_row(
                "UPDATE mail_outbox
                 SET state = 'sending', lease_until = ?2, attempts = attempts + 1
                 WHERE id = (
                     SELECT id FROM mail_outbox
                     WHERE ((state = 'queued' AND next_attempt_at <= ?1)
                            OR (state = 'sending' AND lease_until <= ?1))
                       AND (?3 IS NULL OR id = ?3)
                     ORDER BY next_attempt_at, id LIMIT 1)
                 RETURNING id, subject, sender, recipients, file_name, message, attempts, created_at, key",
                params![now, lease, only],
                |r| {
                    let recipients: String = r.get(3)?;
                    Ok(Claimed {
                        id: r.get(0)?,
                        subject: r.get(1)?,
                        sender: r.get(2)?,
                        recipients: serde_json::from_str(&recipients).unwrap_or_default(),
                        file_name: r.get(4)?,
                        message: r.get(5)?,
                        attempts: r.get(6)?,
                        created_at: r.get(7)?,
                        key: r.get(8)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Record the result of an attempt; returns the outcome and whether the server is
    /// unusable for now.
    fn record(
        &self,
        m: &Claimed,
        result: Result<String, SendError>,
        now: DateTime<Utc>,
    ) -> Result<(Outcome, bool), OutboxError> {
        let t = now.timestamp();
        let (outcome, unavailable) = match result {
            Ok(to) => {
                self.db(|c| {
                    c.execute(
                        "UPDATE mail_outbox SET state = 'sent', sent_at = ?1, delivered_to = ?2,
                         lease_until = NULL, last_error = NULL WHERE id = ?3",
                        params![t, to, m.id],
                    )
                })?;
                (Outcome::Sent(to), false)
            }
            Err(e) => {
                let age = t - m.created_at;
                let give_up = age >= self.policy.give_up_after.as_secs() as i64;
                if e.kind == FailureKind::Permanent || give_up {
                    let msg = if e.kind == FailureKind::Permanent {
                        e.message.clone()
                    } else {
                        format!(
                            "gave up after {} attempts over {} h: {}",
                            m.attempts,
                            age / 3600,
                            e.message
                        )
                    };
                    self.db(|c| {
                        c.execute(
                            "UPDATE mail_outbox SET state = 'failed', last_error = ?1,
                             lease_until = NULL WHERE id = ?2",
                            params![msg, m.id],
                        )
                    })?;
                    (Outcome::Failed(msg), false)
                } else {
                    let at = now
                        + chrono::Duration::from_std(self.policy.delay(m.attempts))
                            .unwrap_or_else(|_| chrono::Duration::hours(1));
                    self.db(|c| {
                        c.execute(
                            "UPDATE mail_outbox SET state = 'queued', next_attempt_at = ?1,
                             last_error = ?2, lease_until = NULL WHERE id = ?3",
                            params![at.timestamp(), e.message, m.id],
                        )
                    })?;
                    (
                        Outcome::Retry {
                            at,
                            error: e.message.clone(),
                        },
                        e.kind == FailureKind::Unavailable,
                    )
                }
            }
        };
        Ok((outcome, unavailable))
    }

    /// Hold every other due row until `until` (the server is down: trying them now would
    /// only wait for the same timeout again). Their attempt counts are not touched.
    fn defer_due(&self, now: i64, until: i64) -> Result<(), OutboxError> {
        self.db(|c| {
            c.execute(
                "UPDATE mail_outbox SET next_attempt_at = ?2
                 WHERE state = 'queued' AND next_attempt_at <= ?1",
                params![now, until],
            )
            .map(|_| ())
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| OutboxError::Task(e.to_string()))?
    }

    /// Try every due message once, now. Returns what happened to each one tried.
    ///
    /// # Errors
    /// [`OutboxError`] on database errors (send failures are outcomes, not errors).
    pub async fn deliver_due(&self, settings: &MailSettings) -> Result<Vec<Delivery>, OutboxError> {
        self.deliver_round(settings, Utc::now(), None, None).await
    }

    /// [`Outbox::deliver_due`] as if the clock said `now` (tests: "later" without sleeping).
    ///
    /// # Errors
    /// As [`Outbox::deliver_due`].
    pub async fn deliver_due_at(
        &self,
        settings: &MailSettings,
        now: DateTime<Utc>,
    ) -> Result<Vec<Delivery>, OutboxError> {
        self.deliver_round(settings, now, None, None).await
    }

    /// Try one message now, if it is due (`evald run` sends its own email only).
    ///
    /// # Errors
    /// As [`Outbox::deliver_due`].
    pub async fn deliver_one(
        &self,
        id: i64,
        settings: &MailSettings,
    ) -> Result<Option<Delivery>, OutboxError> {
        Ok(self
            .deliver_round(settings, Utc::now(), Some(id), None)
            .await?
            .pop())
    }

    async fn deliver_round(
        &self,
        settings: &MailSettings,
        now: DateTime<Utc>,
        only: Option<i64>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Vec<Delivery>, OutboxError> {
        let mut done = Vec::new();
        // Built on the first claimed row, so an idle round reads no password file.
        let mut sender: Option<Result<Sender, SendError>> = None;
        loop {
            if cancel.is_some_and(CancellationToken::is_cancelled) {
                break;
            }
            let t = now.timestamp();
            let Some(m) = self.blocking(move |o| o.claim(t, only)).await? else {
                break;
            };
            let s = sender.get_or_insert_with(|| Sender::new(settings));
            let result = match s {
                Ok(s) => match envelope(&m) {
                    Ok(env) => s.send(&env, &m.message, &m.file_name).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.clone()),
            };
            let me = self.clone();
            let (m, recorded) = tokio::task::spawn_blocking(move || {
                let r = me.record(&m, result, now);
                (m, r)
            })
            .await
            .map_err(|e| OutboxError::Task(e.to_string()))?;
            let (outcome, unavailable) = recorded?;
            done.push(Delivery {
                id: m.id,
                key: m.key,
                subject: m.subject,
                outcome: outcome.clone(),
            });
            if unavailable {
                if let Outcome::Retry { at, .. } = outcome {
                    let until = at.timestamp();
                    self.blocking(move |o| o.defer_due(t, until)).await?;
                }
                break;
            }
        }
        Ok(done)
    }
}

fn envelope(m: &Claimed) -> Result<Envelope, SendError> {
    let bad = |what: String| SendError {
        kind: FailureKind::Permanent,
        message: what,
        code: None,
    };
    let from: Address = m
        .sender
        .parse()
        .map_err(|e| bad(format!("stored sender '{}': {e}", m.sender)))?;
    let to = m
        .recipients
        .iter()
        .map(|r| {
            r.parse::<Address>()
                .map_err(|e| bad(format!("stored recipient '{r}': {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Envelope::new(Some(from), to).map_err(|e| bad(format!("envelope: {e}")))
}

fn log(d: &Delivery) {
    match &d.outcome {
        Outcome::Sent(to) => tracing::info!(id = d.id, subject = d.subject, to, "email sent"),
        Outcome::Retry { at, error } => tracing::warn!(
            id = d.id,
            subject = d.subject,
            retry_at = %at.to_rfc3339(),
            error,
            "email not sent, will retry"
        ),
        Outcome::Failed(error) => tracing::error!(
            id = d.id,
            subject = d.subject,
            error,
            "email refused, not retrying (evald keeps it in the outbox as failed)"
        ),
    }
}

/// Default longest sleep of the delivery loop (`daemon.outbox_poll_secs`): picks up rows
/// other processes queued without waking it.
pub const POLL: Duration = Duration::from_secs(30);

/// The delivery loop the daemon owns, and the daemon's only deliverer: deliver what is due,
/// then sleep until the next row is due (at most `poll`), a `wake` notification (the
/// producer queued something: the producer holds this same `Notify`), a settings change
/// (SIGHUP reload) or `shutdown`. `on_delivery` hears of every attempt (the daemon marks
/// the submission mailed when its message went). A send in progress finishes before the
/// loop exits (bounded by the SMTP timeout). Database errors are logged and retried after
/// `poll`.
///
/// # Errors
/// None so far: the loop runs until `shutdown`; the `Result` leaves room for fatal errors.
pub async fn run_outbox(
    outbox: Outbox,
    mut settings: watch::Receiver<MailSettings>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    poll: Duration,
    on_delivery: impl Fn(&Delivery) + Send + Sync,
) -> Result<(), OutboxError> {
    tracing::info!(db = %outbox.path.display(), poll_secs = poll.as_secs(), "mail outbox running");
    let poll = poll.max(Duration::from_secs(1));
    loop {
        let s = settings.borrow_and_update().clone();
        let mut pause = poll;
        match outbox
            .deliver_round(&s, Utc::now(), None, Some(&shutdown))
            .await
        {
            Ok(done) => done.iter().for_each(|d| {
                log(d);
                on_delivery(d);
            }),
            Err(e) => tracing::error!(error = %e, "mail outbox round failed"),
        }
        match outbox.blocking(Outbox::next_due).await {
            Ok(Some(next)) => {
                let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                // At least a second: a row held by another process's lease is "due" but not
                // claimable, and must not turn this into a busy loop.
                pause = wait.clamp(Duration::from_secs(1), poll);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "mail outbox: reading the next due time"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = wake.notified() => {}
            r = settings.changed() => {
                if r.is_ok() {
                    // New settings (the admin fixed the server or the password): rows held
                    // back because the old ones failed get a chance at once.
                    if let Err(e) = outbox.blocking(Outbox::retry_now).await {
                        tracing::error!(error = %e, "mail outbox: rescheduling after a reload");
                    }
                } else {
                    // The settings sender is gone: keep the last settings.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
            () = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!("mail outbox stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_secs(30));
        assert_eq!(p.delay(2), Duration::from_secs(60));
        assert_eq!(p.delay(3), Duration::from_secs(120));
        assert_eq!(p.delay(8), Duration::from_secs(3600));
        assert_eq!(p.delay(1000), Duration::from_secs(3600));
    }
}
