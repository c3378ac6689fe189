//! A task whose test set is DICOM (`format = "dicom"`), turned into the NIfTI test set the
//! rest of evald already scores: at evaluation start each case folder is imported (or
//! taken from the content-addressed cache, [`crate::dicom::import`]) into
//! `<state_dir>/dicom/<task>/{imagesTs,labelsTs}`, on the CT's own grid and affine, and
//! the task's `images` / `labels` point there. The hot path and the workers' sandbox stay
//! as they are; refused cases become per-case failures of the evaluation.

use std::path::{Path, PathBuf};

use crate::config::{TaskSettings, TestSetFormat};
use crate::dicom::import::{self, ImportError, RefusedCase};
use crate::dicom::Reason;

/// Folder (under the state dir) of the decoded-case cache shared by all tasks.
pub const CACHE_DIR: &str = "dicom-cache";
/// Folder (under the state dir) of each DICOM task's NIfTI view, `dicom/<task>/`.
pub const VIEW_DIR: &str = "dicom";

/// Why a DICOM task could not be made ready for evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TestSetError {
    /// A case's reference names a segment / ROI the task's `dicom_classes` does not map:
    /// the configuration is incomplete (not the case's fault).
    #[error("tasks.{task}.dicom_classes: case {case} ({}): {message}", dir.display())]
    Unmapped {
        /// Task name.
        task: String,
        /// Case id.
        case: String,
        /// The case folder.
        dir: PathBuf,
        /// What is unmapped and what to do.
        message: String,
    },
    /// evald's own I/O (listing the set, writing the cache or the view).
    #[error("task {task}: DICOM test set {}: {source}", set.display())]
    Import {
        /// Task name.
        task: String,
        /// The DICOM set.
        set: PathBuf,
        /// The error.
        #[source]
        source: ImportError,
    },
}

/// A DICOM task made ready: its settings with `images` / `labels` on the decoded NIfTI.
#[derive(Debug, Clone)]
pub struct Materialised {
    /// The task, pointing at the NIfTI view (refusals in `dicom_refused`).
    pub task: TaskSettings,
    /// Cases decoded now.
    pub decoded: usize,
    /// Cases taken from the cache.
    pub reused: usize,
}

/// Make a task's test set readable as NIfTI: a NIfTI task is returned as it is; a DICOM
/// task is imported through the cache under `state_dir`. Blocking (decodes): call it from
/// a blocking thread.
///
/// # Errors
/// [`TestSetError::Unmapped`] when any case names a segment / ROI the mapping lacks;
/// [`TestSetError::Import`] for I/O. Other refusals are not errors: they are in
/// [`TaskSettings::dicom_refused`].
pub fn materialise(task: &TaskSettings, state_dir: &Path) -> Result<Materialised, TestSetError> {
    if task.format == TestSetFormat::Nifti {
        return Ok(Materialised {
            task: task.clone(),
            decoded: 0,
            reused: 0,
        });
    }
    let set = task.labels.clone();
    let view = state_dir.join(VIEW_DIR).join(&task.name);
    let cache = state_dir.join(CACHE_DIR);
    let done = import::import(&set, &view, task.dicom_classes.as_ref(), Some(&cache)).map_err(
        |source| TestSetError::Import {
            task: task.name.clone(),
            set: set.clone(),
            source,
        },
    )?;
    if let Some(r) = done.refused.iter().find(|r| r.reason == Reason::Unmapped) {
        return Err(TestSetError::Unmapped {
            task: task.name.clone(),
            case: r.case.clone(),
            dir: r.source.clone(),
            message: r.message.clone(),
        });
    }
    let total = done.cases.len() + done.refused.len();
    tracing::info!(
        task = task.name,
        set = %set.display(),
        cases = done.cases.len(),
        refused = done.refused.len(),
        from_cache = done.reused,
        decoded = total - done.reused,
        "DICOM test set ready: {} case(s), {} refused, {} from cache, {} decoded",
        done.cases.len(),
        done.refused.len(),
        done.reused,
        total - done.reused,
    );
    for r in &done.refused {
        tracing::warn!(task = task.name, case = r.case, "{}", refusal_text(r));
    }
    let mut t = task.clone();
    t.images = view.join("imagesTs");
    t.labels = view.join("labelsTs");
    t.dicom_refused = done.refused;
    Ok(Materialised {
        task: t,
        decoded: total - done.reused,
        reused: done.reused,
    })
}

/// One line for a refused case: what, where, what to do (the refusal's message says the
/// last two).
pub fn refusal_text(r: &RefusedCase) -> String {
    format!(
        "DICOM case refused ({}), {}: {}",
        serde_json::to_value(r.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        r.source.display(),
        r.message
    )
}
