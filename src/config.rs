//! The admin's TOML configuration, in two stages (ripgrep's low/high args):
//!
//! 1. [`RawSettings`]: exactly what the file (plus `EVALD__SECTION__KEY` environment
//!    overrides) says, deserialized by the `config` crate with unknown keys refused;
//! 2. [`Settings`]: validated and resolved (ranges sane, paths present, classes parsed,
//!    tasks' image/label folders paired). [`RawSettings::validate`] reports *every* problem
//!    with its key, which is what `evald check-config` prints.
//!
//! Defaults are embedded, so a file only needs what differs (the demo needs none).
//! Secrets are never stored here: the SMTP password stays in its file and is read when
//! a message is sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::infer::{rules, InputKind, OutputKind, SpecError, Window};
use crate::metrics::{ClassSpec, EvalSpec};

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/evald/evald.toml";

/// Problems found in a configuration, each with its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed (syntax, types, unknown keys).
    #[error("{path}: {message}")]
    Load {
        /// The config file.
        path: PathBuf,
        /// The parser's message (names the key where it can).
        message: String,
    },
    /// The file parsed but values are wrong.
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The config file (or `<embedded>`).
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// One invalid value.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted key, e.g. `tasks.thyroid-ca.labels`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// `[daemon]` as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDaemon {
    /// `<drop_dir>/<task>/<vendor>/<submission>/model.pt`.
    pub drop_dir: PathBuf,
    /// SQLite store and scratch.
    pub state_dir: PathBuf,
    /// Rolling log files.
    pub log_dir: PathBuf,
    /// A submission is complete when nothing in it changed for this long.
    pub settle_secs: u64,
    /// Full rescan period (missed events, network mounts).
    pub rescan_secs: u64,
    /// `native` (inotify) or `poll` (NFS/SMB).
    pub watch: String,
    /// `text` or `json` log lines.
    pub log_format: String,
    /// Daily log files kept.
    pub log_keep_days: usize,
    /// Seconds a case in flight may take to finish on SIGTERM before it is re-queued.
    pub shutdown_grace_secs: u64,
    /// First wait after a failure of evald's own side (disk, state folder, device): the
    /// evaluation is queued again and the queue waits this long, doubling per failure in a
    /// row up to 15 minutes.
    pub retry_backoff_secs: u64,
    /// Longest sleep of the mail outbox's delivery loop: how soon a message another
    /// process queued (or one whose wake-up was missed) is picked up. A message the
    /// service queues itself goes at once.
    pub outbox_poll_secs: u64,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            drop_dir: "/srv/evald/drop".into(),
            state_dir: "/var/lib/evald".into(),
            log_dir: "/var/log/evald".into(),
            settle_secs: 10,
            rescan_secs: 60,
            watch: "native".into(),
            log_format: "text".into(),
            log_keep_days: 14,
            shutdown_grace_secs: 30,
            retry_backoff_secs: 60,
            outbox_poll_secs: 30,
        }
    }
}

/// `[pool]` as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    /// Worker processes.
    pub workers: usize,
    /// Devices, assigned round-robin: `cuda:N` or `cpu`.
    pub devices: Vec<String>,
    /// A case taking longer than this is killed and retried.
    pub case_timeout_secs: u64,
    /// Attempts per case before it is recorded failed.
    pub max_attempts: u32,
    /// Stop an evaluation after this many case attempts in a row timed out (no case
    /// finished in between): a model that never returns must not hold the queue for a day.
    /// 0 = never.
    pub max_consecutive_timeouts: u32,
    /// Wall-clock budget of one evaluation in seconds; past it, the cases not yet done are
    /// recorded as not run and the report says why. 0 = no budget.
    pub submission_budget_secs: u64,
    /// libtorch intra-op threads per worker (0 = cores / workers).
    pub threads_per_worker: usize,
    /// Memory cap per worker in MiB (cgroup where available; 0 = none).
    pub memory_max_mb: u64,
    /// `required` | `best-effort` | `off`: worker sandbox (landlock, seccomp).
    pub sandbox: String,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            workers: 4,
            devices: vec!["cpu".into()],
            case_timeout_secs: 600,
            max_attempts: 3,
            max_consecutive_timeouts: 3,
            submission_budget_secs: 6 * 3600,
            threads_per_worker: 0,
            memory_max_mb: 0,
            sandbox: "best-effort".into(),
        }
    }
}

