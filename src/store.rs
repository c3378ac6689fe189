//! The durable record of every submission: an embedded SQLite database at
//! `<state_dir>/evald.db` (WAL, `busy_timeout`, `synchronous = FULL`).
//!
//! It owns the `submissions` table (one row per evaluation of a folder's content: path,
//! task, vendor, model sha256, state, attempts, progress, outcome, timestamps) and
//! `submission_events` (every state change, for audit and `evald status`). The mail outbox
//! lives in the same file in its own tables, owned by [`crate`]'s mail module; this module
//! only reads their counts for `evald status`.
//!
//! States (`seen -> queued -> running -> reported -> mailed`, plus `rejected` and
//! `failed`) change only through [`Store`] methods, each in one transaction that checks
//! the current state, and each change writes one log line with the submission's id, task
//! and vendor. Schema versions are per component in `evald_schema` so the mail outbox can
//! version its own tables in the same file.
//!
//! The API is synchronous (rusqlite). The daemon never calls it on the tokio runtime: it
//! runs the [`Store`] on a dedicated thread behind a [`StoreHandle`].

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

/// Database file name inside `state_dir`.
pub const DB_FILE: &str = "evald.db";
/// Component name of this module's tables in `evald_schema`.
pub const COMPONENT: &str = "submissions";
/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;
/// How long a writer waits for another process (e.g. `evald requeue`) to release the lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a submission is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Found complete in the drop folder; not yet validated.
    Seen,
    /// Validated and waiting for its turn.
    Queued,
    /// Being evaluated.
    Running,
    /// `report.xlsx` and `summary.json` written.
    Reported,
    /// The team's email is in the outbox.
    Mailed,
    /// Refused; `REJECTED.txt` says why.
    Rejected,
    /// Could not be evaluated (the error column says why).
    Failed,
}

impl State {
    /// Every state, in life order.
    pub const ALL: [State; 7] = [
        State::Seen,
        State::Queued,
        State::Running,
        State::Reported,
        State::Mailed,
        State::Rejected,
        State::Failed,
    ];

    /// The name stored in the database and shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Seen => "seen",
            State::Queued => "queued",
            State::Running => "running",
            State::Reported => "reported",
            State::Mailed => "mailed",
            State::Rejected => "rejected",
            State::Failed => "failed",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States whose model counts as evaluated (or about to be) for de-duplication.
    pub const EVALUATED: [State; 4] = [
        State::Queued,
        State::Running,
        State::Reported,
        State::Mailed,
    ];
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Store failures, each naming the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state folder cannot be created.
    #[error("{path}: cannot create the state folder: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("{path}: {what}: {source}")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer evald.
    #[error("{path}: schema version {found} of '{COMPONENT}' is not the version this evald understands ({SCHEMA_VERSION}); use the evald that wrote it or a newer one")]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: i64,
    },
    /// No such submission id.
    #[error("submission #{0} does not exist (see `evald status`)")]
    NoSuchSubmission(i64),
    /// A state change that is not allowed from the current state.
    #[error("submission #{id} is {state}: {why}")]
    Transition {
        /// Submission id.
        id: i64,
        /// Its current state.
        state: State,
        /// What was refused.
        why: String,
    },
    /// A row holds a value this build does not know (a newer evald wrote it).
    #[error("{path}: submission #{id} has unknown state '{state}'")]
    UnknownState {
        /// The database file.
        path: PathBuf,
        /// Submission id.
        id: i64,
        /// The stored value.
        state: String,
    },
    /// The store thread has stopped (daemon shutting down).
    #[error("the store is closed")]
    Closed,
}

