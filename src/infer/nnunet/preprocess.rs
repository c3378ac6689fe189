//! nnU-Net's preprocessing of one case, as `DefaultPreprocessor.run_case_npy`
//! (`preprocessing/preprocessors/default_preprocessor.py` L44-117, nnunetv2 2.8.1) does it
//! for an image read by SimpleITKIO: transpose_forward, crop to the non-zero bounding box,
//! normalise, resample to the configuration's spacing. Owns the crop, the hole filling, the
//! normalisation schemes (with numpy's float32 reductions reproduced) and [`CaseProps`],
//! what export needs to undo it all.
//!
//! Layout: an [`ImageVolume`]'s data (`x + nx * (y + ny * z)`) is exactly the C-order
//! `[z, y, x]` array SimpleITK's `GetArrayFromImage` gives nnU-Net, and its spacing
//! reversed (`[sz, sy, sx]`) is nnU-Net's `properties['spacing']`
//! (`imageio/simpleitk_reader_writer.py`); the direction matrix plays no part.

use rayon::prelude::*;

use super::plans::{ModelFolder, Normalization};
use super::resample::{self, np_clip, ResampleError};
use crate::volume::ImageVolume;

/// What export needs to put a prediction back on the input grid (nnU-Net's case
/// properties). Shapes, box and spacing are in the network's axis order (after
/// `transpose_forward`).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseProps {
    /// The image's spacing, transposed (`[properties['spacing'][i] for i in
    /// transpose_forward]`).
    pub spacing: [f64; 3],
    /// `shape_before_cropping`: the transposed image's shape.
    pub shape_before_cropping: [usize; 3],
    /// `bbox_used_for_cropping`: half-open `[start, end)` per axis.
    pub bbox: [[usize; 2]; 3],
    /// `shape_after_cropping_and_before_resampling`.
    pub shape_after_cropping: [usize; 3],
}

/// The network's input for one case.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `[C = 1, z', y', x']`, C order (network axis order).
    pub data: Vec<f32>,
    /// `[z', y', x']`.
    pub shape: [usize; 3],
    /// For export.
    pub props: CaseProps,
}

/// Why a case cannot be preprocessed.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The volume is not a usable grid.
    #[error("image of {dims:?} voxels at spacing {spacing:?} with {len} values: {problem}")]
    Image {
        /// `[nx, ny, nz]`.
        dims: [usize; 3],
        /// `[sx, sy, sz]`.
        spacing: [f64; 3],
        /// Values present.
        len: usize,
        /// What is wrong.
        problem: &'static str,
    },
    /// The model folder describes something this step does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Resampling to the configuration's spacing failed.
    #[error("resampling the image from spacing {from:?} to {to:?} (network axis order): {source}")]
    Resample {
        /// The image's (cropped, transposed) spacing.
        from: [f64; 3],
        /// The target spacing.
        to: [f64; 3],
        /// The cause.
        source: Box<ResampleError>,
    },
}

