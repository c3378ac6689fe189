//! The durable record of every submission: an embedded SQLite database at
//! `<state_dir>/evald.db` (WAL, `busy_timeout`, `synchronous = FULL`).
//!
//! It owns the `submissions` table (one row per evaluation of a folder's content: path,
//! task, vendor, model sha256, state, attempts, progress, outcome, timestamps),
//! `submission_events` (every state change, for audit and `evald status`) and, since
//! schema version 2, the results of each reported evaluation: `submission_results` and
//! `submission_failures` (see [`StoredResults`]); since version 3, every scored case's
//! metric values, `submission_cases`, for paired comparisons. The mail outbox lives in the same file in
//! its own tables, owned (schema and counts) by [`crate`]'s mail module; this module never
//! looks at them.
//!
//! Results layout, and why: the keys a comparison or a query needs (model sha256, test-set
//! hash, cases scored/failed, stopped early, evald version, when) are columns; the
//! statistics (per class and metric: n, mean, std, median, quartiles, range, CI) are one
//! JSON document with its own format number, because their shape follows the metric set
//! (it grows with METRICS.md; a table per statistic would need a migration per metric) and
//! they are always read whole; failed cases are rows of their own (case, stage, reason,
//! attempts) because a list view filters and counts them. Per-case values (version 3) are
//! one row per case with a JSON document of its metrics per class and its patient-level
//! call ([`CaseValues`], format [`CASE_VALUES_FORMAT`]), for the same reason as the
//! statistics; `submission_results.case_values_format` says they were kept (NULL: reported
//! by a version-2 evald, which kept none, so no paired comparison). The results are written in the
//! same transaction that marks the submission `reported`, so a reported submission always
//! has them (rows reported by a version-1 store have none: [`Store::results`] is `None`).
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

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

use crate::evaluation::compare::{CaseValues, Side};
use crate::evaluation::{Evaluation, Failure};
use crate::metrics::aggregate::{Metric, Stats};

/// Database file name inside `state_dir`.
pub const DB_FILE: &str = "evald.db";
/// Component name of this module's tables in `evald_schema`.
pub const COMPONENT: &str = "submissions";
/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = 3;
/// Format of the JSON in `submission_results.statistics` ([`Statistics`]).
pub const STATISTICS_FORMAT: i64 = 1;
/// Format of the JSON in `submission_cases.metrics` ([`CaseValues`]).
pub const CASE_VALUES_FORMAT: i64 = 1;
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
    /// Stored results this build cannot read (a newer format, or a damaged row).
    #[error("{path}: results of submission #{id}: {reason}")]
    Results {
        /// The database file.
        path: PathBuf,
        /// Submission id.
        id: i64,
        /// What is wrong.
        reason: String,
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
    /// What the evaluation found, stored with the state change.
    pub results: EvaluationResults,
}

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

/// `f64` as JSON: undefined values (NaN) are `null`, as in `summary.json`, and read back as
/// NaN (serde_json writes NaN as `null` but refuses `null` for an `f64`).
mod nan_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    /// The same for the values of a map.
    pub mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        use crate::metrics::aggregate::Metric;

        pub fn serialize<S: Serializer>(
            m: &BTreeMap<Metric, f64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let o: BTreeMap<&Metric, Option<f64>> = m
                .iter()
                .map(|(k, v)| (k, v.is_finite().then_some(*v)))
                .collect();
            o.serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<Metric, f64>, D::Error> {
            let o = BTreeMap::<Metric, Option<f64>>::deserialize(d)?;
            Ok(o.into_iter()
                .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                .collect())
        }
    }
}

/// Statistics of one metric over cases, as stored (NaN: undefined).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredStats {
    /// Cases with a value (defined or NaN).
    pub n: usize,
    /// Of those, undefined.
    pub n_nan: usize,
    /// Mean of the defined values.
    #[serde(with = "nan_null")]
    pub mean: f64,
    /// Sample standard deviation.
    #[serde(with = "nan_null")]
    pub std: f64,
    /// Median.
    #[serde(with = "nan_null")]
    pub median: f64,
    /// 25th percentile.
    #[serde(with = "nan_null")]
    pub p25: f64,
    /// 75th percentile.
    #[serde(with = "nan_null")]
    pub p75: f64,
    /// Smallest value.
    #[serde(with = "nan_null")]
    pub min: f64,
    /// Largest value.
    #[serde(with = "nan_null")]
    pub max: f64,
    /// 95% bootstrap CI of the mean, lower end.
    #[serde(with = "nan_null")]
    pub ci95_low: f64,
    /// Upper end.
    #[serde(with = "nan_null")]
    pub ci95_high: f64,
}