/// One submission row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Submission {
    /// Id (what `evald requeue` takes).
    pub id: i64,
    /// The submission folder.
    pub path: PathBuf,
    /// Task (first folder level).
    pub task: String,
    /// Vendor (second level).
    pub vendor: String,
    /// Submission name (third level).
    pub name: String,
    /// Digest of the folder's file list (names, sizes, mtimes) when it was examined.
    pub fingerprint: String,
    /// sha256 of the model file, hex (absent when rejected before it could be read).
    pub model_sha256: Option<String>,
    /// Model size in bytes.
    pub model_bytes: Option<u64>,
    /// Current state.
    pub state: State,
    /// Evaluation attempts started.
    pub attempts: u32,
    /// Why it was rejected or failed (or the last interruption).
    pub error: Option<String>,
    /// Machine-readable rejection kind (`unknown-task`, `symlink`, `model`, ...).
    pub reject_code: Option<String>,
    /// Cases finished in the current or last evaluation.
    pub progress_done: u64,
    /// Cases in the current or last evaluation.
    pub progress_total: u64,
    /// Scored cases (when reported).
    pub cases_scored: Option<u64>,
    /// Failed cases (when reported).
    pub cases_failed: Option<u64>,
    /// One-line result (when reported), e.g. `Dice thyroid 0.912, nodule 0.810`.
    pub headline: Option<String>,
    /// `summary.json` (when reported).
    pub summary_path: Option<PathBuf>,
    /// `report.xlsx` (when reported).
    pub report_path: Option<PathBuf>,
    /// RFC 3339 times.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// Last evaluation start.
    pub started_at: Option<String>,
    /// Reached a final state.
    pub finished_at: Option<String>,
    /// Place in the queue: a new one each time the submission is queued (by the watcher or
    /// `evald requeue`), kept when an interrupted evaluation is recovered. So it names one
    /// requested evaluation, however many attempts that took.
    pub queue_seq: Option<i64>,
}

/// A new submission to record (state `seen`).
#[derive(Debug, Clone)]
pub struct NewSubmission {
    /// The submission folder.
    pub path: PathBuf,
    /// Task.
    pub task: String,
    /// Vendor.
    pub vendor: String,
    /// Submission name.
    pub name: String,
    /// Folder fingerprint.
    pub fingerprint: String,
}

/// The outcome of a finished evaluation.
#[derive(Debug, Clone)]
pub struct ReportedOutcome {
    /// Scored cases.
    pub cases_scored: u64,
    /// Failed cases.
    pub cases_failed: u64,
    /// One-line result.
    pub headline: String,
    /// `summary.json`.
    pub summary_path: PathBuf,
    /// `report.xlsx`.
    pub report_path: PathBuf,
}

/// Message counts per state of the mail outbox: `(table, [(state, count)])`.
pub type OutboxCounts = (String, Vec<(String, u64)>);

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Transition {
    /// Submission id.
    pub submission: i64,
    /// RFC 3339 time.
    pub at: String,
    /// Previous state (none for the first).
    pub from: Option<State>,
    /// New state.
    pub to: State,
    /// Why, when there is something to say.
    pub note: Option<String>,
}

/// The submissions database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// RFC 3339 UTC with milliseconds (sorts as text).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const SCHEMA_V1: &str = "
CREATE TABLE submissions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    path           TEXT NOT NULL,
    task           TEXT NOT NULL,
    vendor         TEXT NOT NULL,
    name           TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    model_sha256   TEXT,
    model_bytes    INTEGER,
    state          TEXT NOT NULL CHECK (state IN
                   ('seen','queued','running','reported','mailed','rejected','failed')),
    queue_seq      INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    reject_code    TEXT,
    progress_done  INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    cases_scored   INTEGER,
    cases_failed   INTEGER,
    headline       TEXT,
    summary_path   TEXT,
    report_path    TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    started_at     TEXT,
    finished_at    TEXT
);
CREATE INDEX submissions_queue ON submissions(state, queue_seq);
CREATE INDEX submissions_path ON submissions(path, id);
CREATE INDEX submissions_model ON submissions(task, model_sha256);
CREATE TABLE submission_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    submission INTEGER NOT NULL REFERENCES submissions(id),
    at         TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    note       TEXT
);
CREATE INDEX submission_events_submission ON submission_events(submission, id);
";

const COLUMNS: &str =
    "id, path, task, vendor, name, fingerprint, model_sha256, model_bytes, state, \
     attempts, error, reject_code, progress_done, progress_total, cases_scored, cases_failed, \
     headline, summary_path, report_path, created_at, updated_at, started_at, finished_at, \
     queue_seq";

/// A row as read, before its state string is checked.
struct RawRow(Submission, String);

