//! nnU-Net's sliding-window prediction of a preprocessed case, step for step as nnunetv2
//! 2.8.1 does it, so that on the CPU the logits are nnU-Net's bit for bit:
//!
//! - `predict_logits_from_preprocessed_data` (`inference/predict_from_raw_data.py`
//!   L501-536): each fold's sliding window, moved to the CPU and summed there in fp16,
//!   then divided by the number of folds (fp16);
//! - `predict_sliding_window_return_logits` (L658-713): the case padded with zeros to at
//!   least the patch, centred (`acvl_utils` `pad_nd_image`: the odd voxel after); tiles
//!   from `compute_steps_for_sliding_window` (tile_step_size 0.5); the padding cropped off
//!   at the end;
//! - `_internal_predict_sliding_window_return_logits` (L581-656): per tile the network's
//!   (mirrored) float32 prediction times the Gaussian, **accumulated in fp16** (logits and
//!   weights; torch.half on the CPU too), then `logits / weights` in fp16; an infinity is an
//!   error, as nnU-Net raises;
//! - `_internal_maybe_mirror_and_predict` (L561-579): the identity plus every non-empty
//!   combination of the allowed axes in itertools order, each flipped in, predicted and
//!   flipped back, summed in float32 and divided by their count;
//! - `compute_gaussian` (`inference/sliding_window_prediction.py` L10-28): scipy's
//!   `gaussian_filter` of a delta at `patch // 2` with sigma `patch / 8` (truncated at 4
//!   sigma), scaled to a maximum of 10, cast to fp16, zeros replaced by the smallest
//!   non-zero value. The float64 map is computed here as scipy does for a delta (each
//!   separable pass multiplies by one tap, the taps normalised by numpy's pairwise sum);
//!   the casts are libtorch's.
//!
//! Every tensor operation is the libtorch operator PyTorch calls for the same Python line,
//! on the same dtypes (in-place where nnU-Net is in-place), which is what makes the fp16
//! rounding identical. On CUDA, nnU-Net runs under autocast (fp16 convolutions) and with
//! `cudnn.benchmark`: the network runs under autocast here too, but results are then
//! comparable by voxel agreement only.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, Checkpoint, CheckpointError};
use super::network::{Network, NetworkError};
use super::plans::ModelFolder;

/// nnUNetPredictor's default `tile_step_size`.
pub const TILE_STEP_SIZE: f64 = 0.5;

/// Why a prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// A fold's checkpoint cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A fold's network cannot be built from its checkpoint.
    #[error("{path}: {source}")]
    Network {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        source: NetworkError,
    },
    /// A checkpoint does not belong to the folder (another trainer or configuration).
    #[error("{path}: {why}")]
    Mismatch {
        /// The checkpoint.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// The predictor's settings are inconsistent (patch, axes, networks).
    #[error("nnU-Net predictor: {0}")]
    Setup(String),
    /// The input does not fit.
    #[error("nnU-Net input {shape:?}: {why}")]
    Input {
        /// Its shape.
        shape: Vec<i64>,
        /// What is wrong.
        why: String,
    },
    /// The network failed on a tile.
    #[error("network on a tile of input {shape:?}: {source}")]
    Forward {
        /// The input's shape.
        shape: Vec<i64>,
        /// Why.
        source: NetworkError,
    },
    /// libtorch failed outside the network.
    #[error("libtorch, {during}: {message}")]
    Torch {
        /// What was being done.
        during: &'static str,
        /// libtorch's message, first line.
        message: String,
    },
    /// The fp16 logits overflowed (nnU-Net raises "Encountered inf in predicted array").
    #[error("the fp16 logits overflowed to infinity (nnU-Net aborts on this too)")]
    Infinite,
}

fn torch(during: &'static str) -> impl Fn(tch::TchError) -> PredictError {
    move |e| PredictError::Torch {
        during,
        message: crate::infer::first_line(&e),
    }
}