/// Preprocess `image` for `folder`'s configuration, as nnU-Net does before its network.
///
/// # Errors
/// [`PreprocessError::Image`] for a volume whose data does not match its grid or whose
/// spacing is not positive; [`PreprocessError::Unsupported`] for other than one input
/// channel; [`PreprocessError::Resample`] when the target grid is empty or larger than
/// [`resample::MAX_VOXELS`] (a spacing far off the model's), or the plans' spline orders
/// are not reproduced.
pub fn preprocess(
    image: &ImageVolume,
    folder: &ModelFolder,
) -> Result<Preprocessed, PreprocessError> {
    let g = &image.geom;
    let bad = |problem| PreprocessError::Image {
        dims: g.dims,
        spacing: g.spacing,
        len: image.data.len(),
        problem,
    };
    let [nx, ny, nz] = g.dims;
    if g.dims.contains(&0) {
        return Err(bad("an axis is empty"));
    }
    if nx.checked_mul(ny).and_then(|n| n.checked_mul(nz)) != Some(image.data.len()) {
        return Err(bad("the data does not hold one value per voxel"));
    }
    if !g.spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
        return Err(bad("the spacing must be positive"));
    }
    let c = &folder.configuration;
    let (Some(&norm), Some(&use_mask), Some(intensity), 1) = (
        c.normalization.first(),
        c.use_mask_for_norm.first(),
        folder.intensity.first(),
        c.normalization.len(),
    ) else {
        return Err(PreprocessError::Unsupported(format!(
            "{}: one input channel expected, the plans have {} normalisation schemes",
            folder.dir.display(),
            c.normalization.len()
        )));
    };

    // SimpleITK's array and spacing order (z, y, x).
    let shape = [nz, ny, nx];
    let spacing = [g.spacing[2], g.spacing[1], g.spacing[0]];
    let tf = folder.transpose_forward;
    // run_case_npy L58-60: data.transpose([0, *[i + 1 for i in transpose_forward]]).
    let net_spacing = tf.map(|a| spacing[a]);
    let shape_before_cropping = tf.map(|a| shape[a]);

    // crop_to_nonzero (cropping.py L19-38): the bbox of binary_fill_holes(data != 0). Holes
    // lie inside the bbox of the non-zero voxels (a background voxel outside it reaches the
    // border in a straight line), so that bbox is the same and needs no filling; an empty
    // mask leaves acvl_utils' get_bbox_from_mask at the whole image.
    let bbox_orig = nonzero_bbox(&image.data, shape);
    let bbox = tf.map(|a| bbox_orig[a]);
    let cropped_shape = bbox.map(|[lo, hi]| hi - lo);
    let mut data = gather(
        &image.data,
        shape,
        bbox_orig.map(|b| b[0]),
        tf,
        cropped_shape,
    );

    // _normalize (L335-347), before resampling (L80-83).
    match norm {
        Normalization::Ct => ct_normalize(&mut data, intensity),
        Normalization::ZScore if use_mask => {
            // seg = -1 outside the hole-filled non-zero mask (cropping.py L37); the
            // normaliser uses seg >= 0. Filling commutes with the transpose and with this
            // crop (a component touching the original border touches the box's border).
            let mask = fill_holes(&data, cropped_shape);
            zscore_masked(&mut data, &mask);
        }
        Normalization::ZScore => {
            let (mean, std) = mean_std_of_box(&image.data, shape, bbox_orig);
            let div = zscore_divisor(std);
            data.par_iter_mut().for_each(|v| *v = (*v - mean) / div);
        }
    }

    // compute_new_shape with the configuration's spacing (2D configurations keep the
    // first axis, L70-74).
    let target: [f64; 3] = match c.spacing[..] {
        [a, b, c] => [a, b, c],
        [b, c] => [net_spacing[0], b, c],
        _ => {
            return Err(PreprocessError::Unsupported(format!(
                "{}: target spacing {:?} has neither 2 nor 3 entries",
                folder.dir.display(),
                c.spacing
            )))
        }
    };
    let rs_err = |source| PreprocessError::Resample {
        from: net_spacing,
        to: target,
        source: Box::new(source),
    };
    let new_shape =
        resample::compute_new_shape(cropped_shape, net_spacing, target).map_err(rs_err)?;
    let data = if new_shape == cropped_shape {
        data
    } else {
        resample::resample(
            &data,
            1,
            cropped_shape,
            new_shape,
            net_spacing,
            target,
            &c.resampling_data,
        )
        .map_err(rs_err)?
        .into_owned()
    };
    Ok(Preprocessed {
        data,
        shape: new_shape,
        props: CaseProps {
            spacing: net_spacing,
            shape_before_cropping,
            bbox,
            shape_after_cropping: cropped_shape,
        },
    })
}