fn raw_row(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    let path: String = r.get(1)?;
    let state: String = r.get(8)?;
    Ok(RawRow(
        Submission {
            id: r.get(0)?,
            path: PathBuf::from(path),
            task: r.get(2)?,
            vendor: r.get(3)?,
            name: r.get(4)?,
            fingerprint: r.get(5)?,
            model_sha256: r.get(6)?,
            model_bytes: r.get::<_, Option<i64>>(7)?.map(|v| v.max(0) as u64),
            state: State::Seen,
            attempts: r.get::<_, i64>(9)?.max(0) as u32,
            error: r.get(10)?,
            reject_code: r.get(11)?,
            progress_done: r.get::<_, i64>(12)?.max(0) as u64,
            progress_total: r.get::<_, i64>(13)?.max(0) as u64,
            cases_scored: r.get::<_, Option<i64>>(14)?.map(|v| v.max(0) as u64),
            cases_failed: r.get::<_, Option<i64>>(15)?.map(|v| v.max(0) as u64),
            headline: r.get(16)?,
            summary_path: r.get::<_, Option<String>>(17)?.map(PathBuf::from),
            report_path: r.get::<_, Option<String>>(18)?.map(PathBuf::from),
            created_at: r.get(19)?,
            updated_at: r.get(20)?,
            started_at: r.get(21)?,
            finished_at: r.get(22)?,
            queue_seq: r.get(23)?,
        },
        state,
    ))
}