impl From<PredictError> for crate::infer::InferError {
    fn from(e: PredictError) -> Self {
        use crate::infer::InferError;
        let oom = |m: &str| m.contains("out of memory");
        match e {
            PredictError::Checkpoint(c) => c.into(),
            PredictError::Network { ref path, .. } | PredictError::Mismatch { ref path, .. } => {
                checkpoint::load_error(path.clone(), e.to_string())
            }
            PredictError::Setup(m) => checkpoint::load_error(PathBuf::new(), m),
            PredictError::Input { shape, why } => InferError::Forward {
                input_shape: shape,
                message: why,
            },
            PredictError::Forward {
                source: NetworkError::Torch { message, .. },
                ..
            } if oom(&message) => InferError::OutOfMemory { batch: 1, message },
            PredictError::Forward { shape, source } => InferError::Forward {
                input_shape: shape,
                message: source.to_string(),
            },
            PredictError::Torch { message, .. } if oom(&message) => {
                InferError::OutOfMemory { batch: 1, message }
            }
            PredictError::Torch { during, message } => {
                InferError::Torch(format!("{during}: {message}"))
            }
            PredictError::Infinite => InferError::BadOutput(e.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, PredictError>;

/// `compute_steps_for_sliding_window` for one axis: tile starts covering `image` (>=
/// `patch` >= 1) with tiles of `patch`, at most `patch * step` apart, spread evenly and
/// rounded half to even (numpy's round).
pub fn steps(image: usize, patch: usize, step: f64) -> Vec<usize> {
    if patch == 0 || image <= patch {
        return vec![0];
    }
    let max_step = (image - patch) as f64;
    let n = (max_step / (patch as f64 * step)).ceil() as usize + 1;
    let actual = max_step / (n - 1) as f64;
    (0..n)
        .map(|i| (actual * i as f64).round_ties_even() as usize)
        .collect()
}

/// numpy's pairwise summation of float64 (`pairwise_sum` in numpy's loops_utils.h), which
/// `phi_x.sum()` in scipy's `_gaussian_kernel1d` uses: 8 accumulators in blocks of up to
/// 128, halves (rounded down to a multiple of 8) above.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(-0.0, |s, &x| s + x)
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// The 1-D factor of the Gaussian along an axis of `size`: scipy's normalised kernel
/// (`_gaussian_kernel1d(sigma = size / 8, 0, radius = int(4 sigma + 0.5))`) centred on
/// `size // 2`, zero beyond the radius. A delta filtered by it gives exactly these taps.
fn gaussian_taps(size: usize) -> Vec<f64> {
    let sigma = size as f64 * (1.0 / 8.0);
    let radius = (4.0 * sigma + 0.5) as i64;
    let c = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (c * (x * x) as f64).exp())
        .collect();
    let sum = pairwise_sum(&phi);
    let centre = (size / 2) as i64;
    (0..size as i64)
        .map(|i| {
            let d = (i - centre).abs();
            if d <= radius {
                // phi is symmetric; index radius + d.
                phi[(radius + d) as usize] / sum
            } else {
                0.0
            }
        })
        .collect()
}

/// `compute_gaussian(patch, sigma_scale=1/8, value_scaling_factor=10, dtype=float16)` on
/// `device`.
///
/// # Errors
/// [`PredictError::Setup`] for an empty patch, [`PredictError::Torch`] for libtorch.
pub fn gaussian(patch: &[usize], device: Device) -> Result<Tensor> {
    // Far above any nnU-Net patch (about 2^21 voxels); a bound on what is allocated here.
    const MAX_VOXELS: usize = 1 << 27;
    let n = patch
        .iter()
        .try_fold(1usize, |a, &p| a.checked_mul(p))
        .filter(|&n| n <= MAX_VOXELS);
    let (Some(n), false, 1..=3) = (n, patch.contains(&0), patch.len()) else {
        return Err(PredictError::Setup(format!(
            "patch {patch:?} (1 to 3 axes, 1 to {MAX_VOXELS} voxels)"
        )));
    };
    let taps: Vec<Vec<f64>> = patch.iter().map(|&p| gaussian_taps(p)).collect();
    // gaussian_filter filters axis 0 first, then 1, then 2: a delta becomes t0, then
    // t0 * t1 (rounded), then (t0 * t1) * t2 (rounded).
    let mut map = vec![1.0f64; n];
    let mut stride = n;
    for (ax, t) in taps.iter().enumerate() {
        let len = patch[ax];
        stride /= len;
        for (i, v) in map.iter_mut().enumerate() {
            let k = (i / stride) % len;
            *v = if ax == 0 { t[k] } else { *v * t[k] };
        }
    }
    let max = map.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let scale = max / 10.0;
    for v in &mut map {
        *v /= scale;
    }
    let shape: Vec<i64> = patch.iter().map(|&p| p as i64).collect();
    let t = torch("Gaussian");
    let g = Tensor::f_from_slice(&map)
        .and_then(|g| g.f_reshape(shape.as_slice()))
        // torch.from_numpy(...).to(device, float16): libtorch's own double -> half cast.
        .and_then(|g| g.f_to_device(device))
        .and_then(|g| g.f_to_kind(Kind::Half))
        .map_err(&t)?;
    // gaussian[gaussian == 0] = gaussian[gaussian != 0].min()
    let zero = g.f_eq(0.0).map_err(&t)?;
    let nonzero = zero.f_logical_not().map_err(&t)?;
    let min = g
        .f_masked_select(&nonzero)
        .and_then(|v| v.f_min())
        .map_err(&t)?;
    g.f_where_self(&nonzero, &min).map_err(t)
}

/// One tile: for a 2D patch over a 3D case, the slice along the first axis, then the start
/// per patch axis.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tile {
    slice: Option<i64>,
    starts: Vec<i64>,
}

/// `_internal_get_sliding_window_slicers`, in nnU-Net's order.
fn tiles(image: &[usize], patch: &[usize]) -> Vec<Tile> {
    let (slices, plane) = if patch.len() < image.len() {
        (Some(image[0]), &image[1..])
    } else {
        (None, image)
    };
    let steps: Vec<Vec<usize>> = plane
        .iter()
        .zip(patch)
        .map(|(&i, &p)| steps(i, p, TILE_STEP_SIZE))
        .collect();
    // The cartesian product, last axis fastest.
    let mut combos: Vec<Vec<i64>> = vec![Vec::new()];
    for s in &steps {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                s.iter().map(move |&x| {
                    let mut c = c.clone();
                    c.push(x as i64);
                    c
                })
            })
            .collect();
    }
    match slices {
        Some(z) => (0..z as i64)
            .flat_map(|d| {
                combos.iter().map(move |c| Tile {
                    slice: Some(d),
                    starts: c.clone(),
                })
            })
            .collect(),
        None => combos
            .into_iter()
            .map(|c| Tile {
                slice: None,
                starts: c,
            })
            .collect(),
    }
}

