//! Running a vendor's model over a CT volume to get a label map.
//!
//! Runtime-neutral (this module): what a model takes and gives ([`InferSpec`], one set of
//! [`rules`] for its settings), the [`ModelFormat`]s evald knows and what each needs from
//! the worker's sandbox ([`SandboxNeeds`]), errors, timings, and [`Model`]: load once
//! (checking the bytes' hash), then [`Model::predict`] per case, whatever runs it.
//! - [`tiling`]: the HU window into model input, the 3D sliding window's tile positions
//!   and Gaussian importance map, with no tensor library;
//! - runtimes, one per format: [`torchscript`] (libtorch via tch: 2D batches, the 3D
//!   sliding window's accumulation on the device), [`onnx`] (ONNX Runtime via ort, loaded
//!   at run time: the same 2D batches and 3D windows, accumulated on the CPU);
//! - [`device`]: `cpu` / `cuda:N` parsing, and loading libtorch's CUDA library at run time
//!   so one binary serves CPU-only machines and GPUs.
//!
//! Tensor layout: NIfTI data is `[x, y, z]` with `x` fastest, which is exactly a C-order
//! `[z, y, x]` buffer; so a 2D slice is `[H = ny, W = nx]` and a volume `[D = nz, H, W]`
//! (what SimpleITK's `GetArrayFromImage` gives Python pipelines) without any copy.
//!
//! A model that throws, returns the wrong shape or NaN is an [`InferError`] for that case,
//! never a panic. CUDA out-of-memory halves the batch before giving up
//! ([`halve_on_oom`], the one place that rule lives).

pub mod artifact;
pub mod device;
pub mod nnunet;
pub mod onnx;
pub mod tiling;
pub mod torchscript;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::volume::{ImageVolume, LabelVolume};

pub use torchscript::first_line;

/// How the model wants its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// `[B, 1, H, W]` axial slices.
    #[serde(rename = "slices2d")]
    Slices2d,
    /// `[B, 1, D, H, W]` patches of a sliding window.
    #[serde(rename = "volume3d")]
    Volume3d,
}

impl InputKind {
    /// Parse the config/manifest spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "slices2d" => Some(InputKind::Slices2d),
            "volume3d" => Some(InputKind::Volume3d),
            _ => None,
        }
    }

    /// Forward-call batch when neither the task nor the manifest says: a stack of 2D
    /// slices is cheap, a 3D patch is not.
    pub fn default_batch_size(self) -> usize {
        match self {
            InputKind::Slices2d => 16,
            InputKind::Volume3d => 1,
        }
    }
}

/// What the model returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// `[B, C, ...]` unnormalised scores: argmax over C (C = 1: > 0).
    Logits,
    /// `[B, C, ...]` probabilities: argmax over C (C = 1: > 0.5).
    Probabilities,
    /// `[B, ...]` or `[B, 1, ...]` integer labels.
    Labels,
}

impl OutputKind {
    /// Parse the config/manifest spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "logits" => Some(OutputKind::Logits),
            "probabilities" => Some(OutputKind::Probabilities),
            "labels" => Some(OutputKind::Labels),
            _ => None,
        }
    }
}

/// HU window: values are mapped to `[0, 1]` by `(v - (level - width/2)) / width`, clipped.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Centre (HU).
    pub level: f32,
    /// Width (HU).
    pub width: f32,
}

impl Window {
    /// Apply the window to one value.
    #[inline]
    pub fn apply(&self, v: f32) -> f32 {
        ((v - (self.level - self.width / 2.0)) / self.width).clamp(0.0, 1.0)
    }
}

/// Everything inference needs to know about a model (task defaults + vendor manifest).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InferSpec {
    /// Input kind.
    pub input: InputKind,
    /// Output kind.
    pub output: OutputKind,
    /// HU window.
    pub window: Window,
    /// Slices (2D) or patches (3D) per forward call.
    pub batch_size: usize,
    /// 3D patch `[D, H, W]`.
    pub patch_size: [usize; 3],
    /// 3D window overlap fraction.
    pub overlap: f64,
    /// Pad H and W (2D) up to a multiple of this (e.g. 8 for a 3-pooling U-Net).
    pub pad_multiple: usize,
    /// Classes the model may output (for one-hot blending of `labels` in 3D).
    pub num_classes: usize,
}

/// A value of an inference setting out of range: the key and what is accepted. The one
/// set of rules for these keys, whether a task's default (config) or a vendor's
/// `submission.toml` sets them, so a default the admin can write is one a vendor may
/// write too.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SpecError {
    /// The key (`batch_size`, `patch_size`, ...).
    pub key: &'static str,
    /// What is wrong and what is accepted.
    pub message: String,
}

