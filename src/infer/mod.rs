//! Running a vendor's TorchScript model over a CT volume to get a label map.
//!
//! - [`device`]: `cpu` / `cuda:N` parsing, and loading libtorch's CUDA library at run time
//!   so one binary serves CPU-only machines and GPUs;
//! - [`Model`]: load once, then [`Model::predict`] per case: HU window, `slices2d` batches
//!   along the third voxel axis or `volume3d` sliding windows with Gaussian blending
//!   ([`sliding`]), and the model's output (`logits` | `probabilities` | `labels`) turned
//!   into a label map on the image grid.
//!
//! Tensor layout: NIfTI data is `[x, y, z]` with `x` fastest, which is exactly a C-order
//! `[z, y, x]` buffer; so a 2D slice is `[H = ny, W = nx]` and a volume `[D = nz, H, W]`
//! (what SimpleITK's `GetArrayFromImage` gives Python pipelines) without any copy.
//!
//! Every tch call uses the fallible `f_*` variant: a model that throws, returns the wrong
//! shape or NaN is a [`InferError`] for that case, never a panic. CUDA out-of-memory is
//! recognised by message and handled by halving the batch before giving up, in one place
//! for 2D and 3D: `halving_on_oom`.

pub mod device;
pub mod sliding;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::volume::{ImageVolume, LabelVolume, Volume};

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

/// Largest model file a worker reads into memory to verify and load (far above any
/// segmentation network; a bound so a sparse multi-terabyte file cannot exhaust memory).
pub const MAX_MODEL_BYTES: u64 = 16 << 30;

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The file is not a loadable TorchScript module.
    #[error("model {path}: cannot load as TorchScript on {device}: {message} (export it with torch.jit.trace or torch.jit.script and save with .save())")]
    Load {
        /// Model file.
        path: PathBuf,
        /// Device.
        device: String,
        /// libtorch's message, first line.
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
}

impl InferError {
    /// Whether retrying the same case in a fresh process could help (OOM, device trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, InferError::OutOfMemory { .. } | InferError::Torch(_))
    }
}

/// First line of a libtorch error (they carry long C++ backtraces).
pub fn first_line(e: &tch::TchError) -> String {
    let s = e.to_string();
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("");
    // An exception raised by the model's own TorchScript code: the first line is the
    // interpreter's preamble; the model's message is the traceback's exception line.
    let line = if first.contains("The following operation failed in the TorchScript interpreter") {
        let rest: Vec<&str> = lines.collect();
        rest.iter()
            .find(|l| {
                l.starts_with("builtins.") || l.contains("Error: ") || l.contains("Exception: ")
            })
            .or(rest.last())
            .copied()
            .unwrap_or(first)
    } else {
        first
    };
    line.chars().take(500).collect()
}

fn is_oom(e: &tch::TchError) -> bool {
    let s = e.to_string();
    s.contains("out of memory") || s.contains("OutOfMemoryError")
}

/// Run one batch of at most `*batch` items (`left` still to do) through `step`, with CUDA
/// out of memory handled the one way evald handles it: halve `*batch` (it stays halved
/// for the rest of the prediction) and try again, down to 1. Out of memory at batch 1
/// is the caller's error; in the pool it gets the case retried on a fresh worker, since
/// only a new process gives the caching allocator's memory back. `what` names the batch
/// in the log line. Returns how many items the step took, and its result.
///
/// # Errors
/// The step's error, other than out of memory at a batch above 1.
pub(crate) fn halving_on_oom<T>(
    batch: &mut usize,
    left: usize,
    what: &str,
    mut step: impl FnMut(usize) -> Result<T, InferError>,
) -> Result<(usize, T), InferError> {
    loop {
        let n = (*batch).min(left);
        match step(n) {
            Err(InferError::OutOfMemory { .. }) if *batch > 1 => {
                *batch /= 2;
                tracing::warn!(batch = *batch, "CUDA out of memory: halving the {what}");
            }
            r => return r.map(|t| (n, t)),
        }
    }
}