/// Every non-empty combination of `axes`, as
/// `[c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]`.
fn combinations(axes: &[i64]) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for r in 1..=axes.len() {
        // Index vectors in lexicographic order, as itertools emits them.
        let mut idx: Vec<usize> = (0..r).collect();
        loop {
            out.push(idx.iter().map(|&i| axes[i]).collect());
            let Some(i) = (0..r).rev().find(|&i| idx[i] != i + axes.len() - r) else {
                break;
            };
            idx[i] += 1;
            for j in i + 1..r {
                idx[j] = idx[j - 1] + 1;
            }
        }
    }
    out
}

/// nnU-Net's predictor over one or more folds' networks.
#[derive(Debug)]
pub struct Predictor {
    nets: Vec<Network>,
    patch: Vec<usize>,
    mirror_axes: Vec<usize>,
    device: Device,
    gaussian: Tensor,
}

impl Predictor {
    /// A predictor over `nets` (one per fold, in fold order) with nnU-Net's `patch` and
    /// the test-time mirroring `mirror_axes` (spatial axes of the patch; empty: none).
    ///
    /// # Errors
    /// [`PredictError::Setup`] when the networks, patch and axes do not fit together.
    pub fn new(
        nets: Vec<Network>,
        patch: Vec<usize>,
        mirror_axes: Vec<usize>,
        device: Device,
    ) -> Result<Self> {
        let Some(first) = nets.first() else {
            return Err(PredictError::Setup("no networks".into()));
        };
        let dims = first.dims();
        if patch.len() != dims || patch.contains(&0) {
            return Err(PredictError::Setup(format!(
                "patch {patch:?} for a {dims}D network"
            )));
        }
        if nets.iter().any(|n| {
            n.dims() != dims
                || n.in_channels() != first.in_channels()
                || n.out_channels() != first.out_channels()
        }) {
            return Err(PredictError::Setup(
                "the folds' networks differ in shape".into(),
            ));
        }
        if mirror_axes.iter().any(|&a| a >= dims) {
            return Err(PredictError::Setup(format!(
                "mirroring axes {mirror_axes:?} for a {dims}D network"
            )));
        }
        let gaussian = gaussian(&patch, device)?;
        Ok(Predictor {
            nets,
            patch,
            mirror_axes,
            device,
            gaussian,
        })
    }