/// Half-open bounding box of the voxels `!= 0` (NaN counts as non-zero, as in numpy) of a
/// C-order array; the whole array when there are none (acvl_utils
/// `get_bbox_from_mask`'s defaults).
fn nonzero_bbox(data: &[f32], shape: [usize; 3]) -> [[usize; 2]; 3] {
    let [_, ny, nx] = shape;
    // Per z-slice: (y min, y max + 1, x min, x max + 1), or None when all zero.
    let per_slice: Vec<Option<[usize; 4]>> = data
        .par_chunks(ny * nx)
        .map(|sl| {
            let mut b: Option<[usize; 4]> = None;
            for (y, row) in sl.chunks(nx).enumerate() {
                let Some(x0) = row.iter().position(|&v| v != 0.0) else {
                    continue;
                };
                let x1 = row.iter().rposition(|&v| v != 0.0).map_or(x0, |x| x) + 1;
                b = Some(match b {
                    None => [y, y + 1, x0, x1],
                    Some([y0, _, a0, a1]) => [y0, y + 1, a0.min(x0), a1.max(x1)],
                });
            }
            b
        })
        .collect();
    let z0 = per_slice.iter().position(Option::is_some);
    let z1 = per_slice.iter().rposition(Option::is_some);
    let (Some(z0), Some(z1)) = (z0, z1) else {
        return shape.map(|n| [0, n]);
    };
    let mut b = [[z0, z1 + 1], [usize::MAX, 0], [usize::MAX, 0]];
    for s in per_slice.iter().flatten() {
        b[1] = [b[1][0].min(s[0]), b[1][1].max(s[1])];
        b[2] = [b[2][0].min(s[2]), b[2][1].max(s[3])];
    }
    b
}

/// numpy's `src[lo0:, lo1:, lo2:].transpose(perm)` restricted to `out_shape`, copied to C
/// order: output axis `k` runs along source axis `perm[k]` from `lo[perm[k]]`. Callers
/// pass boxes inside `src_shape`.
pub(crate) fn gather<T: Copy + Send + Sync + Default>(
    src: &[T],
    src_shape: [usize; 3],
    lo: [usize; 3],
    perm: [usize; 3],
    out_shape: [usize; 3],
) -> Vec<T> {
    let ss = [src_shape[1] * src_shape[2], src_shape[2], 1];
    let base: usize = (0..3).map(|a| lo[a] * ss[a]).sum();
    let st = perm.map(|a| ss[a]);
    let plane = out_shape[1] * out_shape[2];
    let mut out = vec![T::default(); plane * out_shape[0]];
    if plane == 0 {
        return out;
    }
    out.par_chunks_mut(plane).enumerate().for_each(|(i0, p)| {
        for (i1, row) in p.chunks_mut(out_shape[2]).enumerate() {
            let b = base + i0 * st[0] + i1 * st[1];
            if st[2] == 1 {
                row.copy_from_slice(&src[b..b + out_shape[2]]);
            } else {
                for (i2, v) in row.iter_mut().enumerate() {
                    *v = src[b + i2 * st[2]];
                }
            }
        }
    });
    out
}

/// scipy `binary_fill_holes(data != 0)` (default structure: face connectivity): every
/// voxel not reachable from outside the array through zero voxels.
fn fill_holes(data: &[f32], shape: [usize; 3]) -> Vec<bool> {
    let [n0, n1, n2] = shape;
    // 0: zero voxel not (yet) reached, 1: non-zero, 2: zero voxel reached from outside.
    let mut state: Vec<u8> = data.par_iter().map(|&v| u8::from(v != 0.0)).collect();
    let mut stack = Vec::new();
    let idx = |i: usize, j: usize, k: usize| (i * n1 + j) * n2 + k;
    let seed = |st: &mut Vec<u8>, s: &mut Vec<usize>, p: usize| {
        if st[p] == 0 {
            st[p] = 2;
            s.push(p);
        }
    };
    for i in 0..n0 {
        for j in 0..n1 {
            for k in 0..n2 {
                if i == 0 || i == n0 - 1 || j == 0 || j == n1 - 1 || k == 0 || k == n2 - 1 {
                    seed(&mut state, &mut stack, idx(i, j, k));
                } else if k == 1 && n2 > 2 {
                    // Jump over the interior of the row.
                    seed(&mut state, &mut stack, idx(i, j, n2 - 1));
                    break;
                }
            }
        }
    }
    while let Some(p) = stack.pop() {
        let k = p % n2;
        let j = (p / n2) % n1;
        let i = p / (n1 * n2);
        if i > 0 {
            seed(&mut state, &mut stack, p - n1 * n2);
        }
        if i + 1 < n0 {
            seed(&mut state, &mut stack, p + n1 * n2);
        }
        if j > 0 {
            seed(&mut state, &mut stack, p - n2);
        }
        if j + 1 < n1 {
            seed(&mut state, &mut stack, p + n2);
        }
        if k > 0 {
            seed(&mut state, &mut stack, p - 1);
        }
        if k + 1 < n2 {
            seed(&mut state, &mut stack, p + 1);
        }
    }
    state.into_par_iter().map(|s| s != 2).collect()
}

