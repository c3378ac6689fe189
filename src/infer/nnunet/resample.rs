//! nnU-Net's resampling (`preprocessing/resampling/default_resampling.py`,
//! `resample_data_or_seg_to_shape`), numerically as scipy and scikit-image compute it: the
//! image to the target spacing before the network (order 3 in plane, nearest along a
//! separate low-resolution axis) and the logits back to the cropped input grid after it
//! (order 1). Owns the anisotropy rule, `compute_new_shape` and numpy's float64 -> float16
//! cast; everything is float64 inside, as nnU-Net's `data.astype(float)` makes it.
//!
//! The chain reproduced, per channel (nnunetv2 2.8.1, scikit-image 0.26, scipy 1.17):
//! - `default_resampling.py` L133-196 `resample_data_or_seg`: with a separate axis, each
//!   slice along it is resized in plane with `skimage.transform.resize(order, mode='edge',
//!   anti_aliasing=False)`, then `map_coordinates(order=order_z, mode='nearest')` at
//!   `scale * (i + 0.5) - 0.5` along the axis; otherwise one 3D `resize`. Stored into an
//!   array of the input's dtype (float32 data, float16 logits).
//! - skimage `transform/_warps.py` L171-225 `resize` = `scipy.ndimage.zoom(order,
//!   mode='nearest', grid_mode=True)` with zoom `in / out`, then L748-777
//!   `_clip_warp_output`: clip to the input's min / max (NaN-aware).
//! - scipy `ndimage/_interpolation.py` L834-894 `zoom`: order > 1 pre-pads 12 edge voxels
//!   (L212-225 `_prepad_for_spline_filter`) and B-spline-prefilters every axis
//!   (`src/ni_splines.c` `apply_filter`: mode nearest uses the *reflect* initialisation);
//!   `src/ni_interpolation.c` L652-1000 `NI_ZoomShift` then sums the footprint in C order
//!   with weights from `ni_splines.c` `get_spline_interpolation_weights`, edge indices
//!   clamped. The same sum, with per-axis coordinates, is `NI_GeometricTransform` (L246-630)
//!   for `map_coordinates`.
//!
//! Summation and multiplication orders follow the C code exactly, so results are bit
//! identical to nnU-Net's (they are, on the fixtures) rather than merely close.

use std::borrow::Cow;

use rayon::prelude::*;

use super::plans::Resampling;

/// The most voxels (per channel) evald resamples to or through. A target shape comes from
/// the image's spacing; a bogus spacing could otherwise ask for terabytes. 2^30 voxels is
/// a 1024^3 grid (4 GiB as float32), far beyond any CT nnU-Net plans for.
pub const MAX_VOXELS: usize = 1 << 30;

/// `nnunetv2/configuration.py` L7 `ANISO_THRESHOLD`.
const ANISO_THRESHOLD: f64 = 3.0;

/// scipy `_interpolation.py` L214: edge voxels pre-padded before the spline prefilter
/// (mode 'nearest' has no exact boundary condition for the filter).
const NPAD: usize = 12;

/// `ni_splines.c` `get_filter_poles`, order 3: sqrt(3) - 2, written there as
/// -0.267949192431122706472553658494127633 (this is the same float64).
const POLE_3: f64 = -0.267_949_192_431_122_7;

/// Why a resampling cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    /// A spline order evald does not reproduce.
    #[error("{what}: spline order {order} is not supported (evald reproduces orders {supported}, those of nnU-Net's stock plans)")]
    Order {
        /// Which order (`order` or `order_z`).
        what: &'static str,
        /// The order asked for.
        order: usize,
        /// The orders supported there.
        supported: &'static str,
    },
    /// A grid with an empty axis.
    #[error("{what}: shape {shape:?} has an empty axis")]
    Empty {
        /// Which grid.
        what: &'static str,
        /// Its shape.
        shape: [usize; 3],
    },
    /// A grid larger than [`MAX_VOXELS`].
    #[error("{what}: shape {shape:?} exceeds evald's limit of {MAX_VOXELS} voxels per channel")]
    TooLarge {
        /// Which grid.
        what: &'static str,
        /// Its shape (saturated).
        shape: [usize; 3],
    },
    /// A target shape that does not fit (non-finite or beyond the limit).
    #[error("target shape for {old_shape:?} at spacing {old_spacing:?} -> {new_spacing:?} is not a usable size ({values:?} voxels); evald resamples to at most {MAX_VOXELS} voxels")]
    Target {
        /// Shape before.
        old_shape: [usize; 3],
        /// Spacing before.
        old_spacing: [f64; 3],
        /// Spacing after.
        new_spacing: [f64; 3],
        /// The computed sizes.
        values: [f64; 3],
    },
    /// A spacing that is not three positive finite numbers.
    #[error("{what} spacing {spacing:?}: positive finite values expected")]
    Spacing {
        /// Which spacing.
        what: &'static str,
        /// The values.
        spacing: [f64; 3],
    },
    /// The buffer does not hold `channels` arrays of `shape`.
    #[error("{len} values given for {channels} channel(s) of shape {shape:?}")]
    Length {
        /// Values given.
        len: usize,
        /// Channels expected.
        channels: usize,
        /// Shape expected.
        shape: [usize; 3],
    },
}