    /// Read every fold's checkpoint of `folder` and build the predictor on `device`.
    ///
    /// # Errors
    /// As [`Predictor::from_checkpoints`], and [`PredictError::Checkpoint`] for an
    /// unreadable checkpoint.
    pub fn load(folder: &ModelFolder, device: Device) -> Result<Self> {
        let mut cks = Vec::with_capacity(folder.folds.len());
        for (_, path) in &folder.folds {
            cks.push((path.clone(), checkpoint::read(path)?));
        }
        Self::from_checkpoints(folder, &cks, device)
    }

    /// Build the predictor from the folds' checkpoints (read by the caller, in fold order),
    /// as `initialize_from_trained_model_folder` does: the mirroring axes are the first
    /// fold's; each fold's network is the plans' architecture with its own weights.
    ///
    /// # Errors
    /// [`PredictError::Mismatch`] for a checkpoint of another trainer or configuration
    /// than the folder's name, [`PredictError::Network`] for weights that do not fit the
    /// architecture.
    pub fn from_checkpoints(
        folder: &ModelFolder,
        checkpoints: &[(PathBuf, Checkpoint)],
        device: Device,
    ) -> Result<Self> {
        let cfg = &folder.configuration;
        let mut nets = Vec::with_capacity(checkpoints.len());
        for (path, ck) in checkpoints {
            // nnU-Net builds the network of the checkpoint's trainer and configuration;
            // the folder's were checked to be stock, so they must be the same.
            if ck.trainer_name != folder.trainer {
                return Err(PredictError::Mismatch {
                    path: path.clone(),
                    why: format!(
                        "trained by {:?}, but the folder is named for {:?}",
                        ck.trainer_name, folder.trainer
                    ),
                });
            }
            if let Some(c) = ck.configuration.as_deref().filter(|c| *c != cfg.name) {
                return Err(PredictError::Mismatch {
                    path: path.clone(),
                    why: format!(
                        "trained as configuration {c:?}, but the folder is named for {:?}",
                        cfg.name
                    ),
                });
            }
            let net = Network::new(
                &cfg.architecture,
                folder.intensity.len(),
                folder.labels.channels(),
                &ck.weights,
                device,
            )
            .map_err(|source| PredictError::Network {
                path: path.clone(),
                source,
            })?;
            nets.push(net);
        }
        let axes = checkpoints
            .first()
            .map(|(_, c)| c.mirroring_axes.clone())
            .unwrap_or_default();
        Self::new(nets, cfg.patch_size.clone(), axes, device)
    }

    /// Folds.
    pub fn folds(&self) -> usize {
        self.nets.len()
    }

    /// The mirroring axes used.
    pub fn mirror_axes(&self) -> &[usize] {
        &self.mirror_axes
    }