fn torch(e: tch::TchError) -> InferError {
    InferError::Torch(first_line(&e))
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

/// A loaded TorchScript model bound to one device.
#[derive(Debug)]
pub struct Model {
    module: tch::CModule,
    device: Device,
    spec: InferSpec,
    path: PathBuf,
}

impl Model {
    /// Load `path` onto `device` (`cpu`, `cuda:N`) in eval mode.
    ///
    /// # Errors
    /// [`InferError::Device`] for an unusable device, [`InferError::Load`] for a file that
    /// is not TorchScript.
    pub fn load(path: &Path, device_name: &str, spec: InferSpec) -> Result<Self, InferError> {
        let device = device::parse(device_name)?;
        let mut module =
            tch::CModule::load_on_device(path, device).map_err(|e| InferError::Load {
                path: path.to_path_buf(),
                device: device_name.to_string(),
                message: first_line(&e),
            })?;
        module.f_set_eval().map_err(|e| InferError::Load {
            path: path.to_path_buf(),
            device: device_name.to_string(),
            message: first_line(&e),
        })?;
        Ok(Model {
            module,
            device,
            spec,
            path: path.to_path_buf(),
        })
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
        device_name: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        let device = device::parse(device_name)?;
        let bytes = crate::files::read_bounded(path, MAX_MODEL_BYTES)?;
        let found = crate::files::sha256_hex(&bytes[..])
            .map_err(|e| InferError::Torch(format!("hashing {}: {e}", path.display())))?;
        if found != sha256 {
            return Err(InferError::Changed {
                path: path.to_path_buf(),
                expected: sha256.to_string(),
                found,
            });
        }
        let load_err = |e: tch::TchError| InferError::Load {
            path: path.to_path_buf(),
            device: device_name.to_string(),
            message: first_line(&e),
        };
        let mut module =
            tch::CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device)
                .map_err(load_err)?;
        module.f_set_eval().map_err(load_err)?;
        Ok(Model {
            module,
            device,
            spec,
            path: path.to_path_buf(),
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The spec in use.
    pub fn spec(&self) -> &InferSpec {
        &self.spec
    }

    /// Predict a label map on `image`'s grid.
    ///
    /// # Errors
    /// [`InferError`] when the model raises, runs out of memory at batch 1, or returns an
    /// unusable output.
    pub fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError> {
        let _guard = tch::no_grad_guard();
        let t0 = Instant::now();
        let mut stats = PredictStats::default();
        let data = match self.spec.input {
            InputKind::Slices2d => self.predict_2d(image, &mut stats)?,
            InputKind::Volume3d => sliding::predict_3d(self, image, &mut stats)?,
        };
        stats.total_secs = t0.elapsed().as_secs_f64();
        Ok((
            Volume {
                geom: image.geom.clone(),
                data,
            },
            stats,
        ))
    }

    /// Run `forward` on a CPU tensor (moved to the device here), timing it.
    pub(crate) fn forward(
        &self,
        input: &Tensor,
        stats: &mut PredictStats,
    ) -> Result<Tensor, tch::TchError> {
        let x = input.f_to_device(self.device)?;
        let t = Instant::now();
        let y = self.module.forward_ts(&[x])?;
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        stats.forward_secs += t.elapsed().as_secs_f64();
        stats.forward_calls += 1;
        Ok(y)
    }

    pub(crate) fn classify(&self, e: tch::TchError, shape: &[i64], batch: usize) -> InferError {
        if is_oom(&e) {
            InferError::OutOfMemory {
                batch,
                message: first_line(&e),
            }
        } else {
            InferError::Forward {
                input_shape: shape.to_vec(),
                message: first_line(&e),
            }
        }
    }

    pub(crate) fn device(&self) -> Device {
        self.device
    }

    fn predict_2d(
        &self,
        image: &ImageVolume,
        stats: &mut PredictStats,
    ) -> Result<Vec<u8>, InferError> {
        let [nx, ny, nz] = image.geom.dims;
        let m = self.spec.pad_multiple.max(1);
        let (ph, pw) = (ny.div_ceil(m) * m, nx.div_ceil(m) * m);
        let sl = nx * ny;
        let mut out = vec![0u8; sl * nz];
        let mut batch = self.spec.batch_size.max(1);
        let mut z0 = 0;
        while z0 < nz {
            let (b, y) = halving_on_oom(&mut batch, nz - z0, "batch", |b| {
                let mut buf = vec![0f32; b * ph * pw];
                for i in 0..b {
                    let src = &image.data[(z0 + i) * sl..(z0 + i + 1) * sl];
                    for y in 0..ny {
                        let row = &src[y * nx..(y + 1) * nx];
                        let dst = &mut buf[(i * ph + y) * pw..(i * ph + y) * pw + nx];
                        for (d, &v) in dst.iter_mut().zip(row) {
                            *d = self.spec.window.apply(v);
                        }
                    }
                }
                let shape = [b as i64, 1, ph as i64, pw as i64];
                let x = Tensor::f_from_slice(&buf)
                    .and_then(|t| t.f_view(shape))
                    .map_err(torch)?;
                self.forward(&x, stats)
                    .map_err(|e| self.classify(e, &shape, b))
            })?;
            let labels = self.output_to_labels(&y, &[b as i64, ph as i64, pw as i64])?;
            for i in 0..b {
                for y in 0..ny {
                    let s = &labels[(i * ph + y) * pw..(i * ph + y) * pw + nx];
                    let o = (z0 + i) * sl + y * nx;
                    out[o..o + nx].copy_from_slice(s);
                }
            }
            z0 += b;
        }
        stats.batch_used = batch;
        Ok(out)
    }

    /// Turn a model output into labels (u8), checking shape and values.
    /// `want` is the spatial shape with batch first: `[B, H, W]` or `[B, D, H, W]`.
    pub(crate) fn output_to_labels(&self, y: &Tensor, want: &[i64]) -> Result<Vec<u8>, InferError> {
        let labels = self.output_to_label_tensor(y, want)?;
        let n = labels.numel();
        let mut out = vec![0u8; n];
        labels
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_copy_data_u8(&mut out, n))
            .map_err(torch)?;
        Ok(out)
    }

    /// As [`Self::output_to_labels`], leaving a `Uint8` tensor of shape `want` on the device.
    pub(crate) fn output_to_label_tensor(
        &self,
        y: &Tensor,
        want: &[i64],
    ) -> Result<Tensor, InferError> {
        let size = y.size();
        let spatial = &want[1..];
        let kind = y.f_kind().map_err(torch)?;
        let float = matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        );
        let shape_err = |expect: &str| {
            InferError::BadOutput(format!(
                "shape {size:?} ({kind:?}); expected {expect} for input batch {} x {spatial:?} with output kind {:?}",
                want[0], self.spec.output
            ))
        };
        match self.spec.output {
            OutputKind::Logits | OutputKind::Probabilities => {
                let ok = size.len() == want.len() + 1
                    && size[0] == want[0]
                    && size[2..] == *spatial
                    && (1..=256).contains(&size[1]);
                if !ok {
                    return Err(shape_err("[B, C, spatial...] with 1 <= C <= 256"));
                }
                if !float {
                    return Err(InferError::BadOutput(format!(
                        "{:?} output has integer type {kind:?}; declare output = \"labels\" in submission.toml",
                        self.spec.output
                    )));
                }
                let finite = y
                    .f_isfinite()
                    .and_then(|t| t.f_all())
                    .and_then(|t| t.f_int64_value(&[]))
                    .map_err(torch)?;
                if finite == 0 {
                    return Err(InferError::BadOutput(
                        "output contains NaN or infinity".into(),
                    ));
                }
                let labels = if size[1] == 1 {
                    let thr = if self.spec.output == OutputKind::Logits {
                        0.0
                    } else {
                        0.5
                    };
                    y.f_gt(thr).and_then(|t| t.f_squeeze_dim(1))
                } else {
                    y.f_argmax(1, false)
                };
                labels.and_then(|t| t.f_to_kind(Kind::Uint8)).map_err(torch)
            }
            OutputKind::Labels => {
                let y = if size.len() == want.len() + 1 && size[1] == 1 {
                    y.f_squeeze_dim(1).map_err(torch)?
                } else {
                    y.shallow_clone()
                };
                if y.size() != want {
                    return Err(shape_err("[B, spatial...] or [B, 1, spatial...]"));
                }
                if float {
                    let bad = y
                        .f_round()
                        .and_then(|r| r.f_ne_tensor(&y))
                        .and_then(|t| t.f_any())
                        .and_then(|t| t.f_int64_value(&[]))
                        .map_err(torch)?;
                    if bad != 0 {
                        return Err(InferError::BadOutput(
                            "labels output holds non-integer values (NaN or fractions)".into(),
                        ));
                    }
                }
                let (lo, hi) = (
                    y.f_min()
                        .and_then(|t| t.f_double_value(&[]))
                        .map_err(torch)?,
                    y.f_max()
                        .and_then(|t| t.f_double_value(&[]))
                        .map_err(torch)?,
                );
                if lo < 0.0 || hi > 255.0 {
                    return Err(InferError::BadOutput(format!(
                        "labels output ranges {lo}..{hi}; labels must be 0..=255"
                    )));
                }
                y.f_to_kind(Kind::Uint8).map_err(torch)
            }
        }
    }
}

/// libtorch version string (`2.11.0`), from the library in use.
pub fn torch_version() -> String {
    // libtorch does not export its version through tch; the wheel's version.py sits beside
    // the lib folder we link against.
    let lib = device::libtorch_dir();
    lib.and_then(|d| std::fs::read_to_string(d.parent()?.join("version.py")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
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
    fn out_of_memory_halves_the_batch_until_it_fits_and_it_stays_halved() {
        // A device that fits 3 items at once: 8 -> 4 -> 2.
        let mut batch = 8;
        let mut tried = Vec::new();
        let mut step = |n: usize| {
            tried.push(n);
            if n > 3 {
                Err(oom(n))
            } else {
                Ok(n * 10)
            }
        };
        let r = halving_on_oom(&mut batch, 20, "batch", &mut step);
        assert_eq!(r.unwrap(), (2, 20));
        assert_eq!(batch, 2, "later batches start halved");
        // The last, short batch: at most what is left.
        assert_eq!(
            halving_on_oom(&mut batch, 1, "batch", &mut step).unwrap(),
            (1, 10)
        );
        assert_eq!(tried, vec![8, 4, 2, 1]);
    }

    #[test]
    fn out_of_memory_at_batch_one_and_other_errors_are_the_callers() {
        let mut batch = 4;
        let r: Result<(usize, ()), _> = halving_on_oom(&mut batch, 9, "batch", |n| Err(oom(n)));
        assert!(
            matches!(r, Err(InferError::OutOfMemory { batch: 1, .. })),
            "{r:?}"
        );
        assert_eq!(batch, 1);
        // Anything else is not retried, and the batch is left alone.
        let mut batch = 4;
        let mut calls = 0;
        let r: Result<(usize, ()), _> = halving_on_oom(&mut batch, 9, "batch", |_| {
            calls += 1;
            Err(InferError::BadOutput("NaN".into()))
        });
        assert!(matches!(r, Err(InferError::BadOutput(_))));
        assert_eq!((batch, calls), (4, 1));
    }
}