/// An element type nnU-Net resamples: float32 (the image), float16 (logits), or float64
/// (the in-plane resampled stack). Values go to float64 and back as numpy's `astype` does.
pub trait Sample: Copy + Send + Sync {
    /// Whether one value widens in an instruction or two (else images are widened in bulk
    /// first, which vectorises).
    const CHEAP_WIDEN: bool = true;
    /// numpy's cast from float64 (round to nearest, ties to even, directly from float64).
    fn from_f64(v: f64) -> Self;
    /// Exact widening.
    fn to_f64(self) -> f64;
    /// Exact widening of `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f64]) {
        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v.to_f64());
    }
}

impl Sample for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl Sample for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Sample for half::f16 {
    const CHEAP_WIDEN: bool = false;
    fn from_f64(v: f64) -> Self {
        f16_from_f64(v)
    }
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(f16_to_f32(self))
    }
    fn widen(src: &[Self], dst: &mut [f64]) {
        // Exact (every float16 is a float64); SIMD where the CPU has F16C.
        half::slice::HalfFloatSliceExt::convert_to_f64_slice(src, dst);
    }
}

/// Exact float16 -> float32 widening, inlined (`half`'s goes through a call per value to
/// a runtime-detected F16C routine); NaNs come out quiet, as F16C makes them.
#[inline]
fn f16_to_f32(h: half::f16) -> f32 {
    let b = u32::from(h.to_bits());
    let sign = (b & 0x8000) << 16;
    let e = (b >> 10) & 0x1f;
    let m = b & 0x3ff;
    if e == 0x1f {
        f32::from_bits(sign | 0x7f80_0000 | if m == 0 { 0 } else { 0x40_0000 | (m << 13) })
    } else if e != 0 {
        f32::from_bits(sign | ((e + 112) << 23) | (m << 13))
    } else {
        // Zero or subnormal: m * 2^-24, exact.
        let v = m as f32 * f32::from_bits(0x3380_0000);
        if sign != 0 {
            -v
        } else {
            v
        }
    }
}

/// numpy's float64 -> float16 cast (`npy_double_to_half`): round to nearest, ties to even,
/// in one step. `half`'s own conversion goes through float32 (double rounding) or drops
/// the low mantissa bits, and differs from numpy near float16 midpoints.
pub fn f16_from_f64(v: f64) -> half::f16 {
    let bits = v.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let a = v.abs();
    let mag = if a.is_nan() {
        // NaN: the top significand bits kept, still a NaN (npy_double_to_half).
        match 0x7c00 + ((bits & 0x000f_ffff_ffff_ffff) >> 42) as u16 {
            0x7c00 => 0x7c01,
            m => m,
        }
    } else if a >= 65520.0 {
        // 65520 is halfway between 65504 (the largest float16) and 65536: ties to even go
        // up, to infinity.
        0x7c00
    } else {
        // a = t * 2^(e - 10) with e its binade (subnormals share e = -14): t < 2048 is
        // exact; (t + 2^52) - 2^52 rounds it to an integer, ties to even.
        let e = ((bits >> 52 & 0x7ff) as i32 - 1023).max(-14);
        let t = a * f64::from_bits(((10 - e + 1023) as u64) << 52);
        const BIG: f64 = 4_503_599_627_370_496.0;
        let n = ((t + BIG) - BIG) as u16;
        if e == -14 {
            // Subnormal (n < 1024) or the smallest binade: the bits are n itself.
            n
        } else {
            // n in 1024..=2048 (2048 carries into the next exponent, as the bits add up).
            (((e + 15) as u16) << 10) + (n - 1024)
        }
    };
    half::f16::from_bits(sign | mag)
}

/// `compute_new_shape` (`default_resampling.py` L23-29): `int(round(old_spacing /
/// new_spacing * old_shape))` per axis, Python's round (half to even).
///
/// # Errors
/// [`ResampleError::Spacing`] for a non-positive or non-finite spacing,
/// [`ResampleError::Target`] when a size is zero or the grid exceeds [`MAX_VOXELS`].
pub fn compute_new_shape(
    old_shape: [usize; 3],
    old_spacing: [f64; 3],
    new_spacing: [f64; 3],
) -> Result<[usize; 3], ResampleError> {
    check_spacing("current", old_spacing)?;
    check_spacing("target", new_spacing)?;
    let values: [f64; 3] =
        std::array::from_fn(|a| old_spacing[a] / new_spacing[a] * old_shape[a] as f64);
    let rounded = values.map(f64::round_ties_even);
    let err = || ResampleError::Target {
        old_shape,
        old_spacing,
        new_spacing,
        values,
    };
    if rounded
        .iter()
        .any(|&r| !(r >= 1.0 && r <= MAX_VOXELS as f64))
    {
        return Err(err());
    }
    let shape = rounded.map(|r| r as usize);
    voxels(shape).filter(|&n| n <= MAX_VOXELS).ok_or_else(err)?;
    Ok(shape)
}

fn check_spacing(what: &'static str, spacing: [f64; 3]) -> Result<(), ResampleError> {
    if spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
        Ok(())
    } else {
        Err(ResampleError::Spacing { what, spacing })
    }
}

fn voxels(shape: [usize; 3]) -> Option<usize> {
    shape[0].checked_mul(shape[1])?.checked_mul(shape[2])
}

