//! From a complete folder to a store row: validate what can be validated without running
//! the model (folder layout, symlinks, task, `submission.toml`, the model file and its
//! sha256), de-duplicate, then queue it, or reject it with a `REJECTED.txt` that tells
//! the vendor what is wrong and how to fix it.
//!
//! Runs on a blocking thread (hashing a model reads the whole file).

use std::path::{Path, PathBuf};

use crate::config::Settings;
use crate::layout::{FAILED_TXT, REJECTED_TXT};
use crate::store::{NewSubmission, State, StoreError, StoreHandle, Submission};
use crate::submission::{self, Prepared, SubmissionError};
use crate::watch::Ready;

use super::Finished;

/// Why a submission is refused, for the vendor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejection {
    /// Machine-readable kind (stored in `reject_code`).
    pub code: RejectCode,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

/// Why a submission was refused, as stored in `reject_code` and counted by `evald status`.
/// The spellings are stable: existing databases hold them (rows written before evald ran
/// other formats than TorchScript say `not-torchscript` for [`RejectCode::NotLoadable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectCode {
    /// The folder is not under a configured task.
    UnknownTask,
    /// A symbolic link where a file or the folder itself must be.
    Symlink,
    /// Too many entries, or folders too deep, to look at.
    TooManyFiles,
    /// The task's test set is unusable (the admin's to fix; the vendor is told).
    TestSet,
    /// `submission.toml` is wrong.
    Manifest,
    /// The model file is missing, empty, a link or unreadable.
    Model,
    /// The model file could not be loaded by the runtime of its format.
    NotLoadable,
    /// A model of a kind evald recognises but does not run (an ExportedProgram, a bare
    /// checkpoint, an nnU-Net folder that is not stock).
    UnsupportedFormat,
    /// The same model was already submitted elsewhere.
    Duplicate,
}

impl RejectCode {
    /// The stored spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectCode::UnknownTask => "unknown-task",
            RejectCode::Symlink => "symlink",
            RejectCode::TooManyFiles => "too-many-files",
            RejectCode::TestSet => "test-set",
            RejectCode::Manifest => "manifest",
            RejectCode::Model => "model",
            RejectCode::NotLoadable => "not-loadable",
            RejectCode::UnsupportedFormat => "unsupported-format",
            RejectCode::Duplicate => "duplicate",
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a vendor whose model cannot be found or read should do.
pub(crate) const MODEL_FIX: &str = "Copy one model into this folder: an nnU-Net v2 trained-model \
    folder as nnU-Net wrote it (<trainer>__<plans>__<configuration>/ with plans.json, dataset.json and \
    fold_N/checkpoint_final.pth), model.onnx (ONNX: torch.onnx.export(model, x, \"model.onnx\", \
    dynamo=True)), or model.pt (TorchScript, legacy: exported with torch.jit.trace or \
    torch.jit.script and saved with .save()); or name it in submission.toml: model = \"name\".";

impl Rejection {
    pub(crate) fn new(code: RejectCode, problem: String, fix: impl Into<String>) -> Self {
        Rejection {
            code,
            // Problems quote what the vendor wrote (a manifest line, a loader's message):
            // bounded, so a 20 MB manifest cannot become a 40 MB REJECTED.txt.
            problem: crate::logging::bounded(&problem, crate::logging::MAX_QUOTED).into_owned(),
            fix: fix.into(),
        }
    }