/// The rules for each inference setting (see [`SpecError`]).
pub mod rules {
    use super::{InputKind, OutputKind, SpecError, Window};

    fn bad(key: &'static str, message: String) -> SpecError {
        SpecError { key, message }
    }

    /// `input`: `slices2d` | `volume3d`.
    ///
    /// # Errors
    /// Any other spelling.
    pub fn input(s: &str) -> Result<InputKind, SpecError> {
        InputKind::parse(s)
            .ok_or_else(|| bad("input", format!("'{s}': use \"slices2d\" or \"volume3d\"")))
    }

    /// `output`: `logits` | `probabilities` | `labels`.
    ///
    /// # Errors
    /// Any other spelling.
    pub fn output(s: &str) -> Result<OutputKind, SpecError> {
        OutputKind::parse(s).ok_or_else(|| {
            bad(
                "output",
                format!("'{s}': use \"logits\", \"probabilities\" or \"labels\""),
            )
        })
    }

    /// `batch_size`: 1..=4096.
    ///
    /// # Errors
    /// Out of range.
    pub fn batch_size(b: usize) -> Result<usize, SpecError> {
        if (1..=4096).contains(&b) {
            Ok(b)
        } else {
            Err(bad("batch_size", format!("{b}: use 1..=4096")))
        }
    }

    /// `patch_size`: each of D, H, W in 1..=1024.
    ///
    /// # Errors
    /// A dimension out of range.
    pub fn patch_size(p: [usize; 3]) -> Result<[usize; 3], SpecError> {
        if p.iter().all(|d| (1..=1024).contains(d)) {
            Ok(p)
        } else {
            Err(bad(
                "patch_size",
                format!("{p:?}: each of D, H, W must be 1..=1024"),
            ))
        }
    }

    /// `overlap`: a fraction in [0, 0.95).
    ///
    /// # Errors
    /// Out of range (or NaN).
    pub fn overlap(o: f64) -> Result<f64, SpecError> {
        if (0.0..0.95).contains(&o) {
            Ok(o)
        } else {
            Err(bad("overlap", format!("{o}: use a fraction in [0, 0.95)")))
        }
    }

    /// `pad_multiple`: 1..=256.
    ///
    /// # Errors
    /// Out of range.
    pub fn pad_multiple(m: usize) -> Result<usize, SpecError> {
        if (1..=256).contains(&m) {
            Ok(m)
        } else {
            Err(bad("pad_multiple", format!("{m}: use 1..=256")))
        }
    }

    /// `window`: a finite level and a finite width > 0, in HU.
    ///
    /// # Errors
    /// Not finite, or a width <= 0.
    pub fn window(level: f64, width: f64) -> Result<Window, SpecError> {
        if !level.is_finite() {
            Err(bad(
                "window",
                format!("level {level} width {width}: level must be a finite number of HU"),
            ))
        } else if !(width.is_finite() && width > 0.0) {
            Err(bad(
                "window",
                format!("level {level} width {width}: width must be a finite number of HU > 0"),
            ))
        } else {
            Ok(Window {
                level: level as f32,
                width: width as f32,
            })
        }
    }
}

/// Largest model file a worker reads into memory to verify and load (far above any
/// segmentation network; a bound so a sparse multi-terabyte file cannot exhaust memory).
pub const MAX_MODEL_BYTES: u64 = 16 << 30;

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The file cannot be loaded as its format.
    #[error("model {path}: cannot load as {format} on {device}: {message} ({hint})", format = format.name(), hint = format.export_hint())]
    Load {
        /// Model file.
        path: PathBuf,
        /// The format it was loaded as.
        format: ModelFormat,
        /// Device.
        device: String,
        /// The runtime's message, first line (or what evald found wrong with the graph).
        message: String,
    },
    /// The model raised during forward.
    #[error("model raised on input {input_shape:?}: {message}")]
    Forward {
        /// Input shape.
        input_shape: Vec<i64>,
        /// libtorch's message, first line.
        message: String,
    },
    /// CUDA out of memory, even at batch 1.
    #[error("CUDA out of memory at batch size {batch}: {message}")]
    OutOfMemory {
        /// Batch size that failed.
        batch: usize,
        /// libtorch's message, first line.
        message: String,
    },
    /// The output has the wrong shape, type or values.
    #[error("model output unusable: {0}")]
    BadOutput(String),
    /// The model's own pipeline cannot take this image (nnU-Net's preprocessing: a grid
    /// that resamples to nothing or to more than evald allocates).
    #[error("the model's preprocessing cannot take this image: {0}")]
    Input(String),
    /// The device is unusable.
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    /// The model file is not the one that was checked (it changed since it was hashed).
    #[error("model {path}: sha256 {found} is not the {expected} that was checked; not loaded")]
    Changed {
        /// Model file.
        path: PathBuf,
        /// The hash the submission was recorded with.
        expected: String,
        /// The hash of the bytes found now.
        found: String,
    },
    /// The model file cannot be read.
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// Any other libtorch failure (tensor conversion, device copy).
    #[error("libtorch: {0}")]
    Torch(String),
    /// The runtime of the model's format is not installed or not usable here (evald's
    /// installation, not the model: the ONNX Runtime library is missing, say).
    #[error("{format} runtime unavailable: {message}", format = format.name())]
    RuntimeUnavailable {
        /// The format whose runtime is missing.
        format: ModelFormat,
        /// What is missing and how to install it.
        message: String,
    },
}