/// Maps a rusqlite error of one call (`what`) on the store at `path`. A free function, not
/// a method: inside a transaction the connection is borrowed mutably.
fn sql_error(path: &Path, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Sql {
        path: path.clone(),
        what,
        source,
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Store {
    /// Open (creating the folder, file and tables when missing) `<state_dir>/evald.db`.
    ///
    /// # Errors
    /// [`StoreError`] when the folder or database cannot be created, or was written by a
    /// newer evald.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| StoreError::Sql {
            path: path.clone(),
            what: "cannot open",
            source,
        })?;
        let mut store = Store { conn, path };
        store.configure()?;
        store.migrate()?;
        Ok(store)
    }

    /// Open an existing database without creating anything (for `evald status`);
    /// `Ok(None)` when there is none yet.
    ///
    /// # Errors
    /// [`StoreError`] when the file exists but cannot be read.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Store>, StoreError> {
        let path = state_dir.join(DB_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Sql {
            path: path.clone(),
            what: "cannot open",
            source,
        })?;
        let mut store = Store { conn, path };
        store.configure()?;
        store.migrate()?;
        Ok(Some(store))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for another component's own tables in the same file (the mail
    /// outbox): run through [`StoreHandle::call`] it shares this thread, so an email can
    /// be queued in the same transaction as a state change. Leave `submissions*` alone.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn sql(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
        sql_error(&self.path, what)
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(self.sql("setting busy_timeout"))?;
        // WAL: readers (evald status) never block the daemon; FULL: a committed state
        // change survives power loss, which is what "nothing is lost" means here.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(self.sql("enabling WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %self.path.display(), mode, "SQLite did not switch to WAL");
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(self.sql("setting synchronous"))?;
        self.conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(self.sql("enabling foreign keys"))?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |what: &'static str| sql_error(&path, what);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("starting the schema migration"))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS evald_schema (
                 component TEXT PRIMARY KEY,
                 version   INTEGER NOT NULL
             );",
        )
        .map_err(sql("creating evald_schema"))?;
        let found: Option<i64> = tx
            .query_row(
                "SELECT version FROM evald_schema WHERE component = ?1",
                [COMPONENT],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading the schema version"))?;
        match found {
            None => {
                tx.execute_batch(SCHEMA_V1)
                    .map_err(sql("creating the submissions tables"))?;
                tx.execute(
                    "INSERT INTO evald_schema (component, version) VALUES (?1, ?2)",
                    params![COMPONENT, SCHEMA_VERSION],
                )
                .map_err(sql("recording the schema version"))?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            // Older versions: migrations go here, one step per version.
            Some(v) => {
                return Err(StoreError::NewerSchema { path, found: v });
            }
        }
        tx.commit().map_err(sql("committing the schema"))
    }

    fn check(&self, raw: RawRow) -> Result<Submission, StoreError> {
        let RawRow(mut s, state) = raw;
        s.state = State::parse(&state).ok_or_else(|| StoreError::UnknownState {
            path: self.path.clone(),
            id: s.id,
            state,
        })?;
        Ok(s)
    }

    fn query(
        &self,
        what: &'static str,
        where_sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Submission>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM submissions {where_sql}");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.sql(what))?;
        let rows = stmt
            .query_map(params, raw_row)
            .map_err(self.sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql(what))?;
        rows.into_iter().map(|r| self.check(r)).collect()
    }

    /// One submission.
    ///
    /// # Errors
    /// [`StoreError::NoSuchSubmission`] or SQLite errors.
    pub fn get(&self, id: i64) -> Result<Submission, StoreError> {
        self.query("reading a submission", "WHERE id = ?1", [id])?
            .pop()
            .ok_or(StoreError::NoSuchSubmission(id))
    }

    /// The newest submission recorded for a folder.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn latest_for_path(&self, path: &Path) -> Result<Option<Submission>, StoreError> {
        Ok(self
            .query(
                "reading a folder's submissions",
                "WHERE path = ?1 ORDER BY id DESC LIMIT 1",
                [path_str(path)],
            )?
            .pop())
    }

    /// Every submission of a folder, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn for_path(&self, path: &Path) -> Result<Vec<Submission>, StoreError> {
        self.query(
            "reading a folder's submissions",
            "WHERE path = ?1 ORDER BY id",
            [path_str(path)],
        )
    }

    /// A submission of another folder with the same model bytes for the same task that is
    /// evaluated or about to be (de-duplication).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn same_model_elsewhere(
        &self,
        task: &str,
        sha256: &str,
        path: &Path,
    ) -> Result<Option<Submission>, StoreError> {
        Ok(self
            .query(
                "looking for the same model",
                "WHERE task = ?1 AND model_sha256 = ?2 AND path <> ?3 \
                 AND state IN ('queued','running','reported','mailed') ORDER BY id LIMIT 1",
                params![task, sha256, path_str(path)],
            )?
            .pop())
    }

    /// Submissions in `state`, in queue order for `queued`, else oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn in_state(&self, state: State) -> Result<Vec<Submission>, StoreError> {
        self.query(
            "listing submissions",
            "WHERE state = ?1 ORDER BY queue_seq, id",
            [state.as_str()],
        )
    }

    /// The next submission to evaluate (FIFO).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn next_queued(&self) -> Result<Option<Submission>, StoreError> {
        Ok(self
            .query(
                "reading the queue",
                "WHERE state = 'queued' ORDER BY queue_seq, id LIMIT 1",
                [],
            )?
            .pop())
    }

    /// The newest `limit` submissions that reached a final state or were reported.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recent_results(&self, limit: usize) -> Result<Vec<Submission>, StoreError> {
        self.query(
            "listing results",
            "WHERE state IN ('reported','mailed','rejected','failed') \
             ORDER BY COALESCE(finished_at, updated_at) DESC, id DESC LIMIT ?1",
            [limit as i64],
        )
    }

    /// Every submission, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn all(&self) -> Result<Vec<Submission>, StoreError> {
        self.query("listing submissions", "ORDER BY id", [])
    }

    /// The state changes of a submission, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn history(&self, id: i64) -> Result<Vec<Transition>, StoreError> {
        let what = "reading the history";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT submission, at, from_state, to_state, note FROM submission_events \
                 WHERE submission = ?1 ORDER BY id",
            )
            .map_err(self.sql(what))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(self.sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql(what))?;
        rows.into_iter()
            .map(|(submission, at, from, to, note)| {
                let parse = |s: String| {
                    State::parse(&s).ok_or_else(|| StoreError::UnknownState {
                        path: self.path.clone(),
                        id: submission,
                        state: s,
                    })
                };
                Ok(Transition {
                    submission,
                    at,
                    from: from.map(parse).transpose()?,
                    to: parse(to)?,
                    note,
                })
            })
            .collect()
    }

    /// Record a new folder content (state `seen`).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn insert(&mut self, new: &NewSubmission) -> Result<Submission, StoreError> {
        let t = now();
        let path = self.path.clone();
        let sql = |what: &'static str| sql_error(&path, what);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("recording a submission"))?;
        tx.execute(
            "INSERT INTO submissions (path, task, vendor, name, fingerprint, state, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'seen', ?6, ?6)",
            params![path_str(&new.path), new.task, new.vendor, new.name, new.fingerprint, t],
        )
        .map_err(sql("recording a submission"))?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO submission_events (submission, at, from_state, to_state, note) \
             VALUES (?1, ?2, NULL, 'seen', NULL)",
            params![id, t],
        )
        .map_err(sql("recording a submission"))?;
        tx.commit().map_err(sql("recording a submission"))?;
        let s = self.get(id)?;
        log_change(&s, None, None);
        Ok(s)
    }

    /// Change state inside one transaction: refuse unless the current state is in `from`,
    /// apply `set` (extra `column = ?` assignments with their values), record the event
    /// and log it.
    fn transition(
        &mut self,
        id: i64,
        from: &[State],
        to: State,
        note: Option<&str>,
        set: &str,
        values: &[&dyn rusqlite::ToSql],
    ) -> Result<Submission, StoreError> {
        let what = "changing a submission's state";
        let t = now();
        let before = self.get(id)?;
        if !from.contains(&before.state) {
            return Err(StoreError::Transition {
                id,
                state: before.state,
                why: format!(
                    "cannot become {to} (only from {})",
                    from.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let err = sql_error(&self.path, what);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        let extra = if set.is_empty() {
            String::new()
        } else {
            format!(", {set}")
        };
        let sql = format!(
            "UPDATE submissions SET state = ?1, updated_at = ?2{extra} WHERE id = ?3 AND state = ?4"
        );
        let (to_s, from_s) = (to.as_str(), before.state.as_str());
        let mut all: Vec<&dyn rusqlite::ToSql> = vec![&to_s, &t, &id, &from_s];
        all.extend_from_slice(values);
        let changed = tx
            .execute(&sql, rusqlite::params_from_iter(all))
            .map_err(&err)?;
        if changed != 1 {
            // Another process changed it between our read and the update.
            drop(tx);
            let now_state = self.get(id)?.state;
            return Err(StoreError::Transition {
                id,
                state: now_state,
                why: format!("changed concurrently; cannot become {to}"),
            });
        }
        tx.execute(
            "INSERT INTO submission_events (submission, at, from_state, to_state, note) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, t, before.state.as_str(), to.as_str(), note],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        let after = self.get(id)?;
        log_change(&after, Some(before.state), note);
        Ok(after)
    }

    /// `seen -> queued`: record the model and put it at the end of the queue.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless `seen`; SQLite errors.
    pub fn queue(
        &mut self,
        id: i64,
        model_sha256: &str,
        model_bytes: u64,
    ) -> Result<Submission, StoreError> {
        let sha = model_sha256.to_string();
        let bytes = model_bytes as i64;
        self.transition(
            id,
            &[State::Seen],
            State::Queued,
            None,
            "model_sha256 = ?5, model_bytes = ?6, \
             queue_seq = (SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM submissions)",
            &[&sha, &bytes],
        )
    }

    /// `queued -> queued` with new model content: the folder changed before its evaluation
    /// started (an upload that reopens its file per chunk), so the waiting submission takes
    /// the new content in its place in the queue instead of a new row per chunk.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless queued; SQLite errors.
    pub fn replace_queued_model(
        &mut self,
        id: i64,
        model_sha256: &str,
        model_bytes: u64,
    ) -> Result<Submission, StoreError> {
        let sha = model_sha256.to_string();
        let bytes = model_bytes as i64;
        self.transition(
            id,
            &[State::Queued],
            State::Queued,
            Some("the model changed before its evaluation started: new content, same place"),
            "model_sha256 = ?5, model_bytes = ?6",
            &[&sha, &bytes],
        )
    }

    /// `seen | queued | running -> rejected` with the reason shown in `REJECTED.txt`.
    ///
    /// # Errors
    /// [`StoreError::Transition`] from other states; SQLite errors.
    pub fn reject(
        &mut self,
        id: i64,
        code: &str,
        reason: &str,
        model: Option<(&str, u64)>,
    ) -> Result<Submission, StoreError> {
        let (code, reason, t) = (code.to_string(), reason.to_string(), now());
        let sha = model.map(|m| m.0.to_string());
        let bytes = model.map(|m| m.1 as i64);
        self.transition(
            id,
            &[State::Seen, State::Queued, State::Running],
            State::Rejected,
            Some(&reason),
            "reject_code = ?5, error = ?6, finished_at = ?7, \
             model_sha256 = COALESCE(?8, model_sha256), model_bytes = COALESCE(?9, model_bytes)",
            &[&code, &reason, &t, &sha, &bytes],
        )
    }

    /// `seen | queued | running -> failed`.
    ///
    /// # Errors
    /// [`StoreError::Transition`] from other states; SQLite errors.
    pub fn fail(&mut self, id: i64, reason: &str) -> Result<Submission, StoreError> {
        let (reason, t) = (reason.to_string(), now());
        self.transition(
            id,
            &[State::Seen, State::Queued, State::Running],
            State::Failed,
            Some(&reason),
            "error = ?5, finished_at = ?6",
            &[&reason, &t],
        )
    }

    /// `queued -> running`: one more attempt, progress reset.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless `queued`; SQLite errors.
    pub fn start(&mut self, id: i64) -> Result<Submission, StoreError> {
        let t = now();
        self.transition(
            id,
            &[State::Queued],
            State::Running,
            None,
            "attempts = attempts + 1, started_at = ?5, progress_done = 0, progress_total = 0",
            &[&t],
        )
    }

    /// Progress of the running evaluation (not a state change; not logged).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn progress(&mut self, id: i64, done: u64, total: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE submissions SET progress_done = ?1, progress_total = ?2 \
                 WHERE id = ?3 AND state = 'running'",
                params![done as i64, total as i64, id],
            )
            .map_err(self.sql("recording progress"))?;
        Ok(())
    }

    /// `running -> queued`: the evaluation was interrupted (shutdown); it runs again first.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless `running`; SQLite errors.
    pub fn interrupt(&mut self, id: i64, note: &str) -> Result<Submission, StoreError> {
        let note = note.to_string();
        // Keep its queue position: it was at the head when it started.
        self.transition(
            id,
            &[State::Running],
            State::Queued,
            Some(&note),
            "error = ?5",
            &[&note],
        )
    }

    /// On start: every `running` submission was interrupted by a crash or kill; queue it
    /// again at its old position. Returns those submissions.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recover(&mut self) -> Result<Vec<Submission>, StoreError> {
        let mut out = Vec::new();
        for s in self.in_state(State::Running)? {
            out.push(self.interrupt(
                s.id,
                "interrupted: evald stopped during the evaluation; queued again",
            )?);
        }
        Ok(out)
    }

    /// `running -> reported`.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless `running`; SQLite errors.
    pub fn reported(&mut self, id: i64, o: &ReportedOutcome) -> Result<Submission, StoreError> {
        let t = now();
        let (scored, failed) = (o.cases_scored as i64, o.cases_failed as i64);
        let (summary, report) = (path_str(&o.summary_path), path_str(&o.report_path));
        self.transition(
            id,
            &[State::Running],
            State::Reported,
            Some(&o.headline),
            "cases_scored = ?5, cases_failed = ?6, headline = ?7, summary_path = ?8, \
             report_path = ?9, finished_at = ?10, error = NULL",
            &[&scored, &failed, &o.headline, &summary, &report, &t],
        )
    }

    /// `reported -> mailed`.
    ///
    /// # Errors
    /// [`StoreError::Transition`] unless `reported`; SQLite errors.
    pub fn mailed(&mut self, id: i64, note: &str) -> Result<Submission, StoreError> {
        self.transition(id, &[State::Reported], State::Mailed, Some(note), "", &[])
    }

    /// The admin asks for an evaluation again (`evald requeue ID`): from any final state
    /// (or `seen`) to the end of the queue, even if the same model was evaluated before.
    ///
    /// # Errors
    /// [`StoreError::Transition`] when it is queued or running already; SQLite errors.
    pub fn requeue(&mut self, id: i64) -> Result<Submission, StoreError> {
        self.transition(
            id,
            &[
                State::Seen,
                State::Reported,
                State::Mailed,
                State::Rejected,
                State::Failed,
            ],
            State::Queued,
            Some("requeued by the admin"),
            "queue_seq = (SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM submissions), \
             attempts = 0, error = NULL, reject_code = NULL, finished_at = NULL",
            &[],
        )
    }

    /// Remember the folder's latest fingerprint on an existing submission (files changed
    /// but not the model: nothing to evaluate).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fingerprint(&mut self, id: i64, fingerprint: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE submissions SET fingerprint = ?1, updated_at = ?2 WHERE id = ?3",
                params![fingerprint, now(), id],
            )
            .map_err(self.sql("recording a fingerprint"))?;
        Ok(())
    }

    /// Count of submissions per state.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let what = "counting submissions";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM submissions GROUP BY state")
            .map_err(self.sql(what))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql(what))?;
        Ok(State::ALL
            .iter()
            .map(|&st| {
                let n = rows
                    .iter()
                    .find(|(s, _)| s == st.as_str())
                    .map_or(0, |(_, n)| (*n).max(0) as u64);
                (st, n)
            })
            .collect())
    }

    /// Counts per state of the mail outbox, when its table exists (it belongs to the
    /// mail module): `(table, [(state, n)])`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_counts(&self) -> Result<Option<OutboxCounts>, StoreError> {
        let what = "reading the outbox";
        let table: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%outbox%' \
                 ORDER BY name LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql(what))?;
        let Some(table) = table else { return Ok(None) };
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        let columns: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare(&format!("PRAGMA table_info({quoted})"))
                .map_err(self.sql(what))?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(1))
                .map_err(self.sql(what))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(self.sql(what))?;
            names
        };
        let state_col = ["state", "status"]
            .into_iter()
            .find(|c| columns.iter().any(|n| n == c));
        let counts = match state_col {
            Some(c) => {
                let mut stmt = self
                    .conn
                    .prepare(&format!(
                        "SELECT CAST({c} AS TEXT), COUNT(*) FROM {quoted} GROUP BY {c} ORDER BY 1"
                    ))
                    .map_err(self.sql(what))?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                            r.get::<_, i64>(1)?.max(0) as u64,
                        ))
                    })
                    .map_err(self.sql(what))?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(self.sql(what))?;
                rows
            }
            None => {
                let n: i64 = self
                    .conn
                    .query_row(&format!("SELECT COUNT(*) FROM {quoted}"), [], |r| r.get(0))
                    .map_err(self.sql(what))?;
                vec![("messages".to_string(), n.max(0) as u64)]
            }
        };
        Ok(Some((table, counts)))
    }

    /// A trivial query: the store thread and the database answer (watchdog).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("SELECT 1", [], |_| Ok(()))
            .map_err(self.sql("pinging"))
    }

    /// SQLite's own consistency check (`ok` when healthy).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(self.sql("checking integrity"))
    }

    /// Write the WAL back into the database file (on shutdown).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(self.sql("checkpointing"))
    }
}