/// `determine_do_sep_z_and_axis` (`default_resampling.py` L33-66): the axis resampled
/// separately, if any. Unless forced, it is the unique largest-spacing axis of the current
/// spacing when that is anisotropic (max / min > 3), else of the new spacing when that is;
/// two or three axes tied for the largest spacing mean full 3D.
pub fn separate_axis(
    force_separate_z: Option<bool>,
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
) -> Option<usize> {
    // get_lowres_axis (L18-20): np.where(max(s) / s == 1).
    let lowres = |s: [f64; 3]| -> Vec<usize> {
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (0..3).filter(|&a| m / s[a] == 1.0).collect()
    };
    // get_do_separate_z (L13-15): max / min > ANISO_THRESHOLD.
    let aniso = |s: [f64; 3]| {
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let n = s.iter().copied().fold(f64::INFINITY, f64::min);
        m / n > ANISO_THRESHOLD
    };
    let axes = match force_separate_z {
        Some(true) => lowres(current_spacing),
        Some(false) => return None,
        None if aniso(current_spacing) => lowres(current_spacing),
        None if aniso(new_spacing) => lowres(new_spacing),
        None => return None,
    };
    match axes[..] {
        [a] => Some(a),
        _ => None,
    }
}

/// `resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing,
/// is_seg=False, order, order_z, force_separate_z)` on `channels` C-order arrays of
/// `shape`. When `shape == new_shape` nnU-Net returns its input untouched (L192-194), and
/// so does this (borrowed).
///
/// # Errors
/// [`ResampleError`] for a buffer of the wrong length, empty or over-large grids, bad
/// spacings, and orders other than 0, 1, 3 (`order`) or 0, 1 (`order_z`).
pub fn resample<'a, T: Sample>(
    data: &'a [T],
    channels: usize,
    shape: [usize; 3],
    new_shape: [usize; 3],
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
    r: &Resampling,
) -> Result<Cow<'a, [T]>, ResampleError> {
    let n_in = voxels(shape)
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or(ResampleError::TooLarge {
            what: "input",
            shape,
        })?;
    if n_in.checked_mul(channels) != Some(data.len()) {
        return Err(ResampleError::Length {
            len: data.len(),
            channels,
            shape,
        });
    }
    if shape.contains(&0) {
        return Err(ResampleError::Empty {
            what: "input",
            shape,
        });
    }
    if new_shape.contains(&0) {
        return Err(ResampleError::Empty {
            what: "target",
            shape: new_shape,
        });
    }
    let n_out = voxels(new_shape)
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or(ResampleError::TooLarge {
            what: "target",
            shape: new_shape,
        })?;
    if shape == new_shape {
        return Ok(Cow::Borrowed(data));
    }
    check_spacing("current", current_spacing)?;
    check_spacing("target", new_spacing)?;
    if ![0, 1, 3].contains(&r.order) {
        return Err(ResampleError::Order {
            what: "order",
            order: r.order,
            supported: "0, 1 and 3",
        });
    }
    let axis = separate_axis(r.force_separate_z, current_spacing, new_spacing);
    if let Some(a) = axis {
        let mut mid = new_shape;
        mid[a] = shape[a];
        voxels(mid)
            .filter(|&n| n <= MAX_VOXELS)
            .ok_or(ResampleError::TooLarge {
                what: "in-plane resampled stack",
                shape: mid,
            })?;
        if shape[a] != new_shape[a] && r.order_z > 1 {
            return Err(ResampleError::Order {
                what: "order_z",
                order: r.order_z,
                supported: "0 and 1",
            });
        }
    }
    // Each channel is resampled in float64 and stored into the output's type as its last
    // step (`reshaped_final[c] = ...`, L185-188, L191), without a float64 copy of it.
    let mut out = vec![T::from_f64(0.0); n_out * channels];
    let mut stack = Vec::new();
    for (c, dst) in out.chunks_mut(n_out).enumerate() {
        let ch = &data[c * n_in..(c + 1) * n_in];
        match axis {
            // data.astype(float) (L150) slice by slice, as each is needed.
            Some(a) => separate(ch, shape, new_shape, a, r, &mut stack, dst),
            // data.astype(float) (L150) as values are read (or padded, at order 3).
            None => ZoomPlan::new(shape, new_shape, [true; 3], r.order).resize(
                ch,
                dst,
                T::from_f64,
                true,
            ),
        }
    }
    Ok(Cow::Owned(out))
}