impl InferError {
    /// Whether retrying the same case in a fresh process could help (OOM, device trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, InferError::OutOfMemory { .. } | InferError::Torch(_))
    }
}

/// Timings of one prediction.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictStats {
    /// Seconds inside `forward` (synchronised on CUDA).
    pub forward_secs: f64,
    /// Seconds for the whole prediction (windowing, copies, argmax).
    pub total_secs: f64,
    /// Batch size finally used (smaller than asked after OOM).
    pub batch_used: usize,
    /// Forward calls made.
    pub forward_calls: usize,
}

/// A model file format, and with it the runtime that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A `torch.jit` module saved with `.save()`, run by libtorch (legacy: deprecated by
    /// PyTorch since 2.11).
    TorchScript,
    /// An nnU-Net v2 trained-model folder, run by evald's own reproduction of nnU-Net's
    /// inference over libtorch ([`nnunet`]).
    #[serde(rename = "nnunet")]
    NnUnet,
    /// An ONNX graph (`torch.onnx.export`), run by ONNX Runtime.
    Onnx,
}

impl ModelFormat {
    /// Every format evald runs.
    pub const ALL: [ModelFormat; 3] = [
        ModelFormat::NnUnet,
        ModelFormat::Onnx,
        ModelFormat::TorchScript,
    ];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "TorchScript",
            ModelFormat::NnUnet => "nnU-Net v2",
            ModelFormat::Onnx => "ONNX",
        }
    }

    /// Whether a model of this format is a folder (else one file).
    pub fn is_folder(self) -> bool {
        matches!(self, ModelFormat::NnUnet)
    }

    /// Its spelling in `submission.toml` (`format = "torchscript"`).
    pub fn key(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "torchscript",
            ModelFormat::NnUnet => "nnunet",
            ModelFormat::Onnx => "onnx",
        }
    }

    /// The library that runs it, for the report's provenance (`ONNX Runtime`).
    pub fn runtime_name(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "libtorch",
            ModelFormat::Onnx => "ONNX Runtime",
            ModelFormat::NnUnet => nnunet::RUNTIME_NAME,
        }
    }

    /// Parse the `submission.toml` spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.key() == s)
    }

    /// The file a submission holds when its manifest names none (for a folder format, an
    /// example of its name: the folder is found by its content).
    pub fn default_file(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "model.pt",
            ModelFormat::NnUnet => "nnUNetTrainer__nnUNetPlans__3d_fullres",
            ModelFormat::Onnx => "model.onnx",
        }
    }

    /// How a vendor makes a file of this format (for load errors and rejections).
    pub fn export_hint(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => {
                "export it with torch.jit.trace or torch.jit.script and save with .save()"
            }
            ModelFormat::NnUnet => {
                "copy the trained-model folder as nnU-Net wrote it (<trainer>__<plans>__<configuration> with \
                 plans.json, dataset.json and fold_N/checkpoint_final.pth), e.g. unpacked from \
                 nnUNetv2_export_model_to_zip"
            }
            ModelFormat::Onnx => {
                "export it with torch.onnx.export(model, x, \"model.onnx\", dynamo=True, dynamic_shapes=...) \
                 with one float32 input and one output"
            }
        }
    }

    /// What a vendor whose file this format's runtime cannot load should do (the fix of
    /// the daemon's rejection).
    pub fn reload_fix(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => {
                "Export the model with torch.jit.trace or torch.jit.script, save it with \
                 .save(\"model.pt\") using PyTorch 2.x, and check that torch.jit.load(\"model.pt\") \
                 works on a machine without your training code."
            }
            ModelFormat::NnUnet => {
                "Copy the trained-model folder exactly as nnU-Net wrote it (plans.json, dataset.json, \
                 fold_N/checkpoint_final.pth, e.g. unpacked from nnUNetv2_export_model_to_zip), and \
                 check that nnUNetv2_predict_from_modelfolder runs it with stock nnunetv2."
            }
            ModelFormat::Onnx => {
                "Export the model with torch.onnx.export(model, x, \"model.onnx\", dynamo=True, \
                 dynamic_shapes=...) (one float32 input [B, 1, ...], one output, dynamic batch and \
                 spatial axes), and check that onnxruntime.InferenceSession(\"model.onnx\") runs it."
            }
        }
    }

    /// The version of the library that runs it, for the report's provenance.
    pub fn runtime_version(self) -> String {
        match self {
            ModelFormat::TorchScript => device::libtorch_version(),
            ModelFormat::NnUnet => device::libtorch_version(),
            ModelFormat::Onnx => onnx::version(),
        }
    }

    /// Check that `device` (`cpu`, `cuda:N`) is usable by this format's runtime. Asking
    /// initialises the CUDA driver (the worker does it before its sandbox), through the
    /// format's own runtime: an ONNX worker never touches libtorch's CUDA.
    ///
    /// # Errors
    /// [`device::DeviceError`] for a malformed name or a device this runtime cannot use.
    pub fn check_device(self, device: &str) -> Result<(), device::DeviceError> {
        match self {
            ModelFormat::TorchScript | ModelFormat::NnUnet => device::parse(device).map(drop),
            ModelFormat::Onnx => onnx::check_device(device).map(drop),
        }
    }

    /// Size this format's runtime's intra-op thread pool (the worker's per-worker thread
    /// count), touching no other runtime's: two busy thread pools in one process slow each
    /// other down.
    pub fn set_threads(self, threads: usize) {
        match self {
            ModelFormat::TorchScript | ModelFormat::NnUnet => tch::set_num_threads(threads as i32),
            ModelFormat::Onnx => onnx::set_intra_threads(threads),
        }
    }

    /// What a worker running this format needs from its sandbox, beyond the model, the
    /// images and its scratch folder.
    pub fn sandbox_needs(self, gpu: bool) -> SandboxNeeds {
        match self {
            // nnU-Net's networks run on libtorch too.
            ModelFormat::TorchScript | ModelFormat::NnUnet => torchscript::sandbox_needs(gpu),
            ModelFormat::Onnx => onnx::sandbox_needs(gpu),
        }
    }
}