/// CTNormalization.run (`default_normalization_schemes.py` L58-73) in float32: the plans'
/// statistics are Python floats, which numpy 2 casts to the array's float32 (NEP 50);
/// `max(std, eps)` is taken in float64 first.
fn ct_normalize(data: &mut [f32], p: &super::plans::Intensity) {
    let lo = p.percentile_00_5 as f32;
    let hi = p.percentile_99_5 as f32;
    let mean = p.mean as f32;
    let div = (if 1e-8 > p.std { 1e-8 } else { p.std }) as f32;
    data.par_iter_mut()
        .for_each(|v| *v = (np_clip(*v, lo, hi) - mean) / div);
}

/// ZScoreNormalization's `max(std, eps)`: `eps > std` compares the Python float with the
/// float32 scalar in float32; the result divides the float32 image as float32.
fn zscore_divisor(std: f32) -> f32 {
    let eps = 1e-8_f32;
    if eps > std {
        eps
    } else {
        std
    }
}

/// ZScoreNormalization with `use_mask_for_norm` (L29-47): statistics of `image[mask]` (C
/// order, contiguous), applied inside the mask only.
fn zscore_masked(data: &mut [f32], mask: &[bool]) {
    let vals: Vec<f32> = data
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v)
        .collect();
    let (mean, std) = mean_std_contiguous(&vals);
    let div = zscore_divisor(std);
    data.par_iter_mut()
        .zip(mask.par_iter())
        .for_each(|(v, &m)| {
            if m {
                *v = (*v - mean) / div;
            }
        });
}

/// numpy's pairwise float32 sum of a contiguous run (`loops_utils.h.src`
/// `FLOAT_pairwise_sum`: blocks of at most 128 summed with 8 accumulators).
fn pairwise(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0_f32;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0_f32; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// `arr.sum()` of a float32 array whose elements, in memory order, are `runs` (the
/// iterator's chunks, see [`box_sum`]): the reduction adds each chunk's pairwise sum to an
/// accumulator that starts at 0.
fn accumulate<'a>(runs: impl Iterator<Item = &'a [f32]>) -> f32 {
    runs.fold(0.0_f32, |acc, r| acc + pairwise(r))
}

/// numpy's `mean()` / `std()` of a contiguous float32 array (`_methods.py` `_mean`,
/// `_var`, `_std`): the float32 sum divided by the count in float64 (the count is an
/// `np.intp`, so the division promotes), cast back to float32; the variance is the float32
/// sum of float32 squared deviations, likewise divided; the root in float32.
fn mean_std_contiguous(vals: &[f32]) -> (f32, f32) {
    let n = vals.len() as f64;
    let mean = (f64::from(accumulate(std::iter::once(vals))) / n) as f32;
    let sq: Vec<f32> = vals
        .par_iter()
        .map(|&v| {
            let d = v - mean;
            d * d
        })
        .collect();
    let var = (f64::from(accumulate(std::iter::once(&sq[..]))) / n) as f32;
    (mean, var.sqrt())
}