/// The separate-axis branch (`default_resampling.py` L154-188) of one channel into `dst`;
/// `stack` is the float64 in-plane resampled stack, reused across channels.
#[allow(clippy::too_many_arguments)]
fn separate<T: Sample>(
    src: &[T],
    shape: [usize; 3],
    new_shape: [usize; 3],
    a: usize,
    r: &Resampling,
    stack: &mut Vec<f64>,
    dst: &mut [T],
) {
    let (p, q) = match a {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    // Each slice along `a`, resized in plane (L165-170): as a 2D image, i.e. a leading
    // axis of one that is neither padded nor filtered.
    let plan = ZoomPlan::new(
        [1, shape[p], shape[q]],
        [1, new_shape[p], new_shape[q]],
        [false, true, true],
        r.order,
    );
    let mut mid = new_shape;
    mid[a] = shape[a];
    let plane = mid[p] * mid[q];
    // map_coordinates(reshaped_here, coord_map, order=order_z, mode='nearest') (L185):
    // along `a` at scale * (i + 0.5) - 0.5 with scale = old / new (L176-182); the in-plane
    // coordinates are exactly the output indices (scale 1). (Only used when the axis
    // changes; order_z is then 0 or 1.)
    let taps: [Taps; 3] = std::array::from_fn(|ax| {
        let scale = mid[ax] as f64 / new_shape[ax] as f64;
        let order_z = if shape[a] == new_shape[a] {
            0
        } else {
            r.order_z
        };
        Taps::new(
            (0..new_shape[ax]).map(|i| scale * (i as f64 + 0.5) - 0.5),
            mid[ax],
            order_z,
        )
    });
    if a == 0 && (r.order_z == 0 || shape[0] == new_shape[0]) {
        // Each output plane is one resized slice: resize each slice once, straight into
        // the planes that take it (none, when z shrinks and it is skipped). Nearest along
        // z returns `t = 0.0 + c` (NI_GeometricTransform L585-597), which turns -0.0 into
        // +0.0; equal z stores the stack as it is (L187-188).
        let same = shape[0] == new_shape[0];
        let mut takers: Vec<Vec<&mut [T]>> = (0..shape[0]).map(|_| Vec::new()).collect();
        for (o, out) in dst.chunks_mut(plane).enumerate() {
            let s = if same { o } else { taps[0].t[o].0[0] };
            takers[s].push(out);
        }
        takers
            .into_par_iter()
            .enumerate()
            .filter(|(_, outs)| !outs.is_empty())
            .for_each(|(s, mut outs)| {
                let (first, rest) = outs.split_at_mut(1);
                let store = |v: f64| T::from_f64(if same { v } else { 0.0 + v });
                plan.resize(
                    slice_of(src, shape, 0, s, &mut Vec::new()),
                    first[0],
                    store,
                    false,
                );
                for out in rest {
                    out.copy_from_slice(first[0]);
                }
            });
        return;
    }
    stack.clear();
    stack.resize(plane * mid[a], 0.0);
    if a == 0 {
        // Slices are contiguous planes of the stack: fill them in place.
        stack
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(s, out)| {
                plan.resize(
                    slice_of(src, shape, 0, s, &mut Vec::new()),
                    out,
                    |v| v,
                    false,
                );
            });
    } else {
        let slices: Vec<Vec<f64>> = (0..shape[a])
            .into_par_iter()
            .map_init(Vec::new, |img, s| {
                let mut out = vec![0.0; plane];
                plan.resize(slice_of(src, shape, a, s, img), &mut out, |v| v, false);
                out
            })
            .collect();
        let ms = [mid[1] * mid[2], mid[2], 1];
        for (s, img) in slices.iter().enumerate() {
            for i in 0..mid[p] {
                let base = s * ms[a] + i * ms[p];
                for j in 0..mid[q] {
                    stack[base + j * ms[q]] = img[i * mid[q] + j];
                }
            }
        }
    }
    if shape[a] == new_shape[a] {
        dst.par_iter_mut()
            .zip(stack.par_iter())
            .for_each(|(d, &v)| *d = T::from_f64(v));
        return;
    }
    interpolate(stack, mid, &taps, r.order_z, dst, T::from_f64);
}

/// Slice `s` along axis `a` of a C-order array of `shape`, as a 2D C-order image: a plane
/// of `src` itself when `a == 0` (no copy), else gathered into `img`.
fn slice_of<'a, T: Copy>(
    src: &'a [T],
    shape: [usize; 3],
    a: usize,
    s: usize,
    img: &'a mut Vec<T>,
) -> &'a [T] {
    let strides = [shape[1] * shape[2], shape[2], 1];
    if a == 0 {
        return &src[s * strides[0]..(s + 1) * strides[0]];
    }
    let (p, q) = if a == 1 { (0, 2) } else { (0, 1) };
    img.clear();
    for i in 0..shape[p] {
        let base = s * strides[a] + i * strides[p];
        img.extend((0..shape[q]).map(|j| src[base + j * strides[q]]));
    }
    img
}

/// scipy `zoom(image, in / out, order, mode='nearest', grid_mode=True)` for one geometry:
/// the footprints of every output index, computed once and reused for every slice (and
/// channel) of that geometry.
struct ZoomPlan {
    dims: [usize; 3],
    out: [usize; 3],
    /// Axes that are the image's (`false`: the leading axis of one of a 2D image, neither
    /// padded nor filtered).
    real: [bool; 3],
    order: usize,
    /// Edge voxels pre-padded per side (order > 1).
    npad: usize,
    taps: [Taps; 3],
}

impl ZoomPlan {
    fn new(dims: [usize; 3], out: [usize; 3], real: [bool; 3], order: usize) -> Self {
        let npad = if order > 1 { NPAD } else { 0 };
        // NI_ZoomShift L780-800: cc = ((k + 0.5) * zoom - 0.5) + nprepad, zoom = in / out
        // (_interpolation.py L880-890, grid_mode).
        let taps = std::array::from_fn(|ax| {
            if !real[ax] {
                return Taps::identity(out[ax]);
            }
            let z = dims[ax] as f64 / out[ax] as f64;
            Taps::new(
                (0..out[ax]).map(|k| {
                    let mut cc = k as f64;
                    cc += 0.5;
                    cc *= z;
                    cc -= 0.5;
                    cc + npad as f64
                }),
                dims[ax] + 2 * npad,
                order,
            )
        });
        ZoomPlan {
            dims,
            out,
            real,
            order,
            npad,
            taps,
        }
    }