/// What a runtime must be granted inside the worker's sandbox: the libraries it loads
/// after the sandbox is on, and device nodes. The sandbox adds nothing runtime-specific
/// of its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxNeeds {
    /// Files and folders it reads (shared libraries it `dlopen`s later, their data).
    pub read_only: Vec<PathBuf>,
    /// Folders it reads and writes (`/dev/shm` for CUDA's IPC).
    pub read_write: Vec<PathBuf>,
    /// Device nodes it opens read-write with ioctls (`/dev/nvidia*`).
    pub devices: Vec<PathBuf>,
}

/// What a runtime does with a loaded model: one case in, a label map on its grid out.
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// Predict a label map on `image`'s grid.
    ///
    /// # Errors
    /// [`InferError`] when the model raises, runs out of memory at batch 1, or returns an
    /// unusable output.
    fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError>;
}

/// A model loaded by the runtime of its format, bound to one device.
#[derive(Debug)]
pub struct Model {
    format: ModelFormat,
    path: PathBuf,
    spec: InferSpec,
    runtime: Box<dyn Runtime>,
}

impl Model {
    /// Load the TorchScript file `path` onto `device` (`cpu`, `cuda:N`).
    ///
    /// # Errors
    /// [`InferError::Device`] for an unusable device, [`InferError::Load`] for a file that
    /// is not of the format.
    pub fn load(path: &Path, device: &str, spec: InferSpec) -> Result<Self, InferError> {
        Self::load_as(ModelFormat::TorchScript, path, device, spec)
    }

    /// Load `path` as `format` onto `device`.
    ///
    /// # Errors
    /// As [`Model::load`], and [`InferError::File`] for an unreadable model.
    pub fn load_as(
        format: ModelFormat,
        path: &Path,
        device: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        format.check_device(device)?;
        let read =
            artifact::read(format, path).map_err(|e| artifact_error(format, path, device, e))?;
        Self::from_read(format, read, device, spec)
    }