/// `[mail]` as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMail {
    /// `file` (.eml files in `outbox_dir`) or `smtp`.
    pub transport: String,
    /// Where `file` transport writes messages.
    pub outbox_dir: PathBuf,
    /// Sender.
    pub from: String,
    /// SMTP server.
    pub smtp_host: String,
    /// SMTP port.
    pub smtp_port: u16,
    /// `none` | `starttls` | `tls`.
    pub smtp_security: String,
    /// Optional SMTP user (with `smtp_password_file`).
    pub smtp_user: Option<String>,
    /// File holding the SMTP password.
    pub smtp_password_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for the SMTP server (a hospital's
    /// internal CA), on top of the public roots.
    pub smtp_ca_file: Option<PathBuf>,
    /// Seconds per SMTP command.
    pub smtp_timeout_secs: u64,
    /// Reports larger than this are not attached (the mail says where they are).
    pub attach_max_mb: u64,
}

impl Default for RawMail {
    fn default() -> Self {
        RawMail {
            transport: "file".into(),
            outbox_dir: "/var/lib/evald/outbox".into(),
            from: "evald <evald@localhost>".into(),
            smtp_host: "localhost".into(),
            smtp_port: 587,
            smtp_security: "starttls".into(),
            smtp_user: None,
            smtp_password_file: None,
            smtp_ca_file: None,
            smtp_timeout_secs: 30,
            attach_max_mb: 15,
        }
    }
}

/// HU window as written.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// Window centre (HU).
    pub level: f64,
    /// Window width (HU).
    pub width: f64,
}

/// `[tasks.<name>]` as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    /// Test-set format: `nifti` (default) or `dicom`; one per task, never mixed.
    #[serde(default)]
    pub format: TestSetFormat,
    /// Images folder (`case_0000.nii.gz`); for `dicom`, the folder of case folders.
    pub images: PathBuf,
    /// Reference labels folder (`case.nii.gz`); for `dicom`, the same folder as `images`.
    pub labels: PathBuf,
    /// `dicom` only: SEG segment label / RTSTRUCT ROI name / code (`SCHEME:VALUE`) ->
    /// class label, or `"ignore"`.
    #[serde(default)]
    pub dicom_classes: BTreeMap<String, RawDicomClass>,
    /// Label value -> class name.
    pub classes: BTreeMap<String, String>,
    /// HU window applied before the model.
    #[serde(default = "default_window")]
    pub window: RawWindow,
    /// Default model input kind (`slices2d` | `volume3d`).
    #[serde(default = "default_input")]
    pub input: String,
    /// Default model output kind (`logits` | `probabilities` | `labels`).
    #[serde(default = "default_output")]
    pub output: String,
    /// Default batch size (2D slices or 3D patches per forward).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Default 3D patch size `[D, H, W]` (z, y, x).
    #[serde(default)]
    pub patch_size: Option<[usize; 3]>,
    /// Sliding-window overlap fraction.
    #[serde(default)]
    pub overlap: Option<f64>,
    /// Class of the patient-level diagnosis.
    #[serde(default)]
    pub positive_class: Option<u8>,
    /// Minimum volume of `positive_class` for a positive call (mm^3).
    #[serde(default)]
    pub min_positive_mm3: f64,
    /// Classes scored lesion by lesion.
    #[serde(default)]
    pub lesion_classes: Vec<u8>,
    /// Lesions smaller than this are ignored (mm^3).
    #[serde(default)]
    pub min_lesion_mm3: f64,
    /// Lesion match threshold (IoU; 0 = any overlap).
    #[serde(default)]
    pub lesion_iou_threshold: f64,
    /// NSD tolerance per class label (mm); default 1 mm.
    #[serde(default)]
    pub nsd_tolerance_mm: BTreeMap<String, f64>,
    /// Surface distances on/off.
    #[serde(default = "yes")]
    pub surface_metrics: bool,
    /// Per-slice numbers on/off.
    #[serde(default = "yes")]
    pub per_slice: bool,
    /// Who gets the email.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Wait for a `READY` file instead of the settle time.
    #[serde(default)]
    pub require_ready_marker: bool,
    /// Keep each case's predicted label map (NIfTI, on the case's grid) under the state
    /// folder's `predictions/<task>/<vendor>/<name>/`.
    #[serde(default)]
    pub save_predictions: bool,
}