    /// skimage `resize(image, out, order, mode='edge', anti_aliasing=False)` of `img` into
    /// `dst`: `zoom`, the clip to the input's range, then `store` (the cast to the output's
    /// type). `parallel` spreads the work of one image over threads (off when images are
    /// already processed in parallel).
    fn resize<S: Sample, O: Send>(
        &self,
        img: &[S],
        dst: &mut [O],
        store: impl Fn(f64) -> O + Sync,
        parallel: bool,
    ) {
        if !S::CHEAP_WIDEN {
            // Widen the whole image at once (SIMD) into this thread's scratch buffer,
            // taken out while in use (so a nested call just makes its own) and kept only
            // while slice-sized (a whole 3D channel is not held on to).
            const KEEP: usize = 1 << 21;
            thread_local!(static SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) });
            let mut wide = SCRATCH.with(std::cell::Cell::take);
            wide.clear();
            wide.resize(img.len(), 0.0);
            S::widen(img, &mut wide);
            self.resize(&wide[..], dst, store, parallel);
            if wide.capacity() <= KEEP {
                SCRATCH.with(|c| c.set(wide));
            }
            return;
        }
        let (lo, hi) = nan_aware_range(img);
        if lo.is_nan() {
            // np.clip with NaN bounds (an all-NaN input) gives NaN everywhere.
            dst.iter_mut().for_each(|d| *d = store(lo));
            return;
        }
        let store = |v: f64| store(np_clip(v, lo, hi));
        // _interpolation.py L845-850: all zooms 1 returns the input (skimage's zoom factors
        // are 1 / (in / out), which is exactly 1 only for in == out at these sizes).
        if self.dims == self.out {
            dst.iter_mut()
                .zip(img)
                .for_each(|(d, &v)| *d = store(v.to_f64()));
            return;
        }
        if self.order > 1 {
            // The prefilter runs on the padded float64 copy (_interpolation.py L859-861).
            let pdims: [usize; 3] = std::array::from_fn(|a| {
                self.dims[a] + if self.real[a] { 2 * self.npad } else { 0 }
            });
            let pad = self.real.map(|r| if r { self.npad } else { 0 });
            let mut p = pad_edge(img, self.dims, pad, pdims);
            spline_filter(&mut p, pdims, parallel);
            interpolate(&p, pdims, &self.taps, self.order, dst, store);
        } else {
            // Orders 0 and 1 read the input itself, widened as read.
            interpolate(img, self.dims, &self.taps, self.order, dst, store);
        }
    }
}

/// np.pad(mode='edge') by `pad[a]` on both sides of each axis, to `pd`.
/// np.pad(mode='edge') by `pad[a]` on both sides of each axis, to `pd`, widened to float64.
fn pad_edge<S: Sample>(img: &[S], dims: [usize; 3], pad: [usize; 3], pd: [usize; 3]) -> Vec<f64> {
    let src = |a: usize, i: usize| i.saturating_sub(pad[a]).min(dims[a] - 1);
    let mut out = Vec::with_capacity(pd.iter().product());
    for i0 in 0..pd[0] {
        let s0 = src(0, i0);
        for i1 in 0..pd[1] {
            let base = (s0 * dims[1] + src(1, i1)) * dims[2];
            let row = &img[base..base + dims[2]];
            out.extend(std::iter::repeat_n(row[0].to_f64(), pad[2]));
            out.extend(row.iter().map(|v| v.to_f64()));
            out.extend(std::iter::repeat_n(row[dims[2] - 1].to_f64(), pad[2]));
        }
    }
    out
}

/// `spline_filter(order=3, mode='nearest')`: `spline_filter1d` along each axis in turn
/// (_interpolation.py L193-197; axes of length 1 are left alone, `NI_SplineFilter1D`
/// L186-189).
fn spline_filter(data: &mut [f64], dims: [usize; 3], parallel: bool) {
    for ax in 0..3 {
        let n = dims[ax];
        if n <= 1 {
            continue;
        }
        let inner: usize = dims[ax + 1..].iter().product();
        if !parallel {
            for block in data.chunks_mut(n * inner) {
                if inner == 1 {
                    filter_line(block, POLE_3);
                } else {
                    let mut rows: Vec<&mut [f64]> = block.chunks_mut(inner).collect();
                    filter_lines(&mut rows, POLE_3);
                }
            }
            continue;
        }
        if inner == 1 {
            data.par_chunks_mut(n)
                .with_min_len(64)
                .for_each(|line| filter_line(line, POLE_3));
            continue;
        }
        // Lines along `ax` are independent: filter them a band of columns at a time, row
        // by row (the same arithmetic per line, in cache order), bands in parallel.
        const BAND: usize = 256;
        let mut tasks: Vec<Vec<&mut [f64]>> = Vec::new();
        for block in data.chunks_mut(n * inner) {
            let first = tasks.len();
            tasks.extend((0..inner.div_ceil(BAND)).map(|_| Vec::with_capacity(n)));
            for row in block.chunks_mut(inner) {
                for (b, seg) in row.chunks_mut(BAND).enumerate() {
                    tasks[first + b].push(seg);
                }
            }
        }
        tasks
            .par_iter_mut()
            .for_each(|rows| filter_lines(rows, POLE_3));
    }
}

