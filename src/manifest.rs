//! The vendor's optional `submission.toml`: how to feed their model. Anything missing
//! falls back to the task's defaults; anything unknown or malformed is a rejection with a
//! message the vendor can act on (it ends up in `REJECTED.txt`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::TaskSettings;
use crate::infer::{rules, InferSpec, ModelFormat, SpecError};

use crate::layout::MANIFEST;
/// A manifest is a dozen short keys; anything larger is refused unread (bytes a vendor
/// controls are never amplified into logs, the store or `REJECTED.txt`).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// `submission.toml` as written by the vendor.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model format (`nnunet`, `onnx`, `torchscript`; default: found from the folder's content).
    pub format: Option<String>,
    /// Model file or folder inside the submission folder (default: the format's file, e.g.
    /// `model.onnx`, or the one nnU-Net trained-model folder).
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
    /// The model's format as written (`None`: found from the folder's content).
    ///
    /// # Errors
    /// [`ManifestError::Value`] naming the formats evald runs.
    pub fn format(&self, dir: &Path) -> Result<Option<ModelFormat>, ManifestError> {
        let Some(f) = self.format.as_deref() else {
            return Ok(None);
        };
        ModelFormat::parse(f)
            .map(Some)
            .ok_or_else(|| ManifestError::Value {
                path: dir.join(MANIFEST),
                key: "format",
                message: format!(
                    "'{f}' is not a model format evald runs; use one of: {}",
                    ModelFormat::ALL.map(ModelFormat::key).join(", ")
                ),
            })
    }

    /// The model file (or folder) this manifest names, inside `dir` (no path separators
    /// allowed); `None` when it names none.
    ///
    /// # Errors
    /// [`ManifestError::Value`] when `model` is not a plain name.
    pub fn model_path(&self, dir: &Path) -> Result<Option<PathBuf>, ManifestError> {
        let Some(name) = self.model.as_deref() else {
            return Ok(None);
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ManifestError::Value {
                path: dir.join(MANIFEST),
                key: "model",
                message: format!(
                    "'{name}' must be a file or folder name inside the submission folder"
                ),
            });
        }
        Ok(Some(dir.join(name)))
    }

    /// Merge with the task's defaults into an [`InferSpec`].
    ///
    /// # Errors
    /// [`ManifestError::Value`] naming the key that is out of range.
    pub fn infer_spec(&self, dir: &Path, task: &TaskSettings) -> Result<InferSpec, ManifestError> {
        let path = dir.join(MANIFEST);
        let v = |e: SpecError| ManifestError::Value {
            path: path.clone(),
            key: e.key,
            message: e.message,
        };
        let input = match self.input.as_deref() {
            None => task.input,
            Some(s) => rules::input(s).map_err(v)?,
        };
        let output = match self.output.as_deref() {
            None => task.output,
            Some(s) => rules::output(s).map_err(v)?,
        };
        // A manifest that changes the input kind gets that kind's default batch, not the
        // task's (a 2D default of 16 would be 16 3D patches per call).
        let batch_size = match self.batch_size {
            Some(b) => b,
            None if self.input.is_some() && input != task.input => input.default_batch_size(),
            None => task.batch_size,
        };
        let batch_size = rules::batch_size(batch_size).map_err(v)?;
        let patch_size =
            rules::patch_size(self.patch_size.unwrap_or(task.patch_size)).map_err(v)?;
        let overlap = rules::overlap(self.overlap.unwrap_or(task.overlap)).map_err(v)?;
        let pad_multiple = rules::pad_multiple(self.pad_multiple.unwrap_or(1)).map_err(v)?;
        let window = match self.window {
            None => task.window,
            Some(w) => rules::window(w.level, w.width).map_err(v)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("evald.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn task_defaults_follow_the_same_rules_as_a_vendor_manifest() {
        let dir = tempfile::tempdir().unwrap();
        for (sub, file) in [("images", "c_0000.nii.gz"), ("labels", "c.nii.gz")] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join(file), b"").unwrap();
        }
        let task = |extra: &str| {
            format!(
                "[tasks.t]\nimages = \"{0}/images\"\nlabels = \"{0}/labels\"\nclasses = {{ 1 = \"a\" }}\n{extra}\n",
                dir.path().display()
            )
        };
        // A default the manifest would refuse (patch over 1024) once made every vendor's
        // submission fail: it is the admin's error, reported by the config.
        let p = write_config(
            dir.path(),
            &task(
                "patch_size = [1025, 64, 64]\noverlap = 0.95\nwindow = { level = 40, width = 0 }",
            ),
        );
        let crate::config::ConfigError::Invalid { problems, .. } =
            crate::config::load(&p).unwrap_err()
        else {
            panic!("expected Invalid");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in ["tasks.t.patch_size", "tasks.t.overlap", "tasks.t.window"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        // The largest defaults the config takes are ones an empty manifest keeps.
        let p = write_config(
            dir.path(),
            &task("input = \"volume3d\"\npatch_size = [1024, 1024, 1024]\nbatch_size = 4096\noverlap = 0.94"),
        );
        let s = crate::config::load(&p).unwrap();
        let spec = Manifest::default()
            .infer_spec(dir.path(), &s.tasks["t"])
            .unwrap();
        assert_eq!(
            (spec.patch_size, spec.batch_size),
            ([1024, 1024, 1024], 4096)
        );
    }
}
