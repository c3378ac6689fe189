//! The vendor's optional `submission.toml`: how to feed their model. Anything missing
//! falls back to the task's defaults; anything unknown or malformed is a rejection with a
//! message the vendor can act on (it ends up in `REJECTED.txt`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::TaskSettings;
use crate::infer::{InferSpec, InputKind, OutputKind, Window};

/// Manifest file name in a submission folder.
pub const MANIFEST: &str = "submission.toml";
/// Default model file name in a submission folder.
pub const MODEL: &str = "model.pt";
/// A manifest is a dozen short keys; anything larger is refused unread (bytes a vendor
/// controls are never amplified into logs, the store or `REJECTED.txt`).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// `submission.toml` as written by the vendor.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model file inside the submission folder (default `model.pt`).
    pub model: Option<String>,
    /// `slices2d` | `volume3d`.
    pub input: Option<String>,
    /// `logits` | `probabilities` | `labels`.
    pub output: Option<String>,
    /// Slices or patches per forward call.
    pub batch_size: Option<usize>,
    /// 3D patch `[D, H, W]`.
    pub patch_size: Option<[usize; 3]>,
    /// 3D overlap fraction.
    pub overlap: Option<f64>,
    /// Pad 2D slices to a multiple of this.
    pub pad_multiple: Option<usize>,
    /// HU window override.
    pub window: Option<ManifestWindow>,
    /// Free text shown in the report.
    pub description: Option<String>,
}

/// Window override.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestWindow {
    /// Centre (HU).
    pub level: f64,
    /// Width (HU).
    pub width: f64,
}

/// The manifest is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Unreadable, not a regular file (a FIFO would block the reader), or too large.
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// Syntax, unknown key or wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// toml's message (with line and column).
        message: String,
    },
    /// A value out of range.
    #[error("{path}: {key}: {message}")]
    Value {
        /// The manifest.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
}

/// Read `<dir>/submission.toml` if present (absent = all defaults).
///
/// # Errors
/// [`ManifestError`] for an unreadable or invalid file.
pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
    let path = dir.join(MANIFEST);
    let text = match crate::files::read_text_bounded(&path, MAX_MANIFEST_BYTES) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(Manifest::default()),
        Err(e) => return Err(e.into()),
    };
    toml::from_str(&text).map_err(|e| ManifestError::Parse {
        path,
        message: e.to_string().trim().to_string(),
    })
}

impl Manifest {
    /// The model file this manifest names, inside `dir` (no path separators allowed).
    ///
    /// # Errors
    /// [`ManifestError::Value`] when `model` is not a plain file name.
    pub fn model_path(&self, dir: &Path) -> Result<PathBuf, ManifestError> {
        let name = self.model.as_deref().unwrap_or(MODEL);
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ManifestError::Value {
                path: dir.join(MANIFEST),
                key: "model",
                message: format!("'{name}' must be a file name inside the submission folder"),
            });
        }
        Ok(dir.join(name))
    }

    /// Merge with the task's defaults into an [`InferSpec`].
    ///
    /// # Errors
    /// [`ManifestError::Value`] naming the key that is out of range.
    pub fn infer_spec(&self, dir: &Path, task: &TaskSettings) -> Result<InferSpec, ManifestError> {
        let path = dir.join(MANIFEST);
        let bad = |key: &'static str, message: String| ManifestError::Value {
            path: path.clone(),
            key,
            message,
        };
        let input = match self.input.as_deref() {
            None => task.input,
            Some("slices2d") => InputKind::Slices2d,
            Some("volume3d") => InputKind::Volume3d,
            Some(o) => {
                return Err(bad(
                    "input",
                    format!("'{o}': use \"slices2d\" or \"volume3d\""),
                ))
            }
        };
        let output = match self.output.as_deref() {
            None => task.output,
            Some(o) => OutputKind::parse(o).ok_or_else(|| {
                bad(
                    "output",
                    format!("'{o}': use \"logits\", \"probabilities\" or \"labels\""),
                )
            })?,
        };
        let batch_size =
            self.batch_size
                .unwrap_or(if self.input.is_some() && input != task.input {
                    if input == InputKind::Slices2d {
                        16
                    } else {
                        1
                    }
                } else {
                    task.batch_size
                });
        if !(1..=4096).contains(&batch_size) {
            return Err(bad("batch_size", format!("{batch_size}: use 1..=4096")));
        }
        let patch_size = self.patch_size.unwrap_or(task.patch_size);
        if patch_size.iter().any(|&p| !(1..=1024).contains(&p)) {
            return Err(bad(
                "patch_size",
                format!("{patch_size:?}: each of D, H, W must be 1..=1024"),
            ));
        }
        let overlap = self.overlap.unwrap_or(task.overlap);
        if !(0.0..0.95).contains(&overlap) {
            return Err(bad(
                "overlap",
                format!("{overlap}: use a fraction in [0, 0.95)"),
            ));
        }
        let pad_multiple = self.pad_multiple.unwrap_or(1);
        if !(1..=256).contains(&pad_multiple) {
            return Err(bad("pad_multiple", format!("{pad_multiple}: use 1..=256")));
        }
        let window = match self.window {
            None => task.window,
            Some(w) if w.width > 0.0 && w.width.is_finite() && w.level.is_finite() => Window {
                level: w.level as f32,
                width: w.width as f32,
            },
            Some(w) => {
                let why = if !w.level.is_finite() {
                    "level must be a finite number of HU"
                } else {
                    "width must be a finite number of HU > 0"
                };
                return Err(bad(
                    "window",
                    format!("level {} width {}: {why}", w.level, w.width),
                ));
            }
        };
        let num_classes = task
            .eval
            .classes
            .iter()
            .map(|c| usize::from(c.label) + 1)
            .max()
            .unwrap_or(2);
        Ok(InferSpec {
            input,
            output,
            window,
            batch_size,
            patch_size,
            overlap,
            pad_multiple,
            num_classes,
        })
    }
}