impl From<&Stats> for StoredStats {
    fn from(s: &Stats) -> Self {
        StoredStats {
            n: s.n,
            n_nan: s.n_nan,
            mean: s.mean,
            std: s.std,
            median: s.median,
            p25: s.p25,
            p75: s.p75,
            min: s.min,
            max: s.max,
            ci95_low: s.ci95_low,
            ci95_high: s.ci95_high,
        }
    }
}

/// A class of the task as it was evaluated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredClass {
    /// Label value.
    pub label: u8,
    /// Name.
    pub name: String,
}

/// Patient-level diagnosis, as stored.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredPatient {
    /// The class whose presence makes a patient positive.
    pub positive_class: u8,
    /// Minimum volume (mm^3) for a positive call.
    pub min_positive_mm3: f64,
    /// Reference positive, predicted positive.
    pub tp: u32,
    /// Reference negative, predicted positive.
    pub fp: u32,
    /// Reference positive, predicted negative.
    #[serde(rename = "fn")]
    pub fn_: u32,
    /// Reference negative, predicted negative.
    pub tn: u32,
    /// TP/(TP+FN).
    #[serde(with = "nan_null")]
    pub sensitivity: f64,
    /// TN/(TN+FP).
    #[serde(with = "nan_null")]
    pub specificity: f64,
    /// TP/(TP+FP).
    #[serde(with = "nan_null")]
    pub ppv: f64,
    /// TN/(TN+FN).
    #[serde(with = "nan_null")]
    pub npv: f64,
    /// (TP+TN)/all.
    #[serde(with = "nan_null")]
    pub accuracy: f64,
}

/// The statistics of an evaluation: the JSON document of `submission_results.statistics`
/// (format [`STATISTICS_FORMAT`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Statistics {
    /// The task's classes, in the task's order.
    pub classes: Vec<StoredClass>,
    /// Per class label: metric key (`Dice`, `IoU`, `HD95`, `NSD`, ...) -> statistics, for
    /// every metric the evaluation computed.
    pub per_class: BTreeMap<u8, BTreeMap<Metric, StoredStats>>,
    /// nnU-Net's `foreground_mean`: metric key -> mean over classes of the class means.
    #[serde(with = "nan_null::map")]
    pub foreground_mean: BTreeMap<Metric, f64>,
    /// Statistics over cases of each case's mean over classes.
    pub foreground: BTreeMap<Metric, StoredStats>,
    /// Patient-level diagnosis, when the task names a positive class.
    pub patient: Option<StoredPatient>,
}

/// What one evaluation found, as the store keeps it: written by [`Store::reported`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationResults {
    /// sha256 of the model evaluated.
    pub model_sha256: Option<String>,
    /// Content hash of the test set scored ([`crate::dataset::manifest_hash`]): two
    /// evaluations are comparable exactly when these are equal.
    pub testset_hash: String,
    /// Cases scored.
    pub cases_scored: u64,
    /// Cases that failed (listed in `failures`).
    pub cases_failed: u64,
    /// Why the evaluation stopped before every case ran.
    pub stopped_early: Option<String>,
    /// The evald version that evaluated.
    pub evald_version: String,
    /// Per-class statistics and patient-level counts.
    pub statistics: Statistics,
    /// Failed cases, by case id.
    pub failures: Vec<Failure>,
    /// Every scored case's metric values, by case id; `None` when the evaluation was
    /// reported by an evald that kept none (store version 2).
    pub cases: Option<Vec<CaseValues>>,
}

impl EvaluationResults {
    /// What the store keeps of `eval`.
    pub fn of(eval: &Evaluation) -> Self {
        let s = &eval.summary;
        let stats = |m: &BTreeMap<Metric, Stats>| {
            m.iter()
                .map(|(k, v)| (*k, StoredStats::from(v)))
                .collect::<BTreeMap<_, _>>()
        };
        EvaluationResults {
            model_sha256: eval.meta.model_sha256.clone(),
            testset_hash: eval.meta.dataset_hash.clone(),
            cases_scored: eval.cases.len() as u64,
            cases_failed: eval.failures.len() as u64,
            stopped_early: eval.meta.stopped_early.clone(),
            evald_version: eval.meta.evald_version.clone(),
            statistics: Statistics {
                classes: eval
                    .spec
                    .classes
                    .iter()
                    .map(|c| StoredClass {
                        label: c.label,
                        name: c.name.clone(),
                    })
                    .collect(),
                per_class: s.per_class.iter().map(|(l, m)| (*l, stats(m))).collect(),
                foreground_mean: s.foreground_mean.clone(),
                foreground: stats(&s.foreground),
                patient: s.patient.as_ref().map(|p| StoredPatient {
                    positive_class: p.positive_class,
                    min_positive_mm3: p.min_positive_mm3,
                    tp: p.tp,
                    fp: p.fp,
                    fn_: p.fn_,
                    tn: p.tn,
                    sensitivity: p.sensitivity,
                    specificity: p.specificity,
                    ppv: p.ppv,
                    npv: p.npv,
                    accuracy: p.accuracy,
                }),
            },
            failures: eval.failures.clone(),
            cases: Some(crate::evaluation::compare::case_values(eval)),
        }
    }