/// The chunks numpy's buffered reduction iterator hands the float32 add loop for `box` of
/// a C-order array of `shape` (nnU-Net's normaliser gets a transposed, cropped view; the
/// iterator visits it in memory order, i.e. the box in the original `[z, y, x]` order).
/// `nditer_constr.c` (numpy 2.4) `npyiter_find_buffering_setup`: after coalescing, the
/// inner axis is the core; growing to the next axis costs a buffer; buffers hold whole
/// multiples of the core up to 8192 elements and never cross the chosen outer axis.
fn box_sum(data: &[f32], shape: [usize; 3], bbox: [[usize; 2]; 3]) -> f32 {
    const BUFSIZE: usize = 8192;
    let strides = [shape[1] * shape[2], shape[2], 1];
    // Axes with more than one element, outer first, coalesced where contiguous.
    let mut axes: Vec<(usize, usize)> = Vec::new();
    for a in 0..3 {
        let len = bbox[a][1] - bbox[a][0];
        if len <= 1 {
            continue;
        }
        match axes.last_mut() {
            Some(last) if last.1 == strides[a] * len => *last = (last.0 * len, strides[a]),
            _ => axes.push((len, strides[a])),
        }
    }
    let base: usize = (0..3).map(|a| bbox[a][0] * strides[a]).sum();
    if axes.len() <= 1 {
        // One (possibly strided) run: a single inner loop.
        let (n, st) = axes.first().copied().unwrap_or((1, 1));
        let run: Vec<f32> = (0..n).map(|k| data[base + k * st]).collect();
        return accumulate(std::iter::once(&run[..]));
    }
    // The elements in memory order, compacted (what a buffer would hold).
    let dims: Vec<usize> = axes.iter().map(|a| a.0).collect();
    let mut flat = Vec::with_capacity(dims.iter().product());
    let inner = axes[axes.len() - 1];
    let mut outer_idx = vec![0usize; axes.len() - 1];
    'rows: loop {
        let off: usize = base
            + outer_idx
                .iter()
                .zip(&axes)
                .map(|(&i, a)| i * a.1)
                .sum::<usize>();
        flat.extend((0..inner.0).map(|k| data[off + k * inner.1]));
        for d in (0..outer_idx.len()).rev() {
            outer_idx[d] += 1;
            if outer_idx[d] < dims[d] {
                continue 'rows;
            }
            outer_idx[d] = 0;
        }
        break;
    }
    // The cost model, inner axis first: cost 1 unbuffered, 2 once the input must be
    // buffered (it no longer has a single stride after the first axis).
    let d: Vec<usize> = dims.iter().rev().copied().collect();
    let (mut cost, mut size) = (1usize, d[0]);
    let (mut best_cost, mut best_size, mut best_core, mut best_dim) = (1usize, d[0], 1usize, 0);
    for (idim, &len) in d.iter().enumerate().skip(1) {
        if size >= BUFSIZE && cost > 1 {
            break;
        }
        if idim == 1 {
            cost += 1;
        }
        let core = size;
        size *= len;
        let bufsize = if size > BUFSIZE && cost > 1 {
            BUFSIZE
        } else {
            size
        };
        if (cost * best_size) as f64 <= (best_cost * bufsize) as f64 {
            best_cost = cost;
            best_core = core;
            best_size = size;
            best_dim = idim;
        }
    }
    if best_dim == 0 {
        return accumulate(flat.chunks(d[0]));
    }
    if BUFSIZE < best_size {
        best_size = best_core * (BUFSIZE / best_core);
    }
    let span: usize = d[..=best_dim].iter().product();
    accumulate(flat.chunks(span).flat_map(|s| s.chunks(best_size)))
}

/// `image.mean()` and `image.std()` of nnU-Net's transposed, cropped float32 view, given as
/// `bbox` (original axis order) of the original C-order array: the mean sums in the
/// iterator's chunks ([`box_sum`]); the deviations `arr - mean` are a new array in the
/// view's memory order, contiguous, summed in one pairwise run.
fn mean_std_of_box(data: &[f32], shape: [usize; 3], bbox: [[usize; 2]; 3]) -> (f32, f32) {
    let cs = bbox.map(|[lo, hi]| hi - lo);
    let n = (cs[0] * cs[1] * cs[2]) as f64;
    let mean = (f64::from(box_sum(data, shape, bbox)) / n) as f32;
    let vals = gather(data, shape, bbox.map(|b| b[0]), [0, 1, 2], cs);
    let sq: Vec<f32> = vals
        .par_iter()
        .map(|&v| {
            let d = v - mean;
            d * d
        })
        .collect();
    let var = (f64::from(accumulate(std::iter::once(&sq[..]))) / n) as f32;
    (mean, var.sqrt())
}