/// `ni_splines.c` `apply_filter` (one pole, mode nearest: `_init_causal_reflect`,
/// `_init_anticausal_reflect`, `_apply_filter`) on one contiguous line, as written in C.
fn filter_line(c: &mut [f64], z: f64) {
    let n = c.len();
    let gain = 1.0 * ((1.0 - z) * (1.0 - 1.0 / z));
    for v in c.iter_mut() {
        *v *= gain;
    }
    let z_n = z.powf(n as f64);
    let c0 = c[0];
    c[0] += z_n * c[n - 1];
    let mut z_i = z;
    for i in 1..n {
        c[0] += z_i * (c[i] + z_n * c[n - 1 - i]);
        z_i *= z;
    }
    c[0] *= z / (1.0 - z_n * z_n);
    c[0] += c0;
    for i in 1..n {
        c[i] += z * c[i - 1];
    }
    c[n - 1] *= z / (z - 1.0);
    for i in (0..n - 1).rev() {
        c[i] = z * (c[i + 1] - c[i]);
    }
}

/// [`filter_line`] on lines stored across `rows` (element `i` of line `j` is
/// `rows[i][j]`), the same operations per line. Indexed like the C code, which reads the
/// row it is updating (`c[n - 1 - i]` is `c[0]` when `i == n - 1`).
#[allow(clippy::needless_range_loop)]
fn filter_lines(rows: &mut [&mut [f64]], z: f64) {
    let n = rows.len();
    let Some(w) = rows.first().map(|r| r.len()) else {
        return;
    };
    // _apply_filter_gain.
    let gain = 1.0 * ((1.0 - z) * (1.0 - 1.0 / z));
    for r in rows.iter_mut() {
        for v in r.iter_mut() {
            *v *= gain;
        }
    }
    // _init_causal_reflect.
    let z_n = z.powf(n as f64);
    let c0: Vec<f64> = rows[0].to_vec();
    for j in 0..w {
        rows[0][j] += z_n * rows[n - 1][j];
    }
    let mut z_i = z;
    for i in 1..n {
        for j in 0..w {
            // c[n - 1 - i] is c[0] itself (as updated so far) when i == n - 1.
            let t = z_i * (rows[i][j] + z_n * rows[n - 1 - i][j]);
            rows[0][j] += t;
        }
        z_i *= z;
    }
    let f = z / (1.0 - z_n * z_n);
    for j in 0..w {
        rows[0][j] *= f;
        rows[0][j] += c0[j];
    }
    // Causal pass.
    for i in 1..n {
        let (prev, cur) = rows.split_at_mut(i);
        let (prev, cur) = (&*prev[i - 1], &mut *cur[0]);
        for j in 0..w {
            cur[j] += z * prev[j];
        }
    }
    // _init_anticausal_reflect, then the anticausal pass.
    let g = z / (z - 1.0);
    for v in rows[n - 1].iter_mut() {
        *v *= g;
    }
    for i in (0..n - 1).rev() {
        let (cur, next) = rows.split_at_mut(i + 1);
        let (cur, next) = (&mut *cur[i], &*next[0]);
        for j in 0..w {
            cur[j] = z * (next[j] - cur[j]);
        }
    }
}

/// Per output index along one axis: the input indices of the spline footprint (clamped,
/// as mode 'nearest' maps them) and their weights; the first `n` of each are used.
struct Taps {
    /// Footprint length (order + 1, or 1 for an axis that is only carried along).
    n: usize,
    t: Vec<([usize; 4], [f64; 4])>,
}

impl Taps {
    /// From coordinates `cc` into an axis of `len` (`NI_ZoomShift` L802-846).
    fn new(coords: impl Iterator<Item = f64>, len: usize, order: usize) -> Self {
        // Callers pass the validated orders 0, 1 and 3; the bound only keeps the footprint
        // within its four slots whatever happens.
        let order = order.min(3);
        let n = order + 1;
        let t = coords
            .map(|cc| {
                let start = if order & 1 == 1 {
                    floor(cc) as i64 - (order / 2) as i64
                } else {
                    floor(cc + 0.5) as i64 - (order / 2) as i64
                };
                let idx = std::array::from_fn(|l| {
                    (start + l.min(order) as i64).clamp(0, len as i64 - 1) as usize
                });
                let mut w = [1.0, 0.0, 0.0, 0.0];
                if order > 0 {
                    spline_weights(cc, order, &mut w);
                }
                (idx, w)
            })
            .collect();
        Taps { n, t }
    }

    /// An axis of length one carried through unchanged (the leading axis of a 2D image).
    fn identity(len: usize) -> Self {
        Taps {
            n: 1,
            t: vec![([0; 4], [1.0, 0.0, 0.0, 0.0]); len],
        }
    }

    fn len(&self) -> usize {
        self.t.len()
    }
}

/// C's `floor` for the coordinates here (finite, far inside the i64 range), inline: without
/// SSE4.1 `f64::floor` is a libm call.
#[inline]
fn floor(x: f64) -> f64 {
    let t = x as i64 as f64;
    if t > x {
        t - 1.0
    } else {
        t
    }
}

