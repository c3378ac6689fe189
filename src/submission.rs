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
use crate::infer::{artifact, InferSpec, ModelFormat};
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
    /// A model of a kind evald recognises but does not run (an ExportedProgram, a bare
    /// checkpoint, an nnU-Net folder that is not stock).
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file or folder.
        path: PathBuf,
        /// What it is and why it is not run.
        reason: String,
        /// What the vendor should send instead.
        fix: String,
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
    /// Copy the model (file or folder) into a new folder under `root` (hashing the bytes
    /// as they are copied, through the descriptors that were checked to be regular files)
    /// and check the copy against [`Prepared::model_sha256`].
    ///
    /// # Errors
    /// [`SubmissionError::Changed`] when the bytes differ from those recorded,
    /// [`SubmissionError::Model`] when the file is no longer usable,
    /// [`SubmissionError::Snapshot`] for evald's own disk.
    pub fn snapshot(&self, root: &Path) -> Result<Snapshot, SubmissionError> {
        let snap_err = |source| SubmissionError::Snapshot {
            dir: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(snap_err)?;
        let dir = tempfile::Builder::new()
            .prefix("model-")
            .tempdir_in(root)
            .map_err(snap_err)?;
        let path = artifact::copy_verified(
            self.format,
            &self.model_path,
            dir.path(),
            &self.model_sha256,
        )
        .map_err(|e| match e {
            artifact::ArtifactError::Changed {
                path,
                expected,
                found,
            } => SubmissionError::Changed {
                path,
                expected,
                found,
            },
            artifact::ArtifactError::Copy { source, .. } => snap_err(source),
            other => model_error(self.format, &self.model_path, other),
        })?;
        Ok(Snapshot {
            path,
            sha256: self.model_sha256.clone(),
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
    /// The model file (or folder).
    pub model_path: PathBuf,
    /// The model's digest, hex ([`artifact`]: a file's sha256, or a folder's).
    pub model_sha256: String,
    /// The model's size in bytes (all its files).
    pub model_bytes: u64,
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
    let (format, model_path) = find_model(dir, &manifest)?;
    // Checked and hashed through one descriptor per file: a FIFO never blocks, and the
    // bytes hashed are those of the file that was checked.
    let model_sha256 =
        artifact::digest(format, &model_path).map_err(|e| model_error(format, &model_path, e))?;
    let model_bytes = artifact::size(format, &model_path);
    let infer = manifest.infer_spec(dir, task)?;
    let crate::layout::Named { vendor, name, .. } = crate::layout::named(dir);
    Ok(Prepared {
        dir: dir.to_path_buf(),
        format,
        manifest,
        model_path,
        model_sha256,
        model_bytes,
        infer,
        vendor,
        name,
    })
}

/// The model's format and path: as the manifest says, else found by content.
fn find_model(dir: &Path, manifest: &Manifest) -> Result<(ModelFormat, PathBuf), SubmissionError> {
    let named = manifest.model_path(dir)?;
    let missing = |path: PathBuf, format: Option<ModelFormat>| SubmissionError::Model {
        path,
        reason: match format {
            Some(f) if f.is_folder() => format!(
                "missing: copy your {} folder here ({})",
                f.name(),
                f.export_hint()
            ),
            Some(f) => format!(
                "missing: copy your {} file there as {} (or name it in submission.toml)",
                f.name(),
                f.default_file()
            ),
            None => format!("missing: {}", EXPECTED),
        },
    };
    match (manifest.format(dir)?, named) {
        (Some(f), Some(p)) => Ok((f, p)),
        (Some(f), None) if f.is_folder() => artifact::nnunet_folder(dir)
            .map(|p| (f, p))
            .ok_or_else(|| missing(dir.join(f.default_file()), Some(f))),
        (Some(f), None) => Ok((f, dir.join(f.default_file()))),
        // A named model of unnamed format: a folder is nnU-Net's, a file is read by its
        // extension (TorchScript, the legacy default, for anything else).
        (None, Some(p)) => {
            let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
            let by_ext = ModelFormat::ALL
                .into_iter()
                .find(|f| !f.is_folder() && ext.as_deref() == Path::new(f.default_file()).extension().and_then(|e| e.to_str()));
            if p.is_dir() {
                Ok((ModelFormat::NnUnet, p))
            } else if let Some(f) = by_ext {
                Ok((f, p))
            } else if let artifact::Found::Refused(r, _) = artifact::detect_file(&p) {
                Err(refused(r, p))
            } else {
                Ok((ModelFormat::TorchScript, p))
            }
        }
        (None, None) => match artifact::detect(dir) {
            artifact::Found::Model(f, p) => Ok((f, p)),
            artifact::Found::Refused(r, p) => Err(refused(r, p)),
            artifact::Found::Nothing => Err(missing(dir.join(ModelFormat::TorchScript.default_file()), None)),
            artifact::Found::Ambiguous(ps) => Err(SubmissionError::Model {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds more than one model ({}): keep one, or say which in submission.toml (format = \"...\", model = \"...\")",
                    ps.iter()
                        .map(|p| p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        },
    }
}

/// What a submission folder may hold, for messages.
pub const EXPECTED: &str = "copy one model into this folder: an nnU-Net v2 trained-model folder \
    (<trainer>__<plans>__<configuration>/ with plans.json, dataset.json, fold_N/checkpoint_final.pth), \
    model.onnx (ONNX), or model.pt (TorchScript, legacy); see the vendor guide";

fn refused(r: artifact::Refusal, path: PathBuf) -> SubmissionError {
    SubmissionError::Unsupported {
        path,
        reason: r.reason().to_string(),
        fix: r.fix().to_string(),
    }
}

/// A model's files' problem as the vendor's message.
fn model_error(format: ModelFormat, model: &Path, e: artifact::ArtifactError) -> SubmissionError {
    use crate::files::FileError;
    let (path, reason) = match e {
        artifact::ArtifactError::File(ref f) => {
            let path = match f {
                FileError::Io { path, .. } | FileError::NotRegular { path, .. } | FileError::TooLarge { path, .. } => path.clone(),
            };
            let reason = match f {
                f if f.is_not_found() && path == model => format!(
                    "missing: copy your {} file there as {} (or name it in submission.toml)",
                    format.name(),
                    format.default_file()
                ),
                f if f.is_not_found() => "missing".to_string(),
                FileError::NotRegular { kind, .. } => {
                    format!("is a {kind}, not a regular file: copy the model file itself")
                }
                FileError::Io { source, .. } => format!("unreadable: {source}"),
                other => other.to_string(),
            };
            (path, reason)
        }
        artifact::ArtifactError::HardLink { path, names } => (
            path,
            format!("is a hard link ({names} names for one file): copy the file itself into this folder"),
        ),
        artifact::ArtifactError::Empty { path } => (path, "is empty (was the copy interrupted?)".into()),
        artifact::ArtifactError::Folder(p) => {
            return SubmissionError::Unsupported {
                path: model.to_path_buf(),
                reason: p.to_string(),
                fix: format!("Send a stock nnU-Net v2 folder ({}).", ModelFormat::NnUnet.export_hint()),
            }
        }
        other => (model.to_path_buf(), other.to_string()),
    };
    SubmissionError::Model { path, reason }
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
    let (cases, mut failures, times) = pipeline::evaluate(
        &data,
        &task.eval,
        backend,
        ctx.save_predictions.as_deref(),
        on_progress,
        cancel,
    );
    // A DICOM case evald cannot read exactly is the test set's problem, named per case.
    failures.extend(
        task.dicom_refused
            .iter()
            .map(|r| crate::evaluation::Failure {
                case: r.case.clone(),
                stage: crate::evaluation::Stage::Reference,
                reason: crate::testset::refusal_text(r),
                attempts: 1,
            }),
    );
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
    /// Where to write each case's predicted label map (`<case>.nii.gz`); `None`: nowhere.
    pub save_predictions: Option<PathBuf>,
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
            save_predictions: None,
        }
    }

    /// Save predictions into the state folder's `predictions/<task>/<vendor>/<name>/`
    /// when the task asks for it (`save_predictions = true`).
    pub fn with_task_predictions(
        mut self,
        settings: &crate::config::Settings,
        task: &TaskSettings,
        sub: &Prepared,
    ) -> Self {
        if task.save_predictions {
            let part = |p: &Option<String>| p.clone().unwrap_or_else(|| "-".into());
            self.save_predictions = Some(
                settings
                    .daemon
                    .state_dir
                    .join("predictions")
                    .join(&task.name)
                    .join(part(&sub.vendor))
                    .join(part(&sub.name)),
            );
        }
        self
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