    /// This evaluation as one side of a paired comparison, named `name`; `None` when its
    /// per-case values were not kept.
    pub fn side(&self, name: impl Into<String>) -> Option<Side> {
        let st = &self.statistics;
        Some(Side {
            name: name.into(),
            testset_hash: self.testset_hash.clone(),
            classes: st
                .classes
                .iter()
                .map(|c| (c.label, c.name.clone()))
                .collect(),
            patient: st.patient.map(|p| (p.positive_class, p.min_positive_mm3)),
            cases: self.cases.clone()?,
            failures: self
                .failures
                .iter()
                .map(|f| (f.case.clone(), f.stage))
                .collect(),
        })
    }

    /// Mean of `key` for class `label` over the scored cases (NaN when undefined or not
    /// computed).
    pub fn mean(&self, label: u8, metric: Metric) -> f64 {
        self.statistics
            .per_class
            .get(&label)
            .and_then(|m| m.get(&metric))
            .map_or(f64::NAN, |s| s.mean)
    }

    /// Whether `other` scored the same test-set bytes (so their numbers can be compared).
    pub fn comparable_with(&self, other: &EvaluationResults) -> bool {
        !self.testset_hash.is_empty() && self.testset_hash == other.testset_hash
    }
}

/// The results of a submission's last reported evaluation, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResults {
    /// Submission id.
    pub submission: i64,
    /// Which requested evaluation of it ([`Submission::queue_seq`] when it was reported).
    pub queue_seq: Option<i64>,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
    /// What it found.
    pub results: EvaluationResults,
}

/// The submissions database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Schema version of the open file (lower than [`SCHEMA_VERSION`] only when opened
    /// read-only: then there are no results tables to read).
    schema: i64,
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

/// Version 1 -> 2: the results of each reported evaluation (see the module documentation
/// for the layout). One row per submission: a re-evaluation (`evald requeue`) replaces it,
/// `queue_seq` says which evaluation it is.
const SCHEMA_V2: &str = "
CREATE TABLE submission_results (
    submission        INTEGER PRIMARY KEY REFERENCES submissions(id),
    queue_seq         INTEGER,
    reported_at       TEXT NOT NULL,
    model_sha256      TEXT,
    testset_hash      TEXT NOT NULL,
    cases_scored      INTEGER NOT NULL,
    cases_failed      INTEGER NOT NULL,
    stopped_early     TEXT,
    evald_version     TEXT NOT NULL,
    statistics_format INTEGER NOT NULL,
    statistics        TEXT NOT NULL
);
CREATE INDEX submission_results_testset ON submission_results(testset_hash);
CREATE TABLE submission_failures (
    submission INTEGER NOT NULL REFERENCES submissions(id),
    case_id    TEXT NOT NULL,
    stage      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    PRIMARY KEY (submission, case_id)
);
";

/// Version 2 -> 3: every scored case's metric values (see the module documentation).
/// Existing results keep `case_values_format` NULL: their cases were not kept.
const SCHEMA_V3: &str = "
ALTER TABLE submission_results ADD COLUMN case_values_format INTEGER;
CREATE TABLE submission_cases (
    submission INTEGER NOT NULL REFERENCES submissions(id),
    case_id    TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    PRIMARY KEY (submission, case_id)
);
";

/// The migration from each version to the next: `MIGRATIONS[v - 1]` takes version `v` to
/// `v + 1`, in the transaction that records the new version.
const MIGRATIONS: [&str; 2] = [SCHEMA_V2, SCHEMA_V3];

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

/// The schema version a component (`submissions`, the mail outbox, ...) recorded in the
/// shared `evald_schema` table; `None` when it recorded none, or when the file has no
/// such table yet (nothing of evald's in it).
///
/// # Errors
/// The query failed for another reason.
pub fn schema_version(conn: &Connection, component: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT version FROM evald_schema WHERE component = ?1",
        [component],
        |r| r.get(0),
    )
    .optional()
    .or_else(|e| match e {
        rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => Ok(None),
        e => Err(e),
    })
}