/// `ni_splines.c` `get_spline_interpolation_weights` for orders 1 and 3, operation for
/// operation.
fn spline_weights(x: f64, order: usize, w: &mut [f64; 4]) {
    let x = x - floor(if order & 1 == 1 { x } else { x + 0.5 });
    match order {
        1 => w[0] = 1.0 - x,
        3 => {
            let y = x;
            let z = 1.0 - x;
            w[1] = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0;
            w[2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
            w[0] = z * z * z / 6.0;
        }
        _ => return,
    }
    w[order] = 1.0;
    for i in 0..order {
        w[order] -= w[i];
    }
}

/// The footprint sum of `NI_ZoomShift` / `NI_GeometricTransform`: per output voxel,
/// `t = 0; for each footprint point in C order: t += c * w0 * w1 * w2` (no weights at
/// order 0).
fn interpolate<S: Sample, O: Send>(
    src: &[S],
    dims: [usize; 3],
    taps: &[Taps; 3],
    order: usize,
    dst: &mut [O],
    store: impl Fn(f64) -> O + Sync,
) {
    let weighted = order > 0;
    // Footprint sizes fixed at compile time for the costly cases (2D and 3D at orders 1
    // and 3), so the footprint loops unroll; the rest (order 0: one tap, a gather) takes
    // the general loop. The arithmetic is the same in every case.
    match [taps[0].n, taps[1].n, taps[2].n] {
        [1, 4, 4] => interp_fixed::<1, 4, 4, _, _>(src, dims, taps, weighted, dst, &store),
        [1, 2, 2] => interp_fixed::<1, 2, 2, _, _>(src, dims, taps, weighted, dst, &store),
        [4, 4, 4] => interp_fixed::<4, 4, 4, _, _>(src, dims, taps, weighted, dst, &store),
        [2, 2, 2] => interp_fixed::<2, 2, 2, _, _>(src, dims, taps, weighted, dst, &store),
        _ => interp_any(src, dims, taps, weighted, dst, &store),
    }
}

fn interp_fixed<const N0: usize, const N1: usize, const N2: usize, S: Sample, O: Send>(
    src: &[S],
    dims: [usize; 3],
    taps: &[Taps; 3],
    weighted: bool,
    dst: &mut [O],
    store: &(impl Fn(f64) -> O + Sync),
) {
    let (t1, t2) = (&taps[1].t, &taps[2].t);
    let (n1, n2) = (t1.len(), t2.len());
    if n1 * n2 == 0 {
        return;
    }
    let plane = |(out, (i0s, w0s)): (&mut [O], &([usize; 4], [f64; 4]))| {
        for (row, (i1s, w1s)) in out.chunks_mut(n2).zip(t1) {
            // The source rows of this output row's footprint.
            let rows: [[&[S]; N1]; N0] = std::array::from_fn(|f0| {
                std::array::from_fn(|f1| {
                    let b = (i0s[f0] * dims[1] + i1s[f1]) * dims[2];
                    &src[b..b + dims[2]]
                })
            });
            for (v, (i2s, w2s)) in row.iter_mut().zip(t2) {
                let mut t = 0.0;
                for f0 in 0..N0 {
                    for f1 in 0..N1 {
                        let r = rows[f0][f1];
                        for f2 in 0..N2 {
                            let mut c = r[i2s[f2]].to_f64();
                            if weighted {
                                // An axis with one tap has weight exactly 1 (it is only
                                // carried along): multiplying by it changes nothing.
                                if N0 > 1 {
                                    c *= w0s[f0];
                                }
                                if N1 > 1 {
                                    c *= w1s[f1];
                                }
                                if N2 > 1 {
                                    c *= w2s[f2];
                                }
                            }
                            t += c;
                        }
                    }
                }
                *v = store(t);
            }
        }
    };
    if taps[0].len() == 1 {
        plane((dst, &taps[0].t[0]));
    } else {
        dst.par_chunks_mut(n1 * n2)
            .zip(taps[0].t.par_iter())
            .for_each(plane);
    }
}

/// [`interp_fixed`] for any footprint sizes.
fn interp_any<S: Sample, O: Send>(
    src: &[S],
    dims: [usize; 3],
    taps: &[Taps; 3],
    weighted: bool,
    dst: &mut [O],
    store: &(impl Fn(f64) -> O + Sync),
) {
    let (n1, n2) = (taps[1].len(), taps[2].len());
    let [k0, k1, k2] = [taps[0].n, taps[1].n, taps[2].n];
    if n1 * n2 == 0 {
        return;
    }
    dst.par_chunks_mut(n1 * n2)
        .zip(taps[0].t.par_iter())
        .for_each(|(plane, (i0s, w0s))| {
            for (row, (i1s, w1s)) in plane.chunks_mut(n2).zip(&taps[1].t) {
                for (v, (i2s, w2s)) in row.iter_mut().zip(&taps[2].t) {
                    let mut t = 0.0;
                    for f0 in 0..k0 {
                        for f1 in 0..k1 {
                            let base = (i0s[f0] * dims[1] + i1s[f1]) * dims[2];
                            for f2 in 0..k2 {
                                let mut c = src[base + i2s[f2]].to_f64();
                                if weighted {
                                    c *= w0s[f0];
                                    c *= w1s[f1];
                                    c *= w2s[f2];
                                }
                                t += c;
                            }
                        }
                    }
                    *v = store(t);
                }
            }
        });
}

/// The bounds of skimage `_clip_warp_output(clip=True)` (`_warps.py` L748-777): the
/// input's min and max, nanmin / nanmax when it holds NaN (NaN bounds when all NaN).
fn nan_aware_range<S: Sample>(input: &[S]) -> (f64, f64) {
    // Comparisons with NaN are false, so NaNs are skipped, as nanmin / nanmax skip them;
    // four running bounds let the loop vectorise (min and max do not depend on order).
    let mut lo = [f64::INFINITY; 4];
    let mut hi = [f64::NEG_INFINITY; 4];
    let mut chunks = input.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            let v = c[k].to_f64();
            lo[k] = if v < lo[k] { v } else { lo[k] };
            hi[k] = if v > hi[k] { v } else { hi[k] };
        }
    }
    for v in chunks.remainder() {
        let v = v.to_f64();
        lo[0] = if v < lo[0] { v } else { lo[0] };
        hi[0] = if v > hi[0] { v } else { hi[0] };
    }
    let lo = lo
        .into_iter()
        .fold(f64::INFINITY, |a, b| if b < a { b } else { a });
    let hi = hi
        .into_iter()
        .fold(f64::NEG_INFINITY, |a, b| if b > a { b } else { a });
    if lo > hi {
        (f64::NAN, f64::NAN)
    } else {
        (lo, hi)
    }
}

