//! One vendor submission folder (`<drop>/<task>/<vendor>/<name>/`): validating it (what a
//! rejection says), the execution [`Job`] it asks for, evaluating it with any execution
//! [`Backend`], and writing its outputs next to it.
//!
//! Shared by `evald run` and the daemon, so both accept and refuse exactly the same things.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::config::TaskSettings;
use crate::dataset::{self, Dataset};
use crate::evaluation::{Evaluation, RunMeta};
use crate::exec::{Backend, Job};
use crate::infer::{InferSpec, ModelFormat};
use crate::manifest::{self, Manifest};
use crate::pipeline::{self, Progress};

use crate::layout::{REPORT_XLSX, SUMMARY_JSON};

/// Why a submission cannot be evaluated (goes to `REJECTED.txt` for the vendor).
#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    /// `submission.toml` is wrong.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// The model file is missing or unreadable.
    #[error("model file {path}: {reason}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The task's test set cannot be listed.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// The model file changed after it was checked (a new copy is arriving): what is
    /// evaluated must be what was recorded, so this evaluation does not run.
    #[error("model file {path} changed after it was checked (sha256 {expected} recorded, {found} now); the new content is looked at as a new submission once its copy is complete")]
    Changed {
        /// The model file.
        path: PathBuf,
        /// The recorded hash.
        expected: String,
        /// The hash of the bytes copied now.
        found: String,
    },
    /// evald's own copy of the model cannot be made (disk full, state folder).
    #[error("cannot snapshot the model into {dir}: {source}")]
    Snapshot {
        /// The snapshot folder.
        dir: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An immutable copy of a submission's model, made when its evaluation starts: every
/// worker (a restarted one too) loads this file, never the vendor's, so replacing the
/// vendor's file mid-evaluation cannot mix two models in one report. Read-only, in a
/// folder of evald's; removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    /// The copy.
    pub path: PathBuf,
    /// sha256 of the copy's bytes (equal to the recorded one).
    pub sha256: String,
    _dir: tempfile::TempDir,
}

impl Prepared {
    /// Copy the model into a new folder under `root` (hashing the bytes as they are
    /// copied, through the descriptor that was checked to be a regular file) and check
    /// the copy against [`Prepared::model_sha256`].
    ///
    /// # Errors
    /// [`SubmissionError::Changed`] when the bytes differ from those recorded,
    /// [`SubmissionError::Model`] when the file is no longer usable,
    /// [`SubmissionError::Snapshot`] for evald's own disk.
    pub fn snapshot(&self, root: &Path) -> Result<Snapshot, SubmissionError> {
        use sha2::Digest;
        use std::io::{Read, Write};
        use std::os::unix::fs::PermissionsExt;
        let snap_err = |source| SubmissionError::Snapshot {
            dir: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(snap_err)?;
        let dir = tempfile::Builder::new()
            .prefix("model-")
            .tempdir_in(root)
            .map_err(snap_err)?;
        let mut src =
            crate::files::open_regular(&self.model_path).map_err(|e| SubmissionError::Model {
                path: self.model_path.clone(),
                reason: e.to_string(),
            })?;
        let path = dir.path().join(
            self.model_path
                .file_name()
                .unwrap_or(std::ffi::OsStr::new(self.format.default_file())),
        );
        let mut dst = std::fs::File::create(&path).map_err(snap_err)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(|e| SubmissionError::Model {
                path: self.model_path.clone(),
                reason: format!("unreadable: {e}"),
            })?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(snap_err)?;
        }
        dst.sync_all().map_err(snap_err)?;
        drop(dst);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
            .map_err(snap_err)?;
        let found = hex::encode(h.finalize());
        if found != self.model_sha256 {
            return Err(SubmissionError::Changed {
                path: self.model_path.clone(),
                expected: self.model_sha256.clone(),
                found,
            });
        }
        Ok(Snapshot {
            path,
            sha256: found,
            _dir: dir,
        })
    }
}

impl Prepared {
    /// The execution job for this submission on `task`: the snapshot's bytes (every
    /// worker checks its hash), the merged inference settings, the task's images (and its
    /// labels, only so that workers are kept away from them).
    pub fn job(&self, model: &Snapshot, task: &TaskSettings, scratch: &Path) -> Job {
        Job {
            format: self.format,
            model: model.path.clone(),
            model_sha256: Some(model.sha256.clone()),
            spec: self.infer.clone(),
            images: task.images.clone(),
            labels: Some(task.labels.clone()),
            scratch: scratch.to_path_buf(),
        }
    }
}

/// A validated submission, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The submission folder.
    pub dir: PathBuf,
    /// The vendor's manifest (defaults when absent).
    pub manifest: Manifest,
    /// The model's format (what runs it).
    pub format: ModelFormat,
    /// The model file.
    pub model_path: PathBuf,
    /// sha256 of the model, hex.
    pub model_sha256: String,
    /// Task defaults merged with the manifest.
    pub infer: InferSpec,
    /// Vendor (parent folder name).
    pub vendor: Option<String>,
    /// Submission name (folder name).
    pub name: Option<String>,
}