    /// nnU-Net's logits of a preprocessed case: `input` `[C, z, y, x]` float32 (on any
    /// device), the result `[K, z, y, x]` float16 on the CPU, contiguous.
    ///
    /// # Errors
    /// [`PredictError::Input`] for an input of the wrong rank, channels or type;
    /// [`PredictError::Forward`] / [`PredictError::Torch`] for libtorch failures (CUDA
    /// out of memory among them); [`PredictError::Infinite`] when fp16 overflows.
    pub fn logits(&self, input: &Tensor) -> Result<Tensor> {
        let shape = input.size();
        let bad = |why: String| PredictError::Input {
            shape: shape.clone(),
            why,
        };
        let channels = self.nets.first().map_or(0, Network::in_channels) as i64;
        if shape.len() != 4 || shape[0] != channels || shape[1..].iter().any(|&d| d < 1) {
            return Err(bad(format!("expected [{channels}, z, y, x]")));
        }
        if input.kind() != Kind::Float {
            return Err(bad(format!("{:?}, expected float32", input.kind())));
        }
        let _guard = tch::no_grad_guard();
        let cuda = self.device.is_cuda();
        let mut prediction: Option<Tensor> = None;
        for net in &self.nets {
            // Each fold's logits go to the CPU and are summed there (fp16).
            // tch::autocast asks libtorch whether CUDA is available, which must not happen
            // before device.rs has loaded the CUDA backend: only on a CUDA device.
            let fold = if cuda {
                tch::autocast(true, || self.sliding_window(net, input))
            } else {
                self.sliding_window(net, input)
            }?
            .f_to_device(Device::Cpu)
            .map_err(torch("copying logits"))?;
            match &mut prediction {
                None => prediction = Some(fold),
                Some(p) => {
                    p.f_add_(&fold).map(drop).map_err(torch("summing folds"))?;
                }
            }
        }
        let mut p = prediction.ok_or_else(|| PredictError::Setup("no networks".into()))?;
        if self.nets.len() > 1 {
            p.f_div_scalar_(self.nets.len() as i64)
                .map(drop)
                .map_err(torch("averaging folds"))?;
        }
        p.f_contiguous().map_err(torch("copying logits"))
    }

    /// `predict_sliding_window_return_logits` for one fold: fp16 `[K, z, y, x]` on the
    /// device (a view of the padded result).
    fn sliding_window(&self, net: &Network, input: &Tensor) -> Result<Tensor> {
        let t = torch("sliding window");
        let size: Vec<usize> = input.size()[1..].iter().map(|&d| d as usize).collect();
        // pad_nd_image(image, patch, 'constant', {'value': 0}): the last len(patch) axes
        // to at least the patch, the odd voxel after.
        let off = size.len() - self.patch.len();
        let mut pad_below = vec![0usize; size.len()];
        let mut padded = size.clone();
        for (k, &p) in self.patch.iter().enumerate() {
            let d = p.saturating_sub(size[off + k]);
            pad_below[off + k] = d / 2;
            padded[off + k] = size[off + k] + d;
        }
        let data = input.f_to_device(self.device).map_err(&t)?;
        let data = if padded != size {
            // F.pad's list: last axis first, (before, after) each.
            let mut pads = Vec::new();
            for ax in (0..size.len()).rev() {
                let d = (padded[ax] - size[ax]) as i64;
                pads.push(pad_below[ax] as i64);
                pads.push(d - pad_below[ax] as i64);
            }
            data.f_constant_pad_nd(pads.as_slice()).map_err(&t)?
        } else {
            data
        };
        let k = net.out_channels() as i64;
        let dims: Vec<i64> = padded.iter().map(|&d| d as i64).collect();
        let mut lshape = vec![k];
        lshape.extend(&dims);
        let logits = Tensor::f_zeros(lshape.as_slice(), (Kind::Half, self.device)).map_err(&t)?;
        let weights = Tensor::f_zeros(dims.as_slice(), (Kind::Half, self.device)).map_err(&t)?;
        let patch: Vec<i64> = self.patch.iter().map(|&p| p as i64).collect();
        let first = 1 + off as i64;
        for tile in tiles(&padded, &self.patch) {
            let view = |x: &Tensor, at: i64| -> std::result::Result<Tensor, tch::TchError> {
                let mut v = x.shallow_clone();
                let mut dim = at;
                if let Some(d) = tile.slice {
                    v = v.f_select(at - 1, d)?;
                    dim -= 1;
                }
                for (i, (&s, &p)) in tile.starts.iter().zip(&patch).enumerate() {
                    v = v.f_narrow(dim + i as i64, s, p)?;
                }
                Ok(v)
            };
            // torch.clone(d[s][None], memory_format=torch.contiguous_format)
            let workon = view(&data, first)
                .and_then(|v| v.f_unsqueeze(0))
                .and_then(|v| v.f_contiguous())
                .map_err(&t)?;
            let mut prediction = self.mirror_and_predict(net, &workon)?;
            // prediction *= gaussian; predicted_logits[sl] += prediction;
            // n_predictions[sl[1:]] += gaussian
            prediction.f_mul_(&self.gaussian).map(drop).map_err(&t)?;
            view(&logits, first)
                .and_then(|mut v| v.f_add_(&prediction))
                .map(drop)
                .map_err(&t)?;
            view(&weights, first - 1)
                .and_then(|mut v| v.f_add_(&self.gaussian))
                .map(drop)
                .map_err(&t)?;
        }
        // torch.div(predicted_logits, n_predictions, out=predicted_logits)
        let mut logits = logits;
        logits.f_div_(&weights).map(drop).map_err(&t)?;
        if logits
            .f_isinf()
            .and_then(|i| i.f_any())
            .and_then(|a| a.f_int64_value(&[]))
            .map_err(&t)?
            != 0
        {
            return Err(PredictError::Infinite);
        }
        // predicted_logits[(slice(None), *slicer_revert_padding[1:])]
        let mut out = logits;
        for ax in off..size.len() {
            if padded[ax] != size[ax] {
                out = out
                    .f_narrow(1 + ax as i64, pad_below[ax] as i64, size[ax] as i64)
                    .map_err(&t)?;
            }
        }
        Ok(out)
    }