    /// Load `path` only if its bytes hash to `sha256` (hex): the bytes are read once,
    /// hashed, and those very bytes are loaded, so a file replaced in between can never
    /// be run under the recorded hash.
    ///
    /// # Errors
    /// [`InferError::Changed`] for other bytes, [`InferError::File`] for an unreadable or
    /// non-regular file, otherwise as [`Model::load`].
    pub fn load_verified(
        path: &Path,
        sha256: &str,
        device: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        Self::load_verified_as(ModelFormat::TorchScript, path, sha256, device, spec)
    }

    /// [`Model::load_verified`] for a model of `format` (a folder's digest is over its
    /// members, see [`artifact`]).
    ///
    /// # Errors
    /// As [`Model::load_verified`].
    pub fn load_verified_as(
        format: ModelFormat,
        path: &Path,
        sha256: &str,
        device: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        // The device first: a missing GPU is the admin's problem whatever the file holds.
        format.check_device(device)?;
        let read = artifact::read_verified(format, path, sha256)
            .map_err(|e| artifact_error(format, path, device, e))?;
        Self::from_read(format, read, device, spec)
    }

    fn from_read(
        format: ModelFormat,
        read: artifact::Read,
        device: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        let path = read.path.clone();
        let runtime: Box<dyn Runtime> = match format {
            ModelFormat::NnUnet => Box::new(nnunet::NnUnet::load(&read, device)?),
            // A one-file format: its one member's bytes.
            ModelFormat::TorchScript | ModelFormat::Onnx => {
                let bytes = read
                    .files
                    .into_iter()
                    .next()
                    .map(|f| f.1)
                    .unwrap_or_default();
                match format {
                    ModelFormat::Onnx => {
                        Box::new(onnx::Onnx::load_bytes(&bytes, &path, device, spec.clone())?)
                    }
                    _ => Box::new(torchscript::TorchScript::load_bytes(
                        bytes,
                        &path,
                        device,
                        spec.clone(),
                    )?),
                }
            }
        };
        Ok(Model {
            format,
            path,
            spec,
            runtime,
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// The spec in use.
    pub fn spec(&self) -> &InferSpec {
        &self.spec
    }

    /// Predict a label map on `image`'s grid.
    ///
    /// # Errors
    /// As [`Runtime::predict`].
    pub fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError> {
        self.runtime.predict(image)
    }
}

/// A model's files as an [`InferError`]: a changed or unreadable file keeps its own
/// variant (the worker treats those as the model's problem, not the case's); a folder
/// that is not of its format, an empty or hard-linked file, cannot be loaded.
fn artifact_error(
    format: ModelFormat,
    path: &Path,
    device: &str,
    e: artifact::ArtifactError,
) -> InferError {
    match e {
        artifact::ArtifactError::File(f) => InferError::File(f),
        artifact::ArtifactError::Changed {
            path,
            expected,
            found,
        } => InferError::Changed {
            path,
            expected,
            found,
        },
        other => InferError::Load {
            path: path.to_path_buf(),
            format,
            device: device.to_string(),
            message: other.to_string(),
        },
    }
}

/// The one CUDA out-of-memory rule, for every runtime and input kind: on out-of-memory
/// with a batch above 1, halve the batch (returns `true`: try again); otherwise the error
/// stands (`false`). Memory the caching allocator keeps after a failure at batch 1 is
/// only given back by a fresh process, which the pool's retry policy provides.
pub fn halve_on_oom(err: &InferError, batch: &mut usize) -> bool {
    if matches!(err, InferError::OutOfMemory { .. }) && *batch > 1 {
        *batch /= 2;
        tracing::warn!(batch = *batch, "CUDA out of memory: halving the batch");
        true
    } else {
        false
    }
}

/// Convenience for callers that time things.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom(batch: usize) -> InferError {
        InferError::OutOfMemory {
            batch,
            message: "CUDA out of memory".into(),
        }
    }

    #[test]
    fn out_of_memory_halves_the_batch_down_to_one_and_nothing_else_does() {
        let mut batch = 8;
        assert!(halve_on_oom(&oom(8), &mut batch));
        assert_eq!(batch, 4);
        assert!(halve_on_oom(&oom(4), &mut batch));
        assert!(halve_on_oom(&oom(2), &mut batch));
        assert_eq!(batch, 1);
        // At batch 1 the error is the caller's (the pool retries on a fresh worker).
        assert!(!halve_on_oom(&oom(1), &mut batch));
        assert_eq!(batch, 1);
        // Any other error is not retried, and the batch is left alone.
        let mut batch = 4;
        assert!(!halve_on_oom(
            &InferError::BadOutput("NaN".into()),
            &mut batch
        ));
        assert!(!halve_on_oom(
            &InferError::Torch("device".into()),
            &mut batch
        ));
        assert_eq!(batch, 4);
    }
}