/// Validate a submission folder for `task`: manifest, model file (present, readable,
/// non-empty), inference settings.
///
/// # Errors
/// [`SubmissionError`] with a message meant for the vendor.
pub fn prepare(dir: &Path, task: &TaskSettings) -> Result<Prepared, SubmissionError> {
    let manifest = manifest::read(dir)?;
    let format = manifest.format(dir)?;
    let model_path = manifest.model_path(dir)?;
    let model_err = |reason: String| SubmissionError::Model {
        path: model_path.clone(),
        reason,
    };
    // Checked and hashed through one descriptor: a FIFO never blocks, and the bytes hashed
    // are those of the file that was checked.
    let file = crate::files::open_regular(&model_path).map_err(|e| {
        model_err(match &e {
            e if e.is_not_found() => format!(
                "missing: copy your {} file there as {} (or name it in submission.toml)",
                format.name(),
                format.default_file()
            ),
            crate::files::FileError::NotRegular { kind, .. } => {
                format!("is a {kind}, not a regular file: copy the model file itself")
            }
            crate::files::FileError::Io { source, .. } => format!("unreadable: {source}"),
            other => other.to_string(),
        })
    })?;
    let meta = file
        .metadata()
        .map_err(|e| model_err(format!("unreadable: {e}")))?;
    // Like a symbolic link out of the drop folder, a hard link can give a vendor's folder
    // a file that is not theirs (another vendor's model, anything on the same disk).
    let names = std::os::unix::fs::MetadataExt::nlink(&meta);
    if names > 1 {
        return Err(model_err(format!(
            "is a hard link ({names} names for one file): copy the file itself into this folder"
        )));
    }
    let len = meta.len();
    if len == 0 {
        return Err(model_err("is empty (was the copy interrupted?)".into()));
    }
    let model_sha256 =
        crate::files::sha256_hex(file).map_err(|e| model_err(format!("unreadable: {e}")))?;
    let infer = manifest.infer_spec(dir, task)?;
    let crate::layout::Named { vendor, name, .. } = crate::layout::named(dir);
    Ok(Prepared {
        dir: dir.to_path_buf(),
        format,
        manifest,
        model_path,
        model_sha256,
        infer,
        vendor,
        name,
    })
}

/// Evaluate a prepared submission on the task's test set with `backend`.
///
/// # Errors
/// [`SubmissionError::Dataset`] when the test set cannot be listed; per-case problems are
/// failures inside the [`Evaluation`].
pub fn evaluate(
    sub: &Prepared,
    task: &TaskSettings,
    backend: &dyn Backend,
    ctx: &RunContext,
    on_progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<Evaluation, SubmissionError> {
    let data: Dataset = dataset::pair_cases(&task.images, &task.labels)?;
    for p in &data.problems {
        tracing::warn!(task = task.name, "{p}");
    }
    let started = crate::evaluation::timestamp_now();
    let (cases, failures, times) =
        pipeline::evaluate(&data, &task.eval, backend, on_progress, cancel);
    let meta = RunMeta {
        task: task.name.clone(),
        vendor: sub.vendor.clone(),
        submission: sub.name.clone(),
        submission_dir: Some(sub.dir.clone()),
        model_sha256: Some(sub.model_sha256.clone()),
        labels_dir: task.labels.clone(),
        inputs_dir: task.images.clone(),
        dataset_hash: dataset::manifest_hash(&data, ctx.digest_cache.as_deref()),
        devices: backend.devices(),
        evald_version: env!("CARGO_PKG_VERSION").into(),
        model_format: Some(sub.format.name().to_string()),
        runtime: Some(format!(
            "{} {}",
            sub.format.runtime_name(),
            sub.format.runtime_version()
        )),
        config_digest: ctx.config_digest.clone(),
        started,
        finished: crate::evaluation::timestamp_now(),
        timings: times.pairs(),
        stopped_early: backend.stopped_early(),
    };
    Ok(Evaluation::new(task.eval.clone(), cases, failures, meta))
}

/// What an evaluation needs from the installation beside the submission and its task.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// The settings' digest, recorded in the outputs (`None` outside a configuration).
    pub config_digest: Option<String>,
    /// The test-set digest cache (in the state folder), so an unchanged test set is not
    /// read again to hash it; `None`: every file is read.
    pub digest_cache: Option<PathBuf>,
}

impl RunContext {
    /// The context of an evaluation under `settings`: its digest, and the state folder's
    /// digest cache when that folder exists.
    pub fn of(settings: &crate::config::Settings) -> Self {
        let state = &settings.daemon.state_dir;
        RunContext {
            config_digest: Some(settings.digest()),
            digest_cache: state
                .is_dir()
                .then(|| state.join(dataset::DIGEST_CACHE_FILE)),
        }
    }
}

/// Outputs could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// summary.json.
    #[error("{path}: cannot write: {source}")]
    Summary {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// report.xlsx.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
}

/// Write `summary.json` and `report.xlsx` into `dir` (each atomically).
///
/// # Errors
/// [`OutputError`] naming the file.
pub fn write_outputs(eval: &Evaluation, dir: &Path) -> Result<(PathBuf, PathBuf), OutputError> {
    let summary = dir.join(SUMMARY_JSON);
    crate::evaluation::summary::write(eval, &summary).map_err(|source| OutputError::Summary {
        path: summary.clone(),
        source,
    })?;
    let report = dir.join(REPORT_XLSX);
    crate::report::write(eval, &report)?;
    Ok((summary, report))
}