/// Open an existing database file (never creating it) with `mode` (read-write or
/// read-only); one connection per thread, so no SQLite mutex.
fn open_file(path: &Path, mode: OpenFlags) -> Result<Connection, StoreError> {
    Connection::open_with_flags(path, mode | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(|source| {
        StoreError::Sql {
            path: path.to_path_buf(),
            what: "cannot open",
            source,
        }
    })
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
        let mut store = Store {
            conn,
            path,
            schema: SCHEMA_VERSION,
        };
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
        let conn = open_file(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let mut store = Store {
            conn,
            path,
            schema: SCHEMA_VERSION,
        };
        store.configure()?;
        store.migrate()?;
        Ok(Some(store))
    }

    /// Open an existing database read-only, changing nothing in it (no migration): for
    /// `evald run`, which only looks up the previous submission. `Ok(None)` when there is
    /// no database or it has no submissions table yet. A version-1 file reads as having no
    /// results.
    ///
    /// # Errors
    /// [`StoreError`] when the file exists but cannot be read, or was written by a newer
    /// evald.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Store>, StoreError> {
        let path = state_dir.join(DB_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let conn = open_file(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql_error(&path, "setting busy_timeout"))?;
        let found = schema_version(&conn, COMPONENT)
            .map_err(sql_error(&path, "reading the schema version"))?;
        match found {
            None => Ok(None),
            Some(v) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema { path, found: v }),
            Some(v) => Ok(Some(Store {
                conn,
                path,
                schema: v,
            })),
        }
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

    /// The connection, read-only use (another component's counts for `evald status`).
    pub fn connection_ref(&self) -> &Connection {
        &self.conn
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
        // The usual case, an up-to-date file, takes no write lock and writes nothing:
        // `evald status` and the tests' observers open the store while the daemon writes.
        let current =
            schema_version(&self.conn, COMPONENT).map_err(sql("reading the schema version"))?;
        if current == Some(SCHEMA_VERSION) {
            self.schema = SCHEMA_VERSION;
            return Ok(());
        }
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
        let mut version = match found {
            None => {
                tx.execute_batch(SCHEMA_V1)
                    .map_err(sql("creating the submissions tables"))?;
                tx.execute(
                    "INSERT INTO evald_schema (component, version) VALUES (?1, 1)",
                    [COMPONENT],
                )
                .map_err(sql("recording the schema version"))?;
                1
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::NewerSchema { path, found: v });
            }
            Some(v) => v,
        };
        let from = version;
        // In place, one step per version, all in this transaction: a crash leaves the old
        // version intact, and every existing row is kept as it is.
        while version < SCHEMA_VERSION {
            let step = usize::try_from(version - 1).unwrap_or(usize::MAX);
            let Some(ddl) = MIGRATIONS.get(step) else {
                return Err(StoreError::NewerSchema {
                    path,
                    found: version,
                });
            };
            tx.execute_batch(ddl)
                .map_err(sql("migrating the submissions tables"))?;
            version += 1;
        }
        if version != from {
            tx.execute(
                "UPDATE evald_schema SET version = ?2 WHERE component = ?1",
                params![COMPONENT, version],
            )
            .map_err(sql("recording the schema version"))?;
        }
        tx.commit().map_err(sql("committing the schema"))?;
        if found.is_some() && from < version {
            tracing::info!(db = %self.path.display(), from, to = version, "store schema migrated");
        }
        self.schema = version;
        Ok(())
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
        self.transition_with(id, from, to, note, set, values, |_| Ok(()))
    }

    /// [`Store::transition`], also running `also` inside the same transaction (after the
    /// state change): what it writes commits with the state, or not at all.
    #[allow(clippy::too_many_arguments)]
    fn transition_with(
        &mut self,
        id: i64,
        from: &[State],
        to: State,
        note: Option<&str>,
        set: &str,
        values: &[&dyn rusqlite::ToSql],
        also: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
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
        also(&tx).map_err(&err)?;
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
        let statistics =
            serde_json::to_string(&o.results.statistics).map_err(|e| StoreError::Results {
                path: self.path.clone(),
                id,
                reason: format!("cannot encode the statistics: {e}"),
            })?;
        let r = &o.results;
        let case_json = r
            .cases
            .as_ref()
            .map(|cases| {
                cases
                    .iter()
                    .map(|c| Ok((c.case.as_str(), serde_json::to_string(c)?)))
                    .collect::<Result<Vec<_>, serde_json::Error>>()
            })
            .transpose()
            .map_err(|e| StoreError::Results {
                path: self.path.clone(),
                id,
                reason: format!("cannot encode the per-case values: {e}"),
            })?;
        let at = t.clone();
        self.transition_with(
            id,
            &[State::Running],
            State::Reported,
            Some(&o.headline),
            "cases_scored = ?5, cases_failed = ?6, headline = ?7, summary_path = ?8, \
             report_path = ?9, finished_at = ?10, error = NULL",
            &[&scored, &failed, &o.headline, &summary, &report, &t],
            |tx| {
                tx.execute(
                    "INSERT OR REPLACE INTO submission_results (submission, queue_seq, \
                     reported_at, model_sha256, testset_hash, cases_scored, cases_failed, \
                     stopped_early, evald_version, statistics_format, statistics) \
                     VALUES (?1, (SELECT queue_seq FROM submissions WHERE id = ?1), ?2, ?3, \
                     ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        id,
                        at,
                        r.model_sha256,
                        r.testset_hash,
                        r.cases_scored as i64,
                        r.cases_failed as i64,
                        r.stopped_early,
                        r.evald_version,
                        STATISTICS_FORMAT,
                        statistics
                    ],
                )?;
                tx.execute(
                    "DELETE FROM submission_failures WHERE submission = ?1",
                    [id],
                )?;
                let mut ins = tx.prepare_cached(
                    "INSERT INTO submission_failures (submission, case_id, stage, reason, \
                     attempts) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for f in &r.failures {
                    ins.execute(params![id, f.case, f.stage.as_str(), f.reason, f.attempts])?;
                }
                tx.execute("DELETE FROM submission_cases WHERE submission = ?1", [id])?;
                if let Some(cases) = &case_json {
                    tx.execute(
                        "UPDATE submission_results SET case_values_format = ?2 \
                         WHERE submission = ?1",
                        params![id, CASE_VALUES_FORMAT],
                    )?;
                    let mut ins = tx.prepare_cached(
                        "INSERT INTO submission_cases (submission, case_id, metrics) \
                         VALUES (?1, ?2, ?3)",
                    )?;
                    for (case, json) in cases {
                        ins.execute(params![id, case, json])?;
                    }
                }
                Ok(())
            },
        )
    }

    /// The results of a submission's last reported evaluation; `None` when it was never
    /// reported (or was reported by a version-1 store, before results were kept).
    ///
    /// # Errors
    /// [`StoreError::Results`] for a row this build cannot read; SQLite errors.
    pub fn results(&self, id: i64) -> Result<Option<StoredResults>, StoreError> {
        if self.schema < 2 {
            return Ok(None);
        }
        let what = "reading results";
        type Raw = (
            Option<i64>,
            String,
            Option<String>,
            String,
            i64,
            i64,
            Option<String>,
            String,
            i64,
            String,
        );
        let raw: Option<Raw> = self
            .conn
            .query_row(
                "SELECT queue_seq, reported_at, model_sha256, testset_hash, cases_scored, \
                 cases_failed, stopped_early, evald_version, statistics_format, statistics \
                 FROM submission_results WHERE submission = ?1",
                [id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                },
            )
            .optional()
            .map_err(self.sql(what))?;
        let Some((seq, at, model, testset, scored, failed, stopped, version, format, stats)) = raw
        else {
            return Ok(None);
        };
        let bad = |reason: String| StoreError::Results {
            path: self.path.clone(),
            id,
            reason,
        };
        if format != STATISTICS_FORMAT {
            return Err(bad(format!(
                "statistics format {format}, this evald reads {STATISTICS_FORMAT} (written by \
                 a newer evald?)"
            )));
        }
        let statistics: Statistics =
            serde_json::from_str(&stats).map_err(|e| bad(format!("unreadable statistics: {e}")))?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT case_id, stage, reason, attempts FROM submission_failures \
                 WHERE submission = ?1 ORDER BY case_id",
            )
            .map_err(self.sql(what))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(self.sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql(what))?;
        let failures = rows
            .into_iter()
            .map(|(case, stage, reason, attempts)| {
                let stage = serde_json::from_value(serde_json::Value::String(stage.clone()))
                    .map_err(|_| bad(format!("case {case}: unknown stage '{stage}'")))?;
                Ok(Failure {
                    case,
                    stage,
                    reason,
                    attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let cases = self.case_values(id)?;
        Ok(Some(StoredResults {
            submission: id,
            queue_seq: seq,
            reported_at: at,
            results: EvaluationResults {
                model_sha256: model,
                testset_hash: testset,
                cases_scored: scored.max(0) as u64,
                cases_failed: failed.max(0) as u64,
                stopped_early: stopped,
                evald_version: version,
                statistics,
                failures,
                cases,
            },
        }))
    }

    /// The per-case values kept for submission `id`'s results (`None`: not kept).
    fn case_values(&self, id: i64) -> Result<Option<Vec<CaseValues>>, StoreError> {
        if self.schema < 3 {
            return Ok(None);
        }
        let what = "reading per-case values";
        let format: Option<i64> = self
            .conn
            .query_row(
                "SELECT case_values_format FROM submission_results WHERE submission = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql(what))?
            .flatten();
        let Some(format) = format else {
            return Ok(None);
        };
        let bad = |reason: String| StoreError::Results {
            path: self.path.clone(),
            id,
            reason,
        };
        if format != CASE_VALUES_FORMAT {
            return Err(bad(format!(
                "per-case values format {format}, this evald reads {CASE_VALUES_FORMAT} \
                 (written by a newer evald?)"
            )));
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT case_id, metrics FROM submission_cases WHERE submission = ?1 \
                 ORDER BY case_id",
            )
            .map_err(self.sql(what))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.sql(what))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql(what))?;
        rows.into_iter()
            .map(|(case, json)| {
                serde_json::from_str::<CaseValues>(&json)
                    .map_err(|e| bad(format!("case {case}: unreadable values: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The vendor's previous reported submission of the same task, with its results: the
    /// newest other `reported` or `mailed` submission of `id`'s task and vendor that has
    /// results and was reported before `id` (any time, when `id` has no results yet).
    ///
    /// # Errors
    /// [`StoreError::NoSuchSubmission`], [`StoreError::Results`]; SQLite errors.
    pub fn previous_results(
        &self,
        id: i64,
    ) -> Result<Option<(Submission, StoredResults)>, StoreError> {
        let me = self.get(id)?;
        let before = self.results(id)?.map(|r| r.reported_at);
        self.previous_of(&me.task, &me.vendor, Some(id), None, before.as_deref())
    }

    /// The newest reported submission of `task` by `vendor` with results, other than the
    /// folder `except` (`evald run` on a folder the store may know too).
    ///
    /// # Errors
    /// [`StoreError::Results`]; SQLite errors.
    pub fn latest_results_of(
        &self,
        task: &str,
        vendor: &str,
        except: &Path,
    ) -> Result<Option<(Submission, StoredResults)>, StoreError> {
        self.previous_of(task, vendor, None, Some(except), None)
    }

    fn previous_of(
        &self,
        task: &str,
        vendor: &str,
        except_id: Option<i64>,
        except_path: Option<&Path>,
        before: Option<&str>,
    ) -> Result<Option<(Submission, StoredResults)>, StoreError> {
        if self.schema < 2 {
            return Ok(None);
        }
        let id: Option<i64> = self
            .conn
            .query_row(
                "SELECT s.id FROM submissions s JOIN submission_results r ON r.submission = s.id \
                 WHERE s.task = ?1 AND s.vendor = ?2 AND s.state IN ('reported','mailed') \
                 AND (?3 IS NULL OR s.id <> ?3) AND (?4 IS NULL OR s.path <> ?4) \
                 AND (?5 IS NULL OR r.reported_at < ?5) \
                 ORDER BY r.reported_at DESC, s.id DESC LIMIT 1",
                params![task, vendor, except_id, except_path.map(path_str), before],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("looking for the previous submission"))?;
        let Some(id) = id else { return Ok(None) };
        match self.results(id)? {
            Some(r) => Ok(Some((self.get(id)?, r))),
            None => Ok(None),
        }
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

    fn stats(mean: f64) -> StoredStats {
        StoredStats {
            n: 3,
            n_nan: 1,
            mean,
            std: f64::NAN,
            median: mean,
            p25: mean,
            p75: mean,
            min: mean,
            max: mean,
            ci95_low: f64::NAN,
            ci95_high: mean,
        }
    }

    fn results(dice: f64, testset: &str) -> EvaluationResults {
        EvaluationResults {
            model_sha256: Some(format!("sha-{dice}")),
            testset_hash: testset.into(),
            cases_scored: 3,
            cases_failed: 1,
            stopped_early: Some("budget".into()),
            evald_version: "0.1.0".into(),
            statistics: Statistics {
                classes: vec![StoredClass {
                    label: 1,
                    name: "thyroid".into(),
                }],
                per_class: BTreeMap::from([(
                    1,
                    BTreeMap::from([(Metric::Dice, stats(dice)), (Metric::Hd95, stats(f64::NAN))]),
                )]),
                foreground_mean: BTreeMap::from([(Metric::Dice, dice), (Metric::Hd95, f64::NAN)]),
                foreground: BTreeMap::from([(Metric::Dice, stats(dice))]),
                patient: Some(StoredPatient {
                    positive_class: 1,
                    min_positive_mm3: 10.0,
                    tp: 2,
                    fp: 0,
                    fn_: 1,
                    tn: 0,
                    sensitivity: 2.0 / 3.0,
                    specificity: f64::NAN,
                    ppv: 1.0,
                    npv: 0.0,
                    accuracy: 2.0 / 3.0,
                }),
            },
            failures: vec![Failure {
                case: "c9".into(),
                stage: crate::evaluation::Stage::Timeout,
                reason: "took too long".into(),
                attempts: 2,
            }],
            cases: Some(vec![CaseValues {
                case: "c1".into(),
                classes: BTreeMap::from([(
                    1,
                    BTreeMap::from([(Metric::Dice, dice), (Metric::Hd95, f64::NAN)]),
                )]),
                patient: Some((true, true)),
            }]),
        }
    }

    fn outcome(results: EvaluationResults) -> ReportedOutcome {
        ReportedOutcome {
            cases_scored: results.cases_scored,
            cases_failed: results.cases_failed,
            headline: "Dice 0.9".into(),
            summary_path: "/x/summary.json".into(),
            report_path: "/x/report.xlsx".into(),
            results,
        }
    }

    /// Same NaN positions and values (NaN != NaN, so `==` cannot say it).
    fn same(a: &EvaluationResults, b: &EvaluationResults) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    fn report(s: &mut Store, path: &str, vendor: &str, dice: f64, testset: &str) -> i64 {
        let mut n = new(path);
        n.vendor = vendor.into();
        let x = s.insert(&n).unwrap();
        s.queue(x.id, &format!("sha-{path}"), 1).unwrap();
        s.start(x.id).unwrap();
        s.reported(x.id, &outcome(results(dice, testset))).unwrap();
        x.id
    }

    #[test]
    fn results_are_written_with_the_reported_state_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let a = s.insert(&new("/d/t/v/a")).unwrap();
        s.queue(a.id, "abc", 10).unwrap();
        assert!(
            s.results(a.id).unwrap().is_none(),
            "none before it is reported"
        );
        s.start(a.id).unwrap();
        let want = results(0.8, "set1");
        let r = s.reported(a.id, &outcome(want.clone())).unwrap();
        let got = s.results(a.id).unwrap().expect("results");
        assert!(same(&got.results, &want), "{:?}\n{want:?}", got.results);
        assert_eq!(got.queue_seq, r.queue_seq);
        assert!(
            got.results.mean(1, Metric::Hd95).is_nan(),
            "undefined stays undefined"
        );
        assert_eq!(
            got.results.failures[0].stage,
            crate::evaluation::Stage::Timeout
        );

        // A refused state change writes no results: they commit with the state or not at all.
        let b = s.insert(&new("/d/t/v/b")).unwrap();
        assert!(matches!(
            s.reported(b.id, &outcome(results(0.1, "set1"))),
            Err(StoreError::Transition { .. })
        ));
        assert!(s.results(b.id).unwrap().is_none());

        // Evaluated again (requeue): the new results replace the old, failures included.
        s.mailed(a.id, "sent").unwrap();
        s.requeue(a.id).unwrap();
        s.start(a.id).unwrap();
        let mut again = results(0.9, "set1");
        again.failures.clear();
        again.cases_failed = 0;
        s.reported(a.id, &outcome(again.clone())).unwrap();
        let got = s.results(a.id).unwrap().unwrap();
        assert!(same(&got.results, &again));
        assert_eq!(got.queue_seq, s.get(a.id).unwrap().queue_seq);
    }

    #[test]
    fn the_previous_submission_is_the_vendors_last_reported_one_of_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let v1 = report(&mut s, "/d/t/acme/v1", "acme", 0.5, "set1");
        assert!(
            s.previous_results(v1).unwrap().is_none(),
            "the first has none"
        );
        let other = report(&mut s, "/d/t/zeta/v1", "zeta", 0.7, "set1");
        let v2 = report(&mut s, "/d/t/acme/v2", "acme", 0.6, "set1");
        let (p, r) = s.previous_results(v2).unwrap().expect("v1");
        assert_eq!((p.id, r.results.mean(1, Metric::Dice)), (v1, 0.5));
        assert!(
            s.previous_results(other).unwrap().is_none(),
            "another vendor's"
        );
        // A rejected or failed later submission is not "previous"; nor is one of
        // another task.
        let x = s.insert(&new("/d/t/acme/v3")).unwrap();
        s.fail(x.id, "broken").unwrap();
        let mut t2 = new("/d/t2/acme/v1");
        t2.task = "t2".into();
        t2.vendor = "acme".into();
        let y = s.insert(&t2).unwrap();
        s.queue(y.id, "q", 1).unwrap();
        s.start(y.id).unwrap();
        s.reported(y.id, &outcome(results(0.99, "set2"))).unwrap();
        let v4 = report(&mut s, "/d/t/acme/v4", "acme", 0.65, "set2");
        let (p, r) = s.previous_results(v4).unwrap().unwrap();
        assert_eq!(p.id, v2);
        assert!(!r
            .results
            .comparable_with(&s.results(v4).unwrap().unwrap().results));
        // For a folder `evald run` evaluates: the newest other reported one.
        let (p, _) = s
            .latest_results_of("t", "acme", Path::new("/d/t/acme/v4"))
            .unwrap()
            .unwrap();
        assert_eq!(p.id, v2);
        let (p, _) = s
            .latest_results_of("t", "acme", Path::new("/d/t/acme/v9"))
            .unwrap()
            .unwrap();
        assert_eq!(p.id, v4);
    }

    #[test]
    fn a_version_1_file_migrates_in_place_and_read_only_opening_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute_batch(
                "CREATE TABLE evald_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
                 INSERT INTO evald_schema VALUES ('submissions', 1);
                 INSERT INTO submissions (path, task, vendor, name, fingerprint, state,
                     created_at, updated_at, headline)
                 VALUES ('/d/t/v/a', 't', 'v', 'a', 'fp', 'mailed', 'x', 'x', 'Dice 0.9');",
            )
            .unwrap();
        }
        // Read-only: a version-1 file has no results, and stays version 1.
        let ro = Store::open_read_only(dir.path()).unwrap().unwrap();
        assert!(ro.results(1).unwrap().is_none());
        assert!(ro.previous_results(1).unwrap().is_none());
        drop(ro);
        let version = |d: &Path| -> i64 {
            Connection::open(d.join(DB_FILE))
                .unwrap()
                .query_row(
                    "SELECT version FROM evald_schema WHERE component = ?1",
                    [COMPONENT],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(version(dir.path()), 1);
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(version(dir.path()), SCHEMA_VERSION);
        let a = s.get(1).unwrap();
        assert_eq!(
            (a.state, a.headline.as_deref()),
            (State::Mailed, Some("Dice 0.9"))
        );
        assert!(
            s.results(1).unwrap().is_none(),
            "reported before results were kept"
        );
        let b = report(&mut s, "/d/t/v/b", "v", 0.5, "set");
        assert!(s.results(b).unwrap().is_some());
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_version_2_file_migrates_in_place_keeping_its_results_without_case_values() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute_batch(SCHEMA_V2).unwrap();
            let stats = serde_json::to_string(&results(0.7, "set").statistics).unwrap();
            c.execute_batch(
                "CREATE TABLE evald_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
                 INSERT INTO evald_schema VALUES ('submissions', 2);
                 INSERT INTO submissions (path, task, vendor, name, fingerprint, state,
                     created_at, updated_at, headline)
                 VALUES ('/d/t/v/a', 't', 'v', 'a', 'fp', 'mailed', 'x', 'x', 'Dice 0.7');",
            )
            .unwrap();
            c.execute(
                "INSERT INTO submission_results (submission, reported_at, testset_hash, \
                 cases_scored, cases_failed, evald_version, statistics_format, statistics) \
                 VALUES (1, '2026-01-01T00:00:00.000Z', 'set', 3, 0, '0.1.0', 1, ?1)",
                [stats],
            )
            .unwrap();
        }
        // Read-only on version 2: its results, no case values, nothing changed.
        let ro = Store::open_read_only(dir.path()).unwrap().unwrap();
        let r = ro.results(1).unwrap().unwrap();
        assert_eq!(
            (r.results.mean(1, Metric::Dice), r.results.cases.is_none()),
            (0.7, true)
        );
        drop(ro);
        let mut s = Store::open(dir.path()).unwrap();
        let r = s.results(1).unwrap().expect("kept through the migration");
        assert_eq!(r.results.mean(1, Metric::Dice), 0.7);
        assert!(
            r.results.cases.is_none(),
            "reported before case values were kept"
        );
        assert!(r.results.side("a").is_none(), "so no paired comparison");
        // A new evaluation keeps its case values, and is paired against nothing older.
        let b = report(&mut s, "/d/t/v/b", "v", 0.8, "set");
        let got = s.results(b).unwrap().unwrap();
        assert!(
            same(&got.results, &results(0.8, "set")),
            "{:?}",
            got.results
        );
        assert_eq!(got.results.side("b").unwrap().cases.len(), 1);
        let (p, pr) = s.previous_results(b).unwrap().unwrap();
        assert_eq!(p.id, 1);
        assert!(pr.results.side(&p.name).is_none());
        assert_eq!(s.integrity_check().unwrap(), "ok");
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
        let out = outcome(results(0.9, "set"));
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
}