/// Paths and loaders of the parity fixtures (`tests/data/nnunet/`, made by nnU-Net itself:
/// see `make_fixtures.py` and the PROVENANCE notes there).
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::{Path, PathBuf};

    use super::CaseProps;
    use crate::infer::nnunet::plans::{ModelFolder, CHECKPOINT};

    pub(crate) const FOLDER: &str = "nnUNetTrainer__nnUNetPlansTiny__3d_fullres";

    pub(crate) fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet")
    }

    pub(crate) fn tiny() -> ModelFolder {
        ModelFolder::open(&dir().join("tinyct/model").join(FOLDER), None).unwrap()
    }

    /// The generated cases, by name.
    pub(crate) fn cases() -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir().join("cases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        assert!(v.len() >= 12, "{v:?}");
        v
    }

    /// A case's plans and dataset as a model folder (with an empty checkpoint, which
    /// nothing here reads).
    pub(crate) fn case_folder(name: &str) -> (tempfile::TempDir, ModelFolder) {
        let models = dir().join("cases").join(name).join("model");
        let folder = std::fs::read_dir(&models)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join(&folder);
        std::fs::create_dir_all(d.join("fold_0")).unwrap();
        std::fs::write(d.join("fold_0").join(CHECKPOINT), b"").unwrap();
        let src = models.join(&folder);
        for f in ["plans.json", "dataset.json"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
        let m = ModelFolder::open(&d, None).unwrap();
        (t, m)
    }

    /// nnU-Net's properties json as [`CaseProps`] (its `spacing` is untransposed).
    pub(crate) fn props(path: &Path, tf: [usize; 3]) -> CaseProps {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let u3 =
            |k: &str| -> [usize; 3] { std::array::from_fn(|i| v[k][i].as_u64().unwrap() as usize) };
        let spacing: [f64; 3] = std::array::from_fn(|i| v["spacing"][i].as_f64().unwrap());
        CaseProps {
            spacing: tf.map(|a| spacing[a]),
            shape_before_cropping: u3("shape_before_cropping"),
            bbox: std::array::from_fn(|i| {
                let b = &v["bbox_used_for_cropping"][i];
                [
                    b[0].as_u64().unwrap() as usize,
                    b[1].as_u64().unwrap() as usize,
                ]
            }),
            shape_after_cropping: u3("shape_after_cropping_and_before_resampling"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{case_folder, cases, dir, props, tiny};
    use super::*;
    use crate::infer::nnunet::npy;
    use crate::volume::{read_image, Geometry, Volume};

    /// Bit-exact comparison with a count of differing values for the message.
    fn assert_bits_eq(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        let diff: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
            .collect();
        assert!(
            diff.is_empty(),
            "{what}: {} of {} values differ, first at {}: ours {} nnU-Net {}",
            diff.len(),
            ours.len(),
            diff[0],
            ours[diff[0]],
            theirs[diff[0]]
        );
    }

    fn check(
        pre: &Preprocessed,
        reference: &npy::Npy,
        props_json: &std::path::Path,
        tf: [usize; 3],
        what: &str,
    ) {
        assert_eq!(
            reference.shape[..],
            [1, pre.shape[0], pre.shape[1], pre.shape[2]],
            "{what}: shape"
        );
        assert_bits_eq(&pre.data, &reference.to_f32(), what);
        assert_eq!(pre.props, props(props_json, tf), "{what}: properties");
    }

    #[test]
    fn tinyct_preprocessing_is_nnunets_bit_for_bit() {
        let m = tiny();
        let d = dir().join("tinyct");
        for case in ["TinyCT_006", "TinyCT_007"] {
            let img = read_image(&d.join(format!("imagesTs/{case}_0000.nii.gz"))).unwrap();
            let pre = preprocess(&img, &m).unwrap();
            let r =
                npy::read(&d.join(format!("reference/{case}_preprocessed_f32.npy.gz"))).unwrap();
            let pj = d.join(format!(
                "reference/fold0/intermediates/{case}_properties.json"
            ));
            check(&pre, &r, &pj, m.transpose_forward, case);
        }
    }

    #[test]
    fn generated_cases_preprocess_as_nnunet_does() {
        for name in cases() {
            let (_t, m) = case_folder(&name);
            let d = dir().join("cases").join(&name);
            let img = read_image(&d.join("image.nii.gz")).unwrap();
            let pre = preprocess(&img, &m).unwrap();
            let r = npy::read(&d.join("preprocessed_f32.npy.gz")).unwrap();
            check(
                &pre,
                &r,
                &d.join("properties.json"),
                m.transpose_forward,
                &name,
            );
        }
    }

    /// x[i] of make_fixtures.py's view-statistics arrays.
    fn formula(n: usize) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i * 2_654_435_761 % (1 << 32)) as f64 / f64::from(1 << 20) - 2048.0) as f32)
            .collect()
    }

    #[test]
    fn float32_statistics_follow_numpys_reduction_order() {
        let t: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir().join("tables/numpy_view_stats.json")).unwrap(),
        )
        .unwrap();
        let views = t.as_array().unwrap();
        assert!(views.len() >= 9);
        for v in views {
            let u = |x: &serde_json::Value| x.as_u64().unwrap() as usize;
            let shape: [usize; 3] = std::array::from_fn(|i| u(&v["shape"][i]));
            let bbox: [[usize; 2]; 3] =
                std::array::from_fn(|i| [u(&v["box"][i][0]), u(&v["box"][i][1])]);
            let data = formula(shape.iter().product());
            let bits = |k: &str| v[k].as_u64().unwrap() as u32;
            let (mean, std) = mean_std_of_box(&data, shape, bbox);
            assert_eq!(
                box_sum(&data, shape, bbox).to_bits(),
                bits("sum"),
                "sum {v}"
            );
            assert_eq!(mean.to_bits(), bits("mean"), "mean {v}");
            assert_eq!(std.to_bits(), bits("std"), "std {v}");
        }
    }

    fn volume(dims: [usize; 3], spacing: [f64; 3], data: Vec<f32>) -> ImageVolume {
        Volume {
            geom: Geometry::axis_aligned(dims, spacing, [0.0; 3]),
            data,
        }
    }

    #[test]
    fn degenerate_images_are_handled_or_refused_without_panicking() {
        let m = tiny();
        // One voxel, zero: the box is the whole (one-voxel) image.
        let p = preprocess(&volume([1, 1, 1], [0.8, 0.8, 2.8], vec![0.0]), &m).unwrap();
        assert_eq!(p.props.bbox, [[0, 1]; 3]);
        assert_eq!(p.data.len(), p.shape.iter().product::<usize>());
        // Mismatched data, empty axes and bad spacings are refused.
        for (dims, sp, n) in [
            ([2, 2, 2], [1.0; 3], 7),
            ([0, 2, 2], [1.0; 3], 0),
            ([2, 2, 2], [1.0, 0.0, 1.0], 8),
            ([2, 2, 2], [1.0, f64::NAN, 1.0], 8),
        ] {
            let e = preprocess(&volume(dims, sp, vec![1.0; n]), &m).unwrap_err();
            assert!(matches!(e, PreprocessError::Image { .. }), "{e}");
        }
        // A spacing far coarser than the model's asks for a grid beyond the limit; far
        // finer, for an empty one: both refused with the shapes in the message.
        let e = preprocess(&volume([4, 4, 4], [1e6, 1e6, 1e6], vec![1.0; 64]), &m).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let e = preprocess(&volume([1, 1, 1], [1e-6; 3], vec![1.0]), &m).unwrap_err();
        assert!(e.to_string().contains("target shape"), "{e}");
        // NaN voxels do not panic either.
        let mut d = vec![5.0; 27];
        d[13] = f32::NAN;
        preprocess(&volume([3, 3, 3], [0.8, 0.8, 2.8], d), &m).unwrap();
    }
}