/// One log line per state change, with the submission's identity.
fn log_change(s: &Submission, from: Option<State>, note: Option<&str>) {
    let from = from.map_or("-", State::as_str);
    let note = note.unwrap_or("");
    match s.state {
        State::Rejected | State::Failed => tracing::warn!(
            id = s.id,
            task = %s.task,
            vendor = %s.vendor,
            name = %s.name,
            from,
            to = s.state.as_str(),
            note,
            "submission {}",
            s.state
        ),
        _ => tracing::info!(
            id = s.id,
            task = %s.task,
            vendor = %s.vendor,
            name = %s.name,
            from,
            to = s.state.as_str(),
            note,
            "submission {}",
            s.state
        ),
    }
}

type Job = Box<dyn FnOnce(&mut Store) + Send>;

enum Msg {
    Job(Job),
    Close,
}

/// A cheap, cloneable handle to a [`Store`] running on its own thread, so that SQLite is
/// never called on the async runtime.
#[derive(Clone)]
pub struct StoreHandle {
    tx: std::sync::mpsc::Sender<Msg>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHandle")
    }
}

/// The store thread; [`StoreThread::close`] checkpoints and joins it.
#[derive(Debug)]
pub struct StoreThread {
    tx: std::sync::mpsc::Sender<Msg>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// Move `store` onto a dedicated thread.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn(store: Store) -> std::io::Result<(StoreHandle, StoreThread)> {
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let join = std::thread::Builder::new()
        .name("evald-store".into())
        .spawn(move || {
            let mut store = store;
            while let Ok(msg) = rx.recv() {
                match msg {
                    Msg::Job(job) => job(&mut store),
                    Msg::Close => break,
                }
            }
            if let Err(e) = store.checkpoint() {
                tracing::warn!("{e}");
            }
        })?;
    Ok((
        StoreHandle { tx: tx.clone() },
        StoreThread {
            tx,
            join: Some(join),
        },
    ))
}