/// numpy's `clip` for floats (`clip.cpp`: `_NPY_MIN(_NPY_MAX(x, lo), hi)` with
/// `_NPY_MAX(a, b) = isnan(a) ? a : (a > b ? a : b)`, `_NPY_MIN` likewise with `<`), for
/// bounds that are not NaN: a NaN `x` stays NaN, equal values give the bound.
#[inline]
pub(crate) fn np_clip<F: PartialOrd + Copy>(x: F, lo: F, hi: F) -> F {
    let m = if x <= lo { lo } else { x };
    if m >= hi {
        hi
    } else {
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::nnunet::npy;
    use crate::infer::nnunet::preprocess::fixtures::dir;

    #[test]
    fn float16_casts_round_as_numpy_does() {
        let t = dir().join("tables");
        let vals = npy::read(&t.join("f64_values.npy.gz")).unwrap();
        let want = npy::read(&t.join("f64_to_f16.npy.gz"))
            .unwrap()
            .to_f16_bits();
        let vals: Vec<f64> = vals
            .bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals.len(), want.len());
        assert!(vals.len() > 10_000);
        let bad: Vec<(f64, u16, u16)> = vals
            .iter()
            .zip(&want)
            .map(|(&v, &w)| (v, f16_from_f64(v).to_bits(), w))
            .filter(|(_, o, w)| o != w)
            .collect();
        assert!(
            bad.is_empty(),
            "{} differ, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    #[test]
    fn every_float16_is_its_own_cast_and_widens_exactly() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut wide = vec![0.0; all.len()];
        half::f16::widen(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            let inline = Sample::to_f64(*h);
            if h.is_nan() {
                assert!(w.is_nan() && inline.is_nan());
                assert!(f16_from_f64(*w).is_nan());
            } else {
                assert_eq!(*w, f64::from(h.to_f32()), "{h}");
                assert_eq!(inline.to_bits(), w.to_bits(), "{h}");
                assert_eq!(f16_from_f64(*w).to_bits(), h.to_bits(), "{h}");
            }
        }
    }

    #[test]
    fn refuses_what_it_does_not_reproduce() {
        let r = |order, order_z| Resampling {
            order,
            order_z,
            force_separate_z: None,
        };
        let d = vec![1.0_f32; 8];
        let s = [2, 2, 2];
        let e = resample(&d, 1, s, [3, 3, 3], [1.0; 3], [0.5; 3], &r(2, 0)).unwrap_err();
        assert!(e.to_string().contains("order 2"), "{e}");
        let e = resample(
            &d,
            1,
            s,
            [3, 3, 3],
            [4.0, 1.0, 1.0],
            [2.0, 1.0, 1.0],
            &r(3, 3),
        )
        .unwrap_err();
        assert!(e.to_string().contains("order_z"), "{e}");
        // order_z is not used (nor checked) when the separate axis keeps its size.
        let ok = resample(
            &d,
            1,
            s,
            [2, 3, 3],
            [4.0, 1.0, 1.0],
            [4.0, 0.7, 0.7],
            &r(3, 5),
        );
        assert_eq!(ok.unwrap().len(), 18);
        let e = resample(&d, 2, s, s, [1.0; 3], [1.0; 3], &r(3, 0)).unwrap_err();
        assert!(matches!(e, ResampleError::Length { .. }), "{e}");
        let e = resample(
            &d,
            1,
            s,
            [1 << 11, 1 << 11, 1 << 11],
            [1.0; 3],
            [1.0; 3],
            &r(3, 0),
        )
        .unwrap_err();
        assert!(matches!(e, ResampleError::TooLarge { .. }), "{e}");
        let e = resample(&d, 1, s, [0, 3, 3], [1.0; 3], [1.0; 3], &r(3, 0)).unwrap_err();
        assert!(matches!(e, ResampleError::Empty { .. }), "{e}");
        assert!(compute_new_shape(s, [1.0; 3], [f64::INFINITY; 3]).is_err());
        assert!(compute_new_shape([usize::MAX; 3], [1.0; 3], [1.0; 3]).is_err());
        // Equal shapes come back untouched (borrowed), as nnU-Net returns its input.
        assert!(matches!(
            resample(&d, 1, s, s, [1.0; 3], [9.0; 3], &r(2, 0)).unwrap(),
            Cow::Borrowed(_)
        ));
    }
}