/// What a task's test set is stored as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TestSetFormat {
    /// nnU-Net layout NIfTI (`<case>_0000.nii.gz`, `<case>.nii.gz`).
    #[default]
    Nifti,
    /// One folder per case: a CT series and its SEG or RTSTRUCT ([`crate::dicom`]).
    Dicom,
}

/// A `dicom_classes` value as written: a class label or `"ignore"`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum RawDicomClass {
    /// A class label of the task.
    Label(i64),
    /// `"ignore"` (not scored, e.g. BODY).
    Word(String),
}

fn default_window() -> RawWindow {
    RawWindow {
        level: 40.0,
        width: 400.0,
    }
}
fn default_input() -> String {
    "slices2d".into()
}
fn default_output() -> String {
    "logits".into()
}
fn yes() -> bool {
    true
}

/// The whole file as written.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    /// `[daemon]`.
    pub daemon: RawDaemon,
    /// `[pool]`.
    pub pool: RawPool,
    /// `[mail]`.
    pub mail: RawMail,
    /// `[tasks.*]`.
    pub tasks: BTreeMap<String, RawTask>,
}

/// Watch backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WatchMode {
    /// inotify.
    Native,
    /// Polling (network file systems).
    Poll,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated `[daemon]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DaemonSettings {
    /// Drop root.
    pub drop_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Log directory.
    pub log_dir: PathBuf,
    /// Settle time.
    pub settle: std::time::Duration,
    /// Rescan period.
    pub rescan: std::time::Duration,
    /// Watch backend.
    pub watch: WatchMode,
    /// Log format.
    pub log_format: LogFormat,
    /// Daily log files kept.
    pub log_keep_days: usize,
    /// Grace period on SIGTERM.
    pub shutdown_grace: std::time::Duration,
    /// First wait after a retryable failure (doubles, capped at 15 min).
    pub retry_backoff: std::time::Duration,
    /// Longest sleep of the mail outbox loop (at least a second).
    pub outbox_poll: std::time::Duration,
}

/// Worker sandbox policy (`pool.sandbox`): one type, owned by the sandbox.
pub use crate::sandbox::Policy as SandboxPolicy;

/// Validated `[pool]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolSettings {
    /// Worker processes.
    pub workers: usize,
    /// Devices (`cpu`, `cuda:N`), round-robin.
    pub devices: Vec<String>,
    /// Per-case timeout.
    pub case_timeout: std::time::Duration,
    /// Attempts per case.
    pub max_attempts: u32,
    /// Timed-out attempts in a row after which the evaluation stops (0 = never).
    pub max_consecutive_timeouts: u32,
    /// Wall-clock budget of one evaluation (`None` = unlimited).
    pub submission_budget: Option<std::time::Duration>,
    /// Intra-op threads per worker (resolved, >= 1).
    pub threads_per_worker: usize,
    /// Memory cap per worker, bytes (0 = none).
    pub memory_max_bytes: u64,
    /// Sandbox policy.
    pub sandbox: SandboxPolicy,
}

/// SMTP connection security.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SmtpSecurity {
    /// Plain text (local relays, tests).
    None,
    /// STARTTLS required.
    StartTls,
    /// Implicit TLS.
    Tls,
}

/// Mail transport.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum MailTransport {
    /// `.eml` files in the outbox folder.
    File,
    /// An SMTP server.
    Smtp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Security.
        security: SmtpSecurity,
        /// User and password file, together or not at all.
        auth: Option<(String, PathBuf)>,
        /// Extra CA certificates (PEM) to trust, read at each delivery round.
        ca_file: Option<PathBuf>,
        /// Per-command timeout.
        timeout: std::time::Duration,
    },
}

