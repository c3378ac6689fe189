//! The TorchScript runtime: a `torch.jit` module run through libtorch (tch), on the CPU or
//! a CUDA device. It owns everything tch-specific: loading, the forward call and its
//! timing, libtorch's error messages (CUDA out-of-memory recognised by message), the
//! output checks and argmax as tensor ops, the 2D slice batches, and the 3D sliding
//! window's accumulation on the device, on the tiles and weights of [`super::tiling`]:
//! outputs are blended as `sum(w * y) / sum(w)`; since `sum(w) > 0` everywhere, the
//! division does not change the argmax and is skipped. `labels` outputs are blended as
//! one-hot votes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{
    device, halve_on_oom, tiling, InferError, InferSpec, InputKind, ModelFormat, OutputKind,
    PredictStats, Runtime, SandboxNeeds,
};
use crate::volume::{ImageVolume, LabelVolume, Volume};

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

fn load_error(path: &Path, device: &str, e: &tch::TchError) -> InferError {
    InferError::Load {
        path: path.to_path_buf(),
        format: ModelFormat::TorchScript,
        device: device.to_string(),
        message: first_line(e),
    }
}

pub(super) fn torch(e: tch::TchError) -> InferError {
    InferError::Torch(first_line(&e))
}

/// A loaded TorchScript module bound to one device.
#[derive(Debug)]
pub struct TorchScript {
    module: tch::CModule,
    device: Device,
    spec: InferSpec,
    path: PathBuf,
}