    /// From a validation error; `None` when it is not the vendor's problem (the task's
    /// test set cannot be read).
    pub(crate) fn from_submission_error(e: &SubmissionError) -> Option<Self> {
        match e {
            SubmissionError::Manifest(m) => Some(Rejection::new(
                RejectCode::Manifest,
                m.to_string(),
                "Correct submission.toml (keys: model, input, output, batch_size, patch_size, \
                 overlap, pad_multiple, window, description; see the vendor guide), or remove \
                 it to use the task's defaults.",
            )),
            SubmissionError::Model { .. } => {
                Some(Rejection::new(RejectCode::Model, e.to_string(), MODEL_FIX))
            }
            SubmissionError::Unsupported { fix, .. } => Some(Rejection::new(
                RejectCode::UnsupportedFormat,
                e.to_string(),
                fix.clone(),
            )),
            SubmissionError::Dataset(_)
            | SubmissionError::Changed { .. }
            | SubmissionError::Snapshot { .. } => None,
        }
    }
}

/// What ingestion did with a ready folder.
#[derive(Debug)]
pub(crate) enum Ingested {
    /// This content was handled before.
    Skipped,
    /// Files changed but the model did not: nothing to evaluate.
    Unchanged,
    /// Queued for evaluation.
    Queued,
    /// Refused (`REJECTED.txt` written where possible).
    Rejected(Finished),
}

/// Validate the folder without running anything.
fn examine(r: &Ready, settings: &Settings) -> Result<Prepared, Rejection> {
    let drop_dir = &settings.daemon.drop_dir;
    if let Some(target) = &r.symlinked_to {
        return Err(Rejection::new(
            RejectCode::Symlink,
            format!(
                "the submission folder {} is a symbolic link (to {})",
                r.sub.dir.display(),
                target.display()
            ),
            "Copy the folder itself into the drop folder; links are not followed.",
        ));
    }
    if r.fingerprint.overflow {
        return Err(Rejection::new(
            RejectCode::TooManyFiles,
            format!(
                "the folder {} holds more than {} files and folders",
                r.sub.dir.display(),
                crate::watch::MAX_ENTRIES
            ),
            "A submission is a model file and an optional submission.toml: remove the rest \
             (or copy only those two into a new folder).",
        ));
    }
    let Some(task) = settings.tasks.get(&r.sub.task) else {
        return Err(Rejection::new(
            RejectCode::UnknownTask,
            format!(
                "'{}' is not a task evaluated here (the first folder under the drop folder names the task)",
                r.sub.task
            ),
            format!(
                "Put the submission under one of: {} (e.g. <drop>/{}/{}/{}/model.pt).",
                settings.task_names(", "),
                settings.tasks.keys().next().map_or("TASK", String::as_str),
                r.sub.vendor,
                r.sub.name
            ),
        ));
    };
    let root = drop_dir
        .canonicalize()
        .unwrap_or_else(|_| drop_dir.to_path_buf());
    for (link, target) in &r.fingerprint.symlinks {
        let rel = link.strip_prefix(&r.sub.dir).unwrap_or(link).display();
        match link.canonicalize() {
            Ok(resolved) if resolved.starts_with(&root) => {}
            Ok(resolved) => {
                return Err(Rejection::new(
                    RejectCode::Symlink,
                    format!(
                        "{rel} is a symbolic link to {} ({}), outside the drop folder",
                        target.display(),
                        resolved.display()
                    ),
                    "Copy the file itself into this folder instead of linking to it.",
                ))
            }
            Err(e) => {
                return Err(Rejection::new(
                    RejectCode::Symlink,
                    format!(
                        "{rel} is a symbolic link to {} that cannot be followed ({e})",
                        target.display()
                    ),
                    "Copy the file itself into this folder instead of linking to it.",
                ))
            }
        }
    }
    let prepared = submission::prepare(&r.sub.dir, task).map_err(|e| {
        Rejection::from_submission_error(&e).unwrap_or_else(|| {
            // Not the vendor's fault, but the submission cannot go on; say so plainly.
            Rejection::new(
                RejectCode::TestSet,
                e.to_string(),
                "Nothing to change on your side: the evaluation team has been told (see the \
                 evald log); the submission is looked at again when the folder changes.",
            )
        })
    })?;
    // evald writes these names itself: a model by such a name would be overwritten by the
    // report and never make the folder look new.
    if let Some(name) = prepared.model_path.file_name().map(|n| n.to_string_lossy()) {
        if crate::layout::is_evald_output(&name) {
            return Err(Rejection::new(
                RejectCode::Manifest,
                format!("model = \"{name}\" names a file evald writes itself"),
                "Name the model file differently (e.g. model.pt) and set model = \"model.pt\" \
                 in submission.toml.",
            ));
        }
    }
    Ok(prepared)
}

/// Ingest one complete folder.
///
/// # Errors
/// Store failures only; every problem with the folder becomes a rejection.
pub(crate) fn ingest(
    r: &Ready,
    settings: &Settings,
    store: &StoreHandle,
) -> Result<Ingested, StoreError> {
    let dir = r.sub.dir.clone();
    let latest = {
        let dir = dir.clone();
        store.call_blocking(move |s| s.latest_for_path(&dir))?
    };
    if let Some(l) = &latest {
        // A task added by a reload makes folders refused for an unknown task worth another look.
        let task_now_known = l.state == State::Rejected
            && l.reject_code.as_deref() == Some("unknown-task")
            && settings.tasks.contains_key(&l.task);
        if l.fingerprint == r.fingerprint.digest && l.state != State::Seen && !task_now_known {
            return Ok(Ingested::Skipped);
        }
    }
    let verdict = examine(r, settings);
    let model = verdict
        .as_ref()
        .ok()
        .map(|p| (p.model_sha256.clone(), p.model_bytes));
    if let (Some(l), Some((sha, _))) = (&latest, &model) {
        if l.model_sha256.as_ref() == Some(sha) && State::EVALUATED.contains(&l.state) {
            let (id, fp) = (l.id, r.fingerprint.digest.clone());
            store.call_blocking(move |s| s.set_fingerprint(id, &fp))?;
            tracing::info!(
                id,
                task = %l.task,
                vendor = %l.vendor,
                name = %l.name,
                "files changed but the model did not; not evaluated again (`evald requeue {id}` forces it)"
            );
            return Ok(Ingested::Unchanged);
        }
    }
    let new = NewSubmission {
        path: dir.clone(),
        task: r.sub.task.clone(),
        vendor: r.sub.vendor.clone(),
        name: r.sub.name.clone(),
        fingerprint: r.fingerprint.digest.clone(),
    };
    let row = match &latest {
        // A crash between recording and validating left it `seen`, or it is still waiting
        // in the queue: reuse it (one row per upload, not one per chunk of it).
        Some(l) if matches!(l.state, State::Seen | State::Queued) => {
            let (id, fp) = (l.id, new.fingerprint.clone());
            store.call_blocking(move |s| {
                s.set_fingerprint(id, &fp)?;
                s.get(id)
            })?
        }
        _ => store.call_blocking(move |s| s.insert(&new))?,
    };
    let prepared = match verdict {
        Ok(p) => p,
        Err(rej) => return reject(store, &row, &rej, None),
    };
    let (sha, bytes) = model.expect("computed for a valid folder");
    let dup = {
        let (task, sha, dir) = (row.task.clone(), sha.clone(), dir.clone());
        store.call_blocking(move |s| s.same_model_elsewhere(&task, &sha, &dir))?
    };
    if let Some(d) = dup {
        // Only what this vendor may know: the other submission may be another vendor's,
        // so its folder, name and number stay in the log, for the team.
        tracing::info!(
            id = row.id,
            same_as = d.id,
            other = %d.path.display(),
            "duplicate model"
        );
        let same_vendor = d.vendor == row.vendor;
        let rej = Rejection::new(
            RejectCode::Duplicate,
            format!(
                "this model (sha256 {}) was already submitted for this task{}",
                &sha[..12.min(sha.len())],
                if same_vendor {
                    format!(", as your submission '{}'", d.name)
                } else {
                    String::new()
                }
            ),
            format!(
                "A model is evaluated once per task. If this copy is intended, ask the \
                 evaluation team to evaluate it anyway (evald requeue {}).",
                row.id
            ),
        );
        return reject(store, &row, &rej, Some((sha, bytes)));
    }
    let id = row.id;
    if row.state == State::Queued && row.model_sha256.as_deref() == Some(sha.as_str()) {
        // Other files changed; the model it waits with is the same.
    } else if row.state == State::Queued {
        store.call_blocking(move |s| s.replace_queued_model(id, &sha, bytes))?;
        tracing::info!(
            id,
            "the model changed before its evaluation started; the queued submission takes the new content"
        );
    } else {
        store.call_blocking(move |s| s.queue(id, &sha, bytes))?;
    }
    remove_stale_rejection(&prepared.dir);
    Ok(Ingested::Queued)
}

/// Record a rejection, write `REJECTED.txt` (unless the folder is a link), report it.
pub(crate) fn reject(
    store: &StoreHandle,
    row: &Submission,
    rej: &Rejection,
    model: Option<(String, u64)>,
) -> Result<Ingested, StoreError> {
    // The file first: once the store says `rejected`, the vendor can read why. (A crash in
    // between leaves the row `seen`, and the next look writes the file again.)
    if let Err(e) = write_rejected(row, rej) {
        tracing::error!(id = row.id, dir = %row.path.display(), "cannot write {REJECTED_TXT}: {e}");
    }
    let (id, code, text) = (row.id, rej.code, rej.problem.clone());
    let rejected = store.call_blocking(move |s| {
        s.reject(
            id,
            code.as_str(),
            &text,
            model.as_ref().map(|(sha, n)| (sha.as_str(), *n)),
        )
    })?;
    Ok(Ingested::Rejected(Finished {
        id,
        dir: rejected.path.clone(),
        state: State::Rejected,
        evaluation: None,
        summary: None,
        report: None,
        error: Some(rej.problem.clone()),
    }))
}

/// The text of `REJECTED.txt`.
pub(crate) fn rejected_text(sub: &Submission, rej: &Rejection) -> String {
    format!(
        "evald could not evaluate this submission (#{id}).\n\
         \n\
         What is wrong:\n  {problem}\n\
         \n\
         How to fix it:\n  {fix}\n\
         \n\
         {about}\
         \n\
         evald looks at this folder again by itself when its files change. A report.xlsx or\n\
         summary.json in this folder, if any, is from an earlier evaluation.\n",
        id = sub.id,
        problem = rej.problem,
        fix = rej.fix,
        about = about(sub),
    )
}

/// Where the rejection of the submission folder `dir` is written: `dir/REJECTED.txt`, or,
/// when `dir` is a symbolic link, `<name>.REJECTED.txt` beside the link in the vendor
/// folder: writing through the link would write outside the drop folder.
pub(crate) fn rejection_path(dir: &Path) -> PathBuf {
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    match is_link
        .then(|| crate::layout::rejected_beside(dir))
        .flatten()
    {
        Some(beside) => beside,
        None => dir.join(REJECTED_TXT),
    }
}

/// Write the rejection atomically (a `.tmp*` file the watcher ignores, then rename) at
/// [`rejection_path`] (or `<vendor>/#<id>.REJECTED.txt` when that name would be too long
/// for the file system: the vendor still gets an answer).
pub(crate) fn write_rejected(sub: &Submission, rej: &Rejection) -> std::io::Result<PathBuf> {
    let mut path = rejection_path(&sub.path);
    if path.file_name().is_some_and(|n| n.len() > 255) {
        if let Some(parent) = path.parent() {
            path = crate::layout::rejected_by_id(parent, sub.id);
        }
    }
    write_vendor_file(&path, &rejected_text(sub, rej))
}

/// The text of `FAILED.txt`.
pub(crate) fn failed_text(sub: &Submission, reason: &str) -> String {
    format!(
        "evald could not finish evaluating this submission (#{id}).\n\
         \n\
         What happened:\n  {reason}\n\
         \n\
         This is a problem on the evaluation side, not with your submission: the evaluation\n\
         team has been told and evaluates it again once it is fixed. Nothing to change here.\n\
         \n\
         {about}",
        id = sub.id,
        reason = crate::logging::bounded(reason, crate::logging::MAX_QUOTED),
        about = about(sub),
    )
}

/// The lines naming the submission at the end of `REJECTED.txt` and `FAILED.txt`.
fn about(sub: &Submission) -> String {
    format!(
        "Folder:      {dir}\n\
         Task:        {task}\n\
         Vendor:      {vendor}\n\
         Submission:  {name}\n\
         Checked:     {at} by evald {version}\n",
        dir = sub.path.display(),
        task = sub.task,
        vendor = sub.vendor,
        name = sub.name,
        at = crate::store::now(),
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// Write `FAILED.txt` into the submission folder (never through a link).
pub(crate) fn write_failed(sub: &Submission, reason: &str) -> std::io::Result<PathBuf> {
    write_vendor_file(&sub.path.join(FAILED_TXT), &failed_text(sub, reason))
}

/// Write a file for the vendor atomically: a `.tmp*` file the watcher ignores, synced,
/// then renamed; only into a real folder of the drop tree.
fn write_vendor_file(path: &Path, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let path = path.to_path_buf();
    let Some(dir) = path.parent() else {
        return Err(std::io::Error::other("no folder to write into"));
    };
    // Never through a link: only into a real folder of the drop tree.
    if !std::fs::symlink_metadata(dir)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a folder (a link?); not writing into it",
            dir.display()
        )));
    }
    let mut tmp = crate::files::output_temp_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(path)
}

/// A new evaluation of a folder makes an earlier rejection or failure notice wrong (inside
/// it, or beside it from when it was a link).
pub(crate) fn remove_stale_rejection(dir: &Path) {
    let beside = crate::layout::rejected_beside(dir);
    let inside = [dir.join(REJECTED_TXT), dir.join(FAILED_TXT)];
    for p in inside.into_iter().chain(beside) {
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::debug!(path = %p.display(), "removed an earlier rejection"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), "cannot remove an earlier rejection: {e}")
            }
        }
    }
}