    /// `_internal_maybe_mirror_and_predict(x)[0]`: float32 `[K, patch]`.
    fn mirror_and_predict(&self, net: &Network, x: &Tensor) -> Result<Tensor> {
        let fwd = |x: &Tensor| {
            net.forward(x).map_err(|source| PredictError::Forward {
                shape: x.size(),
                source,
            })
        };
        let t = torch("mirroring");
        let mut prediction = fwd(x)?;
        if !self.mirror_axes.is_empty() {
            let axes: Vec<i64> = self.mirror_axes.iter().map(|&a| a as i64 + 2).collect();
            let combos = combinations(&axes);
            for c in &combos {
                let flipped = x.f_flip(c.as_slice()).map_err(&t)?;
                let back = fwd(&flipped)?.f_flip(c.as_slice()).map_err(&t)?;
                prediction.f_add_(&back).map(drop).map_err(&t)?;
            }
            prediction
                .f_div_scalar_(combos.len() as i64 + 1)
                .map(drop)
                .map_err(&t)?;
        }
        prediction.f_select(0, 0).map_err(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::nnunet::npy;
    use sha2::{Digest, Sha256};
    use std::path::Path;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet")
    }

    fn sliding_window_json() -> serde_json::Value {
        let p = root().join("networks/sliding_window.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    fn usizes(v: &serde_json::Value) -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    }

    #[test]
    fn steps_are_nnunets() {
        // nnU-Net's compute_steps_for_sliding_window (make_network_reference.py).
        for case in sliding_window_json()["steps"].as_array().unwrap() {
            let image = usizes(&case["image"]);
            let patch = usizes(&case["patch"]);
            let want: Vec<Vec<usize>> = case["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(usizes)
                .collect();
            let got: Vec<Vec<usize>> = image
                .iter()
                .zip(&patch)
                .map(|(&i, &p)| steps(i, p, TILE_STEP_SIZE))
                .collect();
            assert_eq!(got, want, "{image:?} {patch:?}");
        }
    }

    #[test]
    fn gaussian_is_nnunets_bit_for_bit() {
        // nnU-Net's compute_gaussian(..., value_scaling_factor=10) as fp16 bits.
        for case in sliding_window_json()["gaussian"].as_array().unwrap() {
            let patch = usizes(&case["patch"]);
            let g = gaussian(&patch, Device::Cpu).unwrap();
            let bits: Vec<u8> = Vec::<half::f16>::try_from(g.flatten(0, -1))
                .unwrap()
                .iter()
                .flat_map(|h| h.to_bits().to_le_bytes())
                .collect();
            assert_eq!(
                hex::encode(Sha256::digest(&bits)),
                case["sha256_f16_bits"].as_str().unwrap(),
                "{patch:?}"
            );
        }
    }

    #[test]
    fn a_predictor_can_move_to_a_worker_thread() {
        fn send<T: Send>() {}
        send::<Predictor>();
    }

    #[test]
    fn mirror_combinations_are_itertools_order() {
        assert_eq!(
            combinations(&[2, 3, 4]),
            vec![
                vec![2],
                vec![3],
                vec![4],
                vec![2, 3],
                vec![2, 4],
                vec![3, 4],
                vec![2, 3, 4]
            ]
        );
        assert_eq!(combinations(&[2, 3]), vec![vec![2], vec![3], vec![2, 3]]);
        assert!(combinations(&[]).is_empty());
    }

    #[test]
    fn tiles_follow_nnunets_slicers() {
        // 3D: nested sx, sy, sz loops.
        let t = tiles(&[40, 64, 100], &[32, 64, 64]);
        let starts: Vec<Vec<i64>> = t.iter().map(|t| t.starts.clone()).collect();
        assert_eq!(
            starts,
            vec![
                vec![0, 0, 0],
                vec![0, 0, 18],
                vec![0, 0, 36],
                vec![8, 0, 0],
                vec![8, 0, 18],
                vec![8, 0, 36]
            ]
        );
        // 2D patch over a 3D case: every slice, then the plane's tiles.
        let t = tiles(&[2, 20, 12], &[20, 12]);
        assert_eq!(
            t,
            vec![
                Tile {
                    slice: Some(0),
                    starts: vec![0, 0]
                },
                Tile {
                    slice: Some(1),
                    starts: vec![0, 0]
                }
            ]
        );
    }

    const MODEL: &str = "tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres";

    /// Our logits of both fixture cases against nnU-Net's own, for the folds of `run`.
    fn parity(folds: &[usize], run: &str) {
        let folder = ModelFolder::open(&root().join(MODEL), Some(folds)).unwrap();
        let predictor = Predictor::load(&folder, Device::Cpu).unwrap();
        assert_eq!(predictor.folds(), folds.len());
        assert_eq!(predictor.mirror_axes(), &[0, 1, 2]);
        for case in ["TinyCT_006", "TinyCT_007"] {
            let pre =
                npy::read(&root().join(format!("tinyct/reference/{case}_preprocessed_f32.npy.gz")))
                    .unwrap();
            let shape: Vec<i64> = pre.shape.iter().map(|&d| d as i64).collect();
            let x = Tensor::from_slice(&pre.to_f32()).reshape(shape.as_slice());
            // nnUNetPredictor's logits from the fixture's machine, and from every other CPU
            // it was run on (`<case>_logits_f16.<cpu>.npy.gz`, make_cpu_reference.py):
            // libtorch's convolution kernels depend on the CPU's instruction set, so nnU-Net
            // itself, same libtorch, gives a few logits 1 fp16 ulp apart on an AMD EPYC
            // (20 of 356832 for TinyCT_006). evald must equal one of them bit for bit.
            let dir = root().join(format!("tinyct/reference/{run}/intermediates"));
            let mut refs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    n.starts_with(&format!("{case}_logits_f16.")) && n.ends_with(".npy.gz")
                })
                .collect();
            refs.sort();
            assert!(
                !refs.is_empty(),
                "no reference logits for {case} in {}",
                dir.display()
            );
            let y = predictor.logits(&x).unwrap();
            assert_eq!(y.kind(), Kind::Half);
            let got: Vec<u16> = Vec::<half::f16>::try_from(y.flatten(0, -1))
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect();
            let mut misses = Vec::new();
            for path in &refs {
                let want = npy::read(path).unwrap();
                assert_eq!(
                    y.size(),
                    want.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
                );
                let want_bits = want.to_f16_bits();
                let differ = got.iter().zip(&want_bits).filter(|(a, b)| a != b).count();
                if differ == 0 {
                    misses.clear();
                    break;
                }
                let max = got
                    .iter()
                    .zip(&want_bits)
                    .map(|(&a, &b)| {
                        (half::f16::from_bits(a).to_f32() - half::f16::from_bits(b).to_f32()).abs()
                    })
                    .fold(0.0f32, f32::max);
                misses.push(format!(
                    "{}: {differ} of {} logits differ ({:.4} % equal), max |diff| {max}",
                    path.file_name().unwrap().to_string_lossy(),
                    got.len(),
                    100.0 * (1.0 - differ as f64 / got.len() as f64)
                ));
            }
            assert!(
                misses.is_empty(),
                "{run} {case}: equal to no nnU-Net reference (a CPU not seen yet? run \
                 tests/data/nnunet/make_cpu_reference.py and compare):\n{}",
                misses.join("\n")
            );
        }
    }

    #[test]
    fn fold_0_logits_are_nnunets_bit_for_bit() {
        parity(&[0], "fold0");
    }

    #[test]
    fn two_fold_ensemble_logits_are_nnunets_bit_for_bit() {
        parity(&[0, 1], "folds01");
    }

    /// nnUNetPredictor's own logits (make_predictor_reference.py) for the cases the fixture
    /// does not cover: a 2-fold ResidualEncoderUNet ensemble on a case smaller than the
    /// patch along x and tiled along z and y, and a 2D network run slice by slice.
    #[test]
    fn residual_ensemble_and_2d_logits_are_nnunets_bit_for_bit() {
        use crate::infer::nnunet::network::tests::{arch, dir};
        for (name, patch, axes, folds) in [
            (
                "resenc3d",
                vec![8, 16, 16],
                vec![0, 1, 2],
                &["checkpoint.pth", "checkpoint_fold1.pth"][..],
            ),
            ("plain2d", vec![20, 12], vec![0, 1], &["checkpoint.pth"][..]),
        ] {
            let (a, cin, cout) = arch(name);
            let nets = folds
                .iter()
                .map(|f| {
                    let ck = checkpoint::read(&dir(name).join(f)).unwrap();
                    assert_eq!(ck.mirroring_axes, axes);
                    Network::new(&a, cin, cout, &ck.weights, Device::Cpu).unwrap()
                })
                .collect();
            let p = Predictor::new(nets, patch, axes, Device::Cpu).unwrap();
            let x = npy::read(&dir(name).join("sw_input_f32.npy")).unwrap();
            let shape: Vec<i64> = x.shape.iter().map(|&d| d as i64).collect();
            let x = Tensor::from_slice(&x.to_f32()).reshape(shape.as_slice());
            let want = npy::read(&dir(name).join("sw_logits_f16.npy")).unwrap();
            let y = p.logits(&x).unwrap();
            assert_eq!(
                y.size(),
                want.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
            );
            let got: Vec<u16> = Vec::<half::f16>::try_from(y.flatten(0, -1))
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect();
            let differ = got
                .iter()
                .zip(want.to_f16_bits())
                .filter(|(a, b)| **a != *b)
                .count();
            assert_eq!(differ, 0, "{name}: {differ} of {} differ", got.len());
        }
    }

    #[test]
    fn refuses_inputs_and_setups_that_do_not_fit() {
        let folder = ModelFolder::open(&root().join(MODEL), Some(&[0])).unwrap();
        let p = Predictor::load(&folder, Device::Cpu).unwrap();
        for x in [
            Tensor::zeros([2, 4, 4, 4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([1, 4, 4, 4], (Kind::Double, Device::Cpu)),
            Tensor::zeros([1, 0, 4, 4], (Kind::Float, Device::Cpu)),
        ] {
            assert!(matches!(p.logits(&x), Err(PredictError::Input { .. })));
        }
        // A checkpoint of another configuration.
        let (_, path) = &folder.folds[0];
        let mut ck = checkpoint::read(path).unwrap();
        ck.configuration = Some("2d".into());
        let e =
            Predictor::from_checkpoints(&folder, &[(path.clone(), ck)], Device::Cpu).unwrap_err();
        assert!(matches!(e, PredictError::Mismatch { .. }), "{e}");
        // Patches no Gaussian can be made for.
        for patch in [
            &[][..],
            &[0, 4],
            &[1 << 20, 1 << 20, 1 << 20],
            &[usize::MAX, 2],
        ] {
            assert!(matches!(
                gaussian(patch, Device::Cpu),
                Err(PredictError::Setup(_))
            ));
        }
        // No folds.
        assert!(matches!(
            Predictor::new(Vec::new(), vec![1, 1, 1], Vec::new(), Device::Cpu),
            Err(PredictError::Setup(_))
        ));
    }
}