impl TorchScript {
    /// Load these bytes (read, and hash-checked, by the caller from `path`) onto `device`.
    ///
    /// # Errors
    /// [`InferError::Device`] for an unusable device, [`InferError::Load`] for bytes that
    /// are not a TorchScript module.
    pub fn load_bytes(
        bytes: Vec<u8>,
        path: &Path,
        device_name: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        let device = device::parse(device_name)?;
        let module = tch::CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device)
            .map_err(|e| load_error(path, device_name, &e))?;
        Self::ready(module, device, spec, path, device_name)
    }

    fn ready(
        mut module: tch::CModule,
        device: Device,
        spec: InferSpec,
        path: &Path,
        device_name: &str,
    ) -> Result<Self, InferError> {
        module
            .f_set_eval()
            .map_err(|e| load_error(path, device_name, &e))?;
        Ok(TorchScript {
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
}

impl Runtime for TorchScript {
    fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError> {
        let _guard = tch::no_grad_guard();
        let t0 = Instant::now();
        let mut stats = PredictStats::default();
        let data = match self.spec.input {
            InputKind::Slices2d => self.predict_2d(image, &mut stats)?,
            InputKind::Volume3d => predict_3d(self, image, &mut stats)?,
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
}

impl TorchScript {
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
            let b = batch.min(nz - z0);
            let buf = tiling::windowed_slices(image, self.spec.window, z0, b, ph, pw);
            let shape = [b as i64, 1, ph as i64, pw as i64];
            let x = Tensor::f_from_slice(&buf)
                .and_then(|t| t.f_view(shape))
                .map_err(torch)?;
            match self.forward(&x, stats) {
                Ok(y) => {
                    let labels = self.output_to_labels(&y, &[b as i64, ph as i64, pw as i64])?;
                    tiling::unpad_slices(&labels, b, [ph, pw], [ny, nx], z0, &mut out);
                    z0 += b;
                }
                Err(e) => {
                    let err = self.classify(e, &shape, b);
                    if halve_on_oom(&err, &mut batch) {
                        continue;
                    }
                    return Err(err);
                }
            }
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

/// Predict a whole volume with sliding windows; returns labels in NIfTI order.
fn predict_3d(
    model: &TorchScript,
    image: &ImageVolume,
    stats: &mut PredictStats,
) -> Result<Vec<u8>, InferError> {
    let spec = model.spec();
    let [nx, ny, nz] = image.geom.dims;
    let patch = spec.patch_size;
    let padded = tiling::padded([nz, ny, nx], patch);
    let vol = tiling::windowed_padded(image, spec.window, padded);
    let p = |a: [usize; 3]| [a[0] as i64, a[1] as i64, a[2] as i64];
    let full = Tensor::f_from_slice(&vol)
        .and_then(|t| t.f_view(p(padded)))
        .map_err(torch)?;
    drop(vol);
    let dev = model.device();
    let w = Tensor::f_from_slice(&tiling::gaussian(patch))
        .and_then(|t| t.f_view(p(patch)))
        .and_then(|t| t.f_to_device(dev))
        .map_err(torch)?;
    let windows = tiling::tiles(padded, patch, spec.overlap);
    let mut acc: Option<Tensor> = None;
    let mut batch = spec.batch_size.max(1);
    let mut i = 0;
    while i < windows.len() {
        let n = batch.min(windows.len() - i);
        let crops: Result<Vec<Tensor>, _> = windows[i..i + n]
            .iter()
            .map(|s| {
                full.f_narrow(0, s[0] as i64, patch[0] as i64)
                    .and_then(|t| t.f_narrow(1, s[1] as i64, patch[1] as i64))
                    .and_then(|t| t.f_narrow(2, s[2] as i64, patch[2] as i64))
            })
            .collect();
        let x = crops
            .and_then(|c| Tensor::f_stack(&c, 0))
            .and_then(|t| t.f_unsqueeze(1))
            .map_err(torch)?;
        let shape = x.size();
        let y = match model.forward(&x, stats) {
            Ok(y) => y,
            Err(e) => {
                let err = model.classify(e, &shape, n);
                if halve_on_oom(&err, &mut batch) {
                    continue;
                }
                return Err(err);
            }
        };
        let want = [n as i64, patch[0] as i64, patch[1] as i64, patch[2] as i64];
        // Scores [n, C, D, H, W] to blend: raw outputs, or one-hot votes for labels.
        let scores = if spec.output == OutputKind::Labels {
            let l = model.output_to_label_tensor(&y, &want)?;
            l.f_to_kind(Kind::Int64)
                .and_then(|t| t.f_one_hot(spec.num_classes.max(2) as i64))
                .and_then(|t| t.f_permute([0, 4, 1, 2, 3]))
                .and_then(|t| t.f_to_kind(Kind::Float))
                .map_err(torch)?
        } else {
            // Validates shape and finiteness; the labels themselves are not needed here.
            let _validated = model.output_to_label_tensor(&y, &want)?;
            y.f_to_kind(Kind::Float).map_err(torch)?
        };
        let c = scores.size()[1];
        let a = match &mut acc {
            Some(a) if a.size()[0] == c => a,
            Some(a) => {
                return Err(InferError::BadOutput(format!(
                    "channel count changed between windows ({} then {c})",
                    a.size()[0]
                )))
            }
            None => acc.insert(
                Tensor::f_zeros(
                    [c, padded[0] as i64, padded[1] as i64, padded[2] as i64],
                    (Kind::Float, dev),
                )
                .map_err(torch)?,
            ),
        };
        for (j, s) in windows[i..i + n].iter().enumerate() {
            let weighted = scores
                .f_select(0, j as i64)
                .and_then(|t| t.f_mul(&w))
                .map_err(torch)?;
            let mut region = a
                .f_narrow(1, s[0] as i64, patch[0] as i64)
                .and_then(|t| t.f_narrow(2, s[1] as i64, patch[1] as i64))
                .and_then(|t| t.f_narrow(3, s[2] as i64, patch[2] as i64))
                .map_err(torch)?;
            let _ = region.f_add_(&weighted).map_err(torch)?;
        }
        i += n;
    }
    stats.batch_used = batch;
    let acc = acc.ok_or_else(|| InferError::BadOutput("no window was predicted".into()))?;
    if acc.size()[0] == 1 {
        return Err(InferError::BadOutput(
            "single-channel 3D outputs are not supported; return [B, 2, D, H, W] (background, foreground)".into(),
        ));
    }
    let labels = acc.f_argmax(0, false);
    let labels = labels
        .and_then(|t| t.f_narrow(0, 0, nz as i64))
        .and_then(|t| t.f_narrow(1, 0, ny as i64))
        .and_then(|t| t.f_narrow(2, 0, nx as i64))
        .and_then(|t| t.f_to_kind(Kind::Uint8))
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .map_err(torch)?;
    let mut out = vec![0u8; nx * ny * nz];
    labels
        .f_copy_data_u8(&mut out, nx * ny * nz)
        .map_err(torch)?;
    Ok(out)
}

/// What libtorch needs inside the worker's sandbox: its own folder (the wheel's site
/// folder, which also holds the `nvidia/*` wheels it loads) and, on a GPU, the CUDA
/// library folders, `/dev/shm` and the `/dev/nvidia*` device nodes.
pub fn sandbox_needs(gpu: bool) -> SandboxNeeds {
    let mut n = SandboxNeeds::default();
    if let Some(lib) = device::libtorch_dir() {
        // <site>/torch/lib -> <site>.
        n.read_only
            .push(lib.ancestors().nth(2).unwrap_or(&lib).to_path_buf());
    }
    if gpu {
        n.read_only.extend(
            ["/usr/local/cuda", "/usr/local/nvidia", "/opt/nvidia"]
                .iter()
                .map(PathBuf::from),
        );
        if let Ok(d) = std::fs::read_dir("/usr/local") {
            n.read_only.extend(
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().starts_with("/usr/local/cuda")),
            );
        }
        n.read_write.push("/dev/shm".into());
        if let Ok(d) = std::fs::read_dir("/dev") {
            n.devices.extend(
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
                    .map(|e| e.path()),
            );
        }
    }
    n
}
