//! Runtime-neutral parts of inference: the HU window into model input, and the 3D sliding
//! window's tiles and importance map. No tensor library here, so every runtime tiles,
//! windows and weighs the same way (a runtime whose format defines its own, such as
//! nnU-Net's plans, brings its own).
//!
//! Tiles start at `0, s, 2s, ...` with `s = max(1, floor(patch * (1 - overlap)))` and the
//! last one is moved back to end exactly at the border (MONAI's `_get_scan_interval` and
//! `dense_patch_slices`). A volume smaller than the patch is padded with 0 at the end of
//! each axis (the bottom of the window; MONAI pads both ends) and cropped back. The
//! importance map is a separable Gaussian with `sigma = patch / 8` (MONAI's and nnU-Net's
//! default), normalised to a maximum of 1 and floored at its smallest positive value
//! (nnU-Net's rule; MONAI floors at 1e-3 instead, which changes labels only where the
//! corner weights decide), so that borders still count.

use super::Window;
use crate::volume::ImageVolume;

/// Tile start positions along one axis of length `size` (>= `patch`).
pub fn starts(size: usize, patch: usize, overlap: f64) -> Vec<usize> {
    if size <= patch {
        return vec![0];
    }
    let step = ((patch as f64 * (1.0 - overlap)).floor() as usize).max(1);
    let mut out: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|&s| s + patch < size)
        .collect();
    out.push(size - patch);
    out.dedup();
    out
}

/// The volume's `[D, H, W]` padded to at least one patch along every axis.
pub fn padded(size: [usize; 3], patch: [usize; 3]) -> [usize; 3] {
    [
        size[0].max(patch[0]),
        size[1].max(patch[1]),
        size[2].max(patch[2]),
    ]
}

/// Every tile's `[d, h, w]` start over a `padded` volume, in C order.
pub fn tiles(padded: [usize; 3], patch: [usize; 3], overlap: f64) -> Vec<[usize; 3]> {
    let mut out = Vec::new();
    for &a in &starts(padded[0], patch[0], overlap) {
        for &b in &starts(padded[1], patch[1], overlap) {
            for &c in &starts(padded[2], patch[2], overlap) {
                out.push([a, b, c]);
            }
        }
    }
    out
}

/// The Gaussian importance map of a `[D, H, W]` patch, C order.
pub fn gaussian(patch: [usize; 3]) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let sigma = n as f64 / 8.0;
        let c = (n as f64 - 1.0) / 2.0;
        (0..n)
            .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
            .collect()
    };
    let (a, b, c) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut w = Vec::with_capacity(patch.iter().product());
    for &x in &a {
        for &y in &b {
            for &z in &c {
                w.push(x * y * z);
            }
        }
    }
    let max = w.iter().copied().fold(0.0, f64::max);
    let min_pos = w
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    w.iter().map(|&v| (v.max(min_pos) / max) as f32).collect()
}

/// The windowed image as a C-order `[D, H, W]` buffer of size `padded` (zeros beyond the
/// image, at the end of each axis).
pub fn windowed_padded(image: &ImageVolume, window: Window, padded: [usize; 3]) -> Vec<f32> {
    let [nx, ny, nz] = image.geom.dims;
    let mut vol = vec![0f32; padded.iter().product()];
    for z in 0..nz {
        for y in 0..ny {
            let src = &image.data[(z * ny + y) * nx..(z * ny + y + 1) * nx];
            let o = (z * padded[1] + y) * padded[2];
            for (d, &v) in vol[o..o + nx].iter_mut().zip(src) {
                *d = window.apply(v);
            }
        }
    }
    vol
}

/// `b` windowed axial slices from slice `z0` as a C-order `[b, ph, pw]` buffer, each
/// slice at the top left of its `ph x pw` frame (zeros to the right and below: the pad
/// to a multiple the model's pooling needs).
pub fn windowed_slices(
    image: &ImageVolume,
    window: Window,
    z0: usize,
    b: usize,
    ph: usize,
    pw: usize,
) -> Vec<f32> {
    let [nx, ny, _] = image.geom.dims;
    let sl = nx * ny;
    let mut buf = vec![0f32; b * ph * pw];
    for i in 0..b {
        let src = &image.data[(z0 + i) * sl..(z0 + i + 1) * sl];
        for y in 0..ny {
            let row = &src[y * nx..(y + 1) * nx];
            let dst = &mut buf[(i * ph + y) * pw..(i * ph + y) * pw + nx];
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = window.apply(v);
            }
        }
    }
    buf
}

/// Copy `b` padded `[ph, pw]` label slices (the model's output for slices `z0..z0 + b`)
/// into `out`, the `[nz, ny, nx]` label volume, dropping the padding right and below.
pub fn unpad_slices(
    labels: &[u8],
    b: usize,
    [ph, pw]: [usize; 2],
    [ny, nx]: [usize; 2],
    z0: usize,
    out: &mut [u8],
) {
    let sl = ny * nx;
    for i in 0..b {
        for y in 0..ny {
            let s = &labels[(i * ph + y) * pw..(i * ph + y) * pw + nx];
            let o = (z0 + i) * sl + y * nx;
            out[o..o + nx].copy_from_slice(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_cover_the_axis_and_end_at_the_border() {
        assert_eq!(starts(100, 64, 0.5), vec![0, 32, 36]);
        assert_eq!(starts(64, 64, 0.5), vec![0]);
        assert_eq!(starts(10, 64, 0.5), vec![0]);
        assert_eq!(starts(130, 64, 0.0), vec![0, 64, 66]);
        assert_eq!(tiles([10, 100, 64], [10, 64, 64], 0.5).len(), 3);
    }

    #[test]
    fn gaussian_peaks_in_the_middle_and_stays_positive() {
        let g = gaussian([4, 6, 8]);
        let max = g.iter().copied().fold(0.0, f32::max);
        assert!((max - 1.0).abs() < 1e-6);
        assert!(g.iter().all(|&v| v > 0.0));
        assert!(g[0] < g[(6 + 2) * 8 + 3]);
    }
}