/// Validated `[mail]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MailSettings {
    /// Transport.
    pub transport: MailTransport,
    /// Outbox folder (file transport; also where large mails are staged).
    pub outbox_dir: PathBuf,
    /// Sender mailbox.
    pub from: String,
    /// Attachment cap in bytes.
    pub attach_max_bytes: u64,
}

/// Validated `[tasks.<name>]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskSettings {
    /// Task name.
    pub name: String,
    /// The test set's format as configured (`images` / `labels` name the DICOM set until
    /// `testset::materialise` points them at its decoded NIfTI).
    pub format: TestSetFormat,
    /// Images folder.
    pub images: PathBuf,
    /// Labels folder.
    pub labels: PathBuf,
    /// `dicom` only: the class mapping of segments / ROIs.
    pub dicom_classes: Option<crate::dicom::import::ClassMap>,
    /// `dicom` only, after materialising: cases refused, each scored as a failure.
    #[serde(skip)]
    pub dicom_refused: Vec<crate::dicom::import::RefusedCase>,
    /// What to compute.
    pub eval: EvalSpec,
    /// HU window.
    pub window: Window,
    /// Default input kind.
    pub input: InputKind,
    /// Default output kind.
    pub output: OutputKind,
    /// Default batch size.
    pub batch_size: usize,
    /// Default 3D patch `[D, H, W]`.
    pub patch_size: [usize; 3],
    /// Default sliding-window overlap.
    pub overlap: f64,
    /// Email recipients.
    pub recipients: Vec<String>,
    /// Wait for `READY`.
    pub require_ready_marker: bool,
    /// Keep every case's predicted label map (see the state folder's `predictions/`).
    pub save_predictions: bool,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Settings {
    /// Where it came from (`<embedded>` for the defaults).
    pub source: PathBuf,
    /// Daemon settings.
    pub daemon: DaemonSettings,
    /// Pool settings.
    pub pool: PoolSettings,
    /// Mail settings.
    pub mail: MailSettings,
    /// Tasks by name.
    pub tasks: BTreeMap<String, TaskSettings>,
}

impl Settings {
    /// sha256 of the effective settings (for the report's Run sheet): changes whenever
    /// anything that affects results changes.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(sha2::Sha256::digest(&json))
    }

    /// The configured task names, joined with `sep` (for messages that say what exists).
    pub fn task_names(&self, sep: &str) -> String {
        self.tasks.keys().cloned().collect::<Vec<_>>().join(sep)
    }
}

/// Load and validate a configuration file (+ `EVALD__SECTION__KEY` overrides).
///
/// # Errors
/// [`ConfigError::Load`] for syntax/type/unknown-key errors, [`ConfigError::Invalid`] with
/// every value problem.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_raw(path)?.validate(path)
}

/// Stage 1 only: parse the file and overrides.
///
/// # Errors
/// [`ConfigError::Load`].
pub fn load_raw(path: &Path) -> Result<RawSettings, ConfigError> {
    let err = |message: String| ConfigError::Load {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(err(
            "no such file (create it from config/evald.toml, or pass --config)".into(),
        ));
    }
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("EVALD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("pool.devices")
                .with_list_parse_key("tasks.*.recipients"),
        )
        .build()
        .and_then(|c| c.try_deserialize::<RawSettings>())
        .map_err(|e| err(e.to_string()))
}