impl StoreHandle {
    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<R, StoreError>>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Job(Box::new(move |s| {
                let _ = tx.send(f(s));
            })))
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Run `f` on the store thread and wait for it (async).
    ///
    /// # Errors
    /// What `f` returns, or [`StoreError::Closed`].
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(f)?.await.map_err(|_| StoreError::Closed)?
    }

    /// Run `f` on the store thread and wait for it, from a blocking thread (never from the
    /// async runtime).
    ///
    /// # Errors
    /// What `f` returns, or [`StoreError::Closed`].
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(f)?
            .blocking_recv()
            .map_err(|_| StoreError::Closed)?
    }

    /// Run `f` on the store thread without waiting (progress counters); errors are logged.
    pub fn send(&self, f: impl FnOnce(&mut Store) -> Result<(), StoreError> + Send + 'static) {
        let job: Job = Box::new(move |s| {
            if let Err(e) = f(s) {
                tracing::warn!("{e}");
            }
        });
        if self.tx.send(Msg::Job(job)).is_err() {
            tracing::debug!("store closed; dropped an update");
        }
    }
}

impl StoreThread {
    /// Finish queued work, checkpoint the WAL and stop the thread.
    pub fn close(mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(j) = self.join.take() {
            if j.join().is_err() {
                tracing::error!("the store thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(path: &str) -> NewSubmission {
        NewSubmission {
            path: PathBuf::from(path),
            task: "t".into(),
            vendor: "v".into(),
            name: "n".into(),
            fingerprint: "fp".into(),
        }
    }

    #[test]
    fn states_move_only_along_the_allowed_edges_and_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = s.insert(&new("/d/t/v/a")).unwrap();
        assert_eq!(a.state, State::Seen);
        assert!(matches!(s.start(a.id), Err(StoreError::Transition { .. })));
        s.queue(a.id, "abc", 10).unwrap();
        let b = s.insert(&new("/d/t/v/b")).unwrap();
        s.queue(b.id, "def", 10).unwrap();
        assert_eq!(s.next_queued().unwrap().unwrap().id, a.id, "FIFO");
        let r = s.start(a.id).unwrap();
        assert_eq!((r.state, r.attempts), (State::Running, 1));
        s.progress(a.id, 1, 3).unwrap();
        assert_eq!(s.get(a.id).unwrap().progress_done, 1);
        assert_eq!(s.next_queued().unwrap().unwrap().id, b.id);
        let out = ReportedOutcome {
            cases_scored: 3,
            cases_failed: 0,
            headline: "Dice 0.9".into(),
            summary_path: "/x/summary.json".into(),
            report_path: "/x/report.xlsx".into(),
        };
        s.reported(a.id, &out).unwrap();
        s.mailed(a.id, "queued in the outbox").unwrap();
        let h: Vec<State> = s.history(a.id).unwrap().iter().map(|t| t.to).collect();
        assert_eq!(
            h,
            [
                State::Seen,
                State::Queued,
                State::Running,
                State::Reported,
                State::Mailed
            ]
        );
        // The admin asks again: back at the end of the queue.
        s.requeue(a.id).unwrap();
        assert_eq!(s.next_queued().unwrap().unwrap().id, b.id);
        assert!(matches!(
            s.requeue(a.id),
            Err(StoreError::Transition { .. })
        ));
    }

    #[test]
    fn running_goes_back_to_queued_on_recovery_and_keeps_its_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            for p in ["/a", "/b"] {
                let x = s.insert(&new(p)).unwrap();
                s.queue(x.id, p, 1).unwrap();
            }
            s.start(1).unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        let rec = s.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(s.next_queued().unwrap().unwrap().id, 1);
        assert_eq!(s.get(1).unwrap().attempts, 1, "attempts are kept");
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn same_model_elsewhere_ignores_rejected_and_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = s.insert(&new("/a")).unwrap();
        s.queue(a.id, "sha", 1).unwrap();
        assert_eq!(
            s.same_model_elsewhere("t", "sha", Path::new("/b"))
                .unwrap()
                .map(|x| x.id),
            Some(a.id)
        );
        assert!(s
            .same_model_elsewhere("t", "sha", Path::new("/a"))
            .unwrap()
            .is_none());
        s.fail(a.id, "x").unwrap();
        assert!(s
            .same_model_elsewhere("t", "sha", Path::new("/b"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute(
            "UPDATE evald_schema SET version = 99 WHERE component = ?1",
            [COMPONENT],
        )
        .unwrap();
        drop(c);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }

    #[test]
    fn outbox_counts_read_whatever_outbox_table_exists() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.outbox_counts().unwrap().is_none());
        s.conn
            .execute_batch(
                "CREATE TABLE mail_outbox (id INTEGER PRIMARY KEY, state TEXT);
                 INSERT INTO mail_outbox (state) VALUES ('sent'), ('pending'), ('sent');",
            )
            .unwrap();
        let (t, c) = s.outbox_counts().unwrap().unwrap();
        assert_eq!(t, "mail_outbox");
        assert_eq!(c, vec![("pending".into(), 1), ("sent".into(), 2)]);
    }
}