fn parse_enum<T: Copy>(
    problems: &mut Vec<Problem>,
    key: &str,
    value: &str,
    options: &[(&str, T)],
) -> Option<T> {
    match options.iter().find(|(n, _)| *n == value) {
        Some((_, v)) => Some(*v),
        None => {
            problems.push(Problem {
                key: key.into(),
                message: format!(
                    "'{value}' is not one of: {}",
                    options
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            None
        }
    }
}

/// Check a device name (`cpu`, `cuda`, `cuda:N`; the grammar is
/// [`crate::infer::device::DeviceName`]'s).
pub fn valid_device(d: &str) -> bool {
    crate::infer::device::DeviceName::parse(d).is_some()
}

impl RawSettings {
    /// Stage 2: validate everything, collecting every problem.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each problem with its key.
    pub fn validate(self, source: &Path) -> Result<Settings, ConfigError> {
        let mut p: Vec<Problem> = Vec::new();
        let (d, pl, m) = (&self.daemon, &self.pool, &self.mail);
        // Plain checks first; the closure's borrow of `p` ends with this block.
        {
            let mut bad = |key: &str, message: String| {
                p.push(Problem {
                    key: key.into(),
                    message,
                })
            };
            if d.settle_secs > 86_400 {
                bad("daemon.settle_secs", "must be at most 86400".into());
            }
            if !(1..=86_400).contains(&d.rescan_secs) {
                bad("daemon.rescan_secs", "must be 1..=86400".into());
            }
            if d.log_keep_days == 0 {
                bad("daemon.log_keep_days", "must be at least 1".into());
            }
            for (key, path) in [
                ("daemon.drop_dir", &d.drop_dir),
                ("daemon.state_dir", &d.state_dir),
                ("daemon.log_dir", &d.log_dir),
            ] {
                if !path.is_absolute() {
                    bad(key, format!("{} must be an absolute path", path.display()));
                }
            }
            if !(1..=64).contains(&pl.workers) {
                bad("pool.workers", format!("{} must be 1..=64", pl.workers));
            }
            if pl.devices.is_empty() {
                bad(
                    "pool.devices",
                    "name at least one device (\"cpu\" or \"cuda:0\")".into(),
                );
            }
            for dev in &pl.devices {
                if !valid_device(dev) {
                    bad(
                        "pool.devices",
                        format!("'{dev}' is not a device: use \"cpu\" or \"cuda:N\""),
                    );
                }
            }
            if pl.case_timeout_secs == 0 {
                bad("pool.case_timeout_secs", "must be at least 1".into());
            }
            if !(1..=20).contains(&pl.max_attempts) {
                bad("pool.max_attempts", "must be 1..=20".into());
            }
            if pl.submission_budget_secs != 0 && pl.submission_budget_secs < pl.case_timeout_secs {
                bad(
                    "pool.submission_budget_secs",
                    format!(
                        "{} s is less than one case (pool.case_timeout_secs = {}): use 0 (no \
                         budget) or at least the case timeout",
                        pl.submission_budget_secs, pl.case_timeout_secs
                    ),
                );
            }
            if m.smtp_user.is_some() != m.smtp_password_file.is_some() {
                bad(
                    "mail.smtp_user",
                    "smtp_user and smtp_password_file go together: set both or neither".into(),
                );
            }
            if let Some(pw) = &m.smtp_password_file {
                if m.transport == "smtp" && !pw.is_file() {
                    bad(
                        "mail.smtp_password_file",
                        format!("{} is not a readable file", pw.display()),
                    );
                }
            }
            if let Some(ca) = &m.smtp_ca_file {
                if m.smtp_security == "none" {
                    bad(
                        "mail.smtp_ca_file",
                        "is used only with smtp_security = \"starttls\" or \"tls\"".into(),
                    );
                } else if m.transport == "smtp" && !ca.is_file() {
                    bad(
                        "mail.smtp_ca_file",
                        format!("{} is not a readable file", ca.display()),
                    );
                }
            }
            if m.from.parse::<lettre::message::Mailbox>().is_err() {
                bad(
                    "mail.from",
                    format!(
                        "'{}' is not a mailbox (e.g. \"evald <evald@example.org>\")",
                        m.from
                    ),
                );
            }
            if self.tasks.is_empty() {
                bad(
                    "tasks",
                    "no [tasks.<name>] section: evald needs at least one task".into(),
                );
            }
        }

        let watch = parse_enum(
            &mut p,
            "daemon.watch",
            &d.watch,
            &[("native", WatchMode::Native), ("poll", WatchMode::Poll)],
        );
        let log_format = parse_enum(
            &mut p,
            "daemon.log_format",
            &d.log_format,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        );
        let sandbox = parse_enum(
            &mut p,
            "pool.sandbox",
            &pl.sandbox,
            &[
                ("required", SandboxPolicy::Required),
                ("best-effort", SandboxPolicy::BestEffort),
                ("off", SandboxPolicy::Off),
            ],
        );
        let security = parse_enum(
            &mut p,
            "mail.smtp_security",
            &m.smtp_security,
            &[
                ("none", SmtpSecurity::None),
                ("starttls", SmtpSecurity::StartTls),
                ("tls", SmtpSecurity::Tls),
            ],
        );
        let is_smtp = parse_enum(
            &mut p,
            "mail.transport",
            &m.transport,
            &[("file", false), ("smtp", true)],
        );

        let mut tasks = BTreeMap::new();
        for (name, t) in &self.tasks {
            if let Some(task) = validate_task(name, t, &mut p) {
                tasks.insert(name.clone(), task);
            }
        }

        if !p.is_empty() {
            return Err(ConfigError::Invalid {
                path: source.to_path_buf(),
                problems: p,
            });
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let transport = if is_smtp == Some(true) {
            MailTransport::Smtp {
                host: m.smtp_host.clone(),
                port: m.smtp_port,
                security: security.expect("validated"),
                auth: m.smtp_user.clone().zip(m.smtp_password_file.clone()),
                ca_file: m.smtp_ca_file.clone(),
                timeout: std::time::Duration::from_secs(m.smtp_timeout_secs.max(1)),
            }
        } else {
            MailTransport::File
        };
        Ok(Settings {
            source: source.to_path_buf(),
            daemon: DaemonSettings {
                drop_dir: d.drop_dir.clone(),
                state_dir: d.state_dir.clone(),
                log_dir: d.log_dir.clone(),
                settle: std::time::Duration::from_secs(d.settle_secs),
                rescan: std::time::Duration::from_secs(d.rescan_secs),
                watch: watch.expect("validated"),
                log_format: log_format.expect("validated"),
                log_keep_days: d.log_keep_days,
                shutdown_grace: std::time::Duration::from_secs(d.shutdown_grace_secs),
                retry_backoff: std::time::Duration::from_secs(d.retry_backoff_secs.max(1)),
                outbox_poll: std::time::Duration::from_secs(d.outbox_poll_secs.max(1)),
            },
            pool: PoolSettings {
                workers: pl.workers,
                devices: pl.devices.clone(),
                case_timeout: std::time::Duration::from_secs(pl.case_timeout_secs),
                max_attempts: pl.max_attempts,
                max_consecutive_timeouts: pl.max_consecutive_timeouts,
                submission_budget: (pl.submission_budget_secs > 0)
                    .then(|| std::time::Duration::from_secs(pl.submission_budget_secs)),
                threads_per_worker: if pl.threads_per_worker == 0 {
                    (cores / pl.workers.max(1)).max(1)
                } else {
                    pl.threads_per_worker
                },
                memory_max_bytes: pl.memory_max_mb * 1024 * 1024,
                sandbox: sandbox.expect("validated"),
            },
            mail: MailSettings {
                transport,
                outbox_dir: m.outbox_dir.clone(),
                from: m.from.clone(),
                attach_max_bytes: m.attach_max_mb * 1024 * 1024,
            },
            tasks,
        })
    }
}

/// A DICOM task's class mapping: `images` and `labels` name one folder (each case folder
/// holds CT and reference), every value is one of the task's classes or `"ignore"`.
fn dicom_class_map(
    t: &RawTask,
    key: &dyn Fn(&str) -> String,
    p: &mut Vec<Problem>,
) -> Option<crate::dicom::import::ClassMap> {
    use crate::dicom::import::{ClassMap, Target};
    if t.images != t.labels {
        p.push(Problem {
            key: key("labels"),
            message: format!(
                "format = \"dicom\": images and labels name the same folder of case folders \
                 (each holds its CT series and its SEG or RTSTRUCT); got {} and {}",
                t.images.display(),
                t.labels.display()
            ),
        });
    }
    if t.dicom_classes.is_empty() {
        p.push(Problem {
            key: key("dicom_classes"),
            message: "format = \"dicom\" needs the mapping of SEG segment labels / RTSTRUCT ROI \
                      names to classes, e.g. dicom_classes = { liver = 1, BODY = \"ignore\" }"
                .into(),
        });
    }
    let mut map = ClassMap::default();
    for (k, v) in &t.dicom_classes {
        let target = match v {
            RawDicomClass::Word(w) if w.eq_ignore_ascii_case("ignore") => Some(Target::Ignore),
            RawDicomClass::Label(l) => u8::try_from(*l)
                .ok()
                .filter(|l| t.classes.contains_key(&l.to_string()))
                .map(Target::Class),
            RawDicomClass::Word(_) => None,
        };
        match target {
            Some(target) => map.insert(k, target),
            None => p.push(Problem {
                key: key("dicom_classes"),
                message: format!(
                    "'{k}': the value is one of the task's class labels ({}) or \"ignore\"",
                    t.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }
    Some(map)
}

fn validate_task(name: &str, t: &RawTask, p: &mut Vec<Problem>) -> Option<TaskSettings> {
    let before = p.len();
    let key = |k: &str| format!("tasks.{name}.{k}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        p.push(Problem {
            key: format!("tasks.{name}"),
            message: "task names use letters, digits, '-', '_' and '.' (they are folder names in the drop root)".into(),
        });
    }
    for (k, dir) in [("images", &t.images), ("labels", &t.labels)] {
        if !dir.is_dir() {
            p.push(Problem {
                key: key(k),
                message: format!("{} is not a readable folder", dir.display()),
            });
        }
    }
    let dicom_classes = match t.format {
        TestSetFormat::Dicom => dicom_class_map(t, &key, p),
        TestSetFormat::Nifti => {
            if !t.dicom_classes.is_empty() {
                p.push(Problem {
                    key: key("dicom_classes"),
                    message: "only for format = \"dicom\"".into(),
                });
            }
            None
        }
    };
    if t.format == TestSetFormat::Nifti && t.images.is_dir() && t.labels.is_dir() {
        match crate::dataset::pair_cases(&t.images, &t.labels) {
            Ok(d) if d.cases.is_empty() => p.push(Problem {
                key: key("images"),
                message: format!(
                    "no case pairs: expected <case>_0000.nii.gz in {} and <case>.nii.gz in {}",
                    t.images.display(),
                    t.labels.display()
                ),
            }),
            Ok(d) => {
                for problem in d.problems {
                    p.push(Problem {
                        key: key("labels"),
                        message: problem,
                    });
                }
            }
            Err(e) => p.push(Problem {
                key: key("images"),
                message: e.to_string(),
            }),
        }
    }
    let mut classes = Vec::new();
    if t.classes.is_empty() {
        p.push(Problem {
            key: key("classes"),
            message: "name at least one class, e.g. classes = { 1 = \"thyroid\" }".into(),
        });
    }
    for (label, cname) in &t.classes {
        match label.parse::<u8>() {
            Ok(l) if l > 0 => classes.push((l, cname.clone())),
            _ => p.push(Problem {
                key: key("classes"),
                message: format!("'{label}' is not a label value in 1..=255"),
            }),
        }
    }
    let known = |l: u8| classes.iter().any(|(c, _)| *c == l);
    if let Some(pc) = t.positive_class {
        if !known(pc) {
            p.push(Problem {
                key: key("positive_class"),
                message: format!("{pc} is not one of the task's classes"),
            });
        }
    }
    for &l in &t.lesion_classes {
        if !known(l) {
            p.push(Problem {
                key: key("lesion_classes"),
                message: format!("{l} is not one of the task's classes"),
            });
        }
    }
    let mut tolerance = BTreeMap::new();
    for (label, &mm) in &t.nsd_tolerance_mm {
        match label.parse::<u8>() {
            Ok(l) if known(l) && mm.is_finite() && mm >= 0.0 => {
                tolerance.insert(l, mm);
            }
            _ => p.push(Problem {
                key: key("nsd_tolerance_mm"),
                message: format!("'{label}' = {mm}: keys are class labels, values non-negative mm"),
            }),
        }
    }
    // The same rules as a vendor's submission.toml (infer::rules): a default the admin
    // can set is one every vendor's manifest may keep.
    let mut check = |r: Result<(), SpecError>| {
        if let Err(e) = r {
            p.push(Problem {
                key: key(e.key),
                message: e.message,
            });
        }
    };
    let window = rules::window(t.window.level, t.window.width);
    check(window.as_ref().map(|_| ()).map_err(Clone::clone));
    let input = rules::input(&t.input);
    check(input.as_ref().map(|_| ()).map_err(Clone::clone));
    let output = rules::output(&t.output);
    check(output.as_ref().map(|_| ()).map_err(Clone::clone));
    let overlap = rules::overlap(t.overlap.unwrap_or(0.5));
    check(overlap.as_ref().map(|_| ()).map_err(Clone::clone));
    if let Some(b) = t.batch_size {
        check(rules::batch_size(b).map(|_| ()));
    }
    if let Some(ps) = t.patch_size {
        check(rules::patch_size(ps).map(|_| ()));
    }
    for r in &t.recipients {
        if r.parse::<lettre::message::Mailbox>().is_err() {
            p.push(Problem {
                key: key("recipients"),
                message: format!("'{r}' is not an email address"),
            });
        }
    }
    if p.len() > before {
        return None;
    }
    let lesion_classes: Vec<u8> = t.lesion_classes.clone();
    let eval = EvalSpec {
        classes: classes
            .iter()
            .map(|(l, n)| ClassSpec {
                label: *l,
                name: n.clone(),
                nsd_tolerance_mm: tolerance.get(l).copied().unwrap_or(1.0),
                lesion: lesion_classes.contains(l),
            })
            .collect(),
        surface: t.surface_metrics,
        per_slice: t.per_slice,
        positive_class: t.positive_class,
        min_positive_mm3: t.min_positive_mm3,
        min_lesion_mm3: t.min_lesion_mm3,
        lesion_iou_threshold: t.lesion_iou_threshold,
    };
    let (Ok(window), Ok(input), Ok(output), Ok(overlap)) = (window, input, output, overlap) else {
        return None;
    };
    Some(TaskSettings {
        name: name.to_string(),
        format: t.format,
        images: t.images.clone(),
        labels: t.labels.clone(),
        dicom_classes,
        dicom_refused: Vec::new(),
        eval,
        window,
        input,
        output,
        batch_size: t.batch_size.unwrap_or(input.default_batch_size()),
        patch_size: t.patch_size.unwrap_or([64, 128, 128]),
        overlap,
        recipients: t.recipients.clone(),
        require_ready_marker: t.require_ready_marker,
        save_predictions: t.save_predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("evald.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[pool]\nworkerz = 4\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("workerz"), "{e}");

        let p = write(
            dir.path(),
            "[pool]\nworkers = 0\ndevices = [\"gpu0\"]\n[mail]\nsmtp_user = \"x\"\n",
        );
        let ConfigError::Invalid { problems, .. } = load(&p).unwrap_err() else {
            panic!("expected Invalid");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in ["pool.workers", "pool.devices", "mail.smtp_user", "tasks"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn a_ca_file_must_exist_and_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let problems_for = |mail: &str| -> Vec<Problem> {
            let p = write(dir.path(), &format!("[mail]\n{mail}\n"));
            match load(&p).unwrap_err() {
                ConfigError::Invalid { problems, .. } => problems,
                e => panic!("{e}"),
            }
        };
        let missing = dir.path().join("no-such-ca.pem");
        let ps = problems_for(&format!(
            "transport = \"smtp\"\nsmtp_ca_file = \"{}\"",
            missing.display()
        ));
        let p = ps.iter().find(|p| p.key == "mail.smtp_ca_file").unwrap();
        assert!(p.message.contains("no-such-ca.pem"), "{p:?}");
        let ps =
            problems_for("transport = \"smtp\"\nsmtp_security = \"none\"\nsmtp_ca_file = \"/x\"");
        let p = ps.iter().find(|p| p.key == "mail.smtp_ca_file").unwrap();
        assert!(p.message.contains("starttls"), "{p:?}");
    }
}
