//! `volume3d` inference: sliding windows over the volume with overlap and Gaussian
//! importance blending, as MONAI's `sliding_window_inference(mode="gaussian")` and
//! nnU-Net's predictor do.
//!
//! Windows start at `0, s, 2s, ...` with `s = max(1, floor(patch * (1 - overlap)))` and the
//! last one is moved back to end exactly at the border (MONAI's `_get_scan_interval` and
//! `dense_patch_slices`). A volume smaller than the patch is padded with 0 (the bottom of
//! the window) and cropped back. The importance map is a separable Gaussian with
//! `sigma = patch / 8` (both peers' default), normalised to a maximum of 1 and floored at
//! its smallest positive value so that borders still count. Outputs are blended as
//! `sum(w * y) / sum(w)`; since `sum(w) > 0` everywhere, the division does not change the
//! argmax and is skipped. `labels` outputs are blended as one-hot votes.

use tch::{Device, Kind, Tensor};

use super::{halving_on_oom, torch, InferError, Model, OutputKind, PredictStats};
use crate::volume::ImageVolume;

/// Window start positions along one axis of length `size` (>= `patch`).
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

fn gaussian(patch: [usize; 3]) -> Vec<f32> {
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

/// Predict a whole volume with sliding windows; returns labels in NIfTI order.
pub(crate) fn predict_3d(
    model: &Model,
    image: &ImageVolume,
    stats: &mut PredictStats,
) -> Result<Vec<u8>, InferError> {
    let spec = model.spec();
    let [nx, ny, nz] = image.geom.dims;
    let size = [nz, ny, nx];
    let patch = spec.patch_size;
    // Padded size: at least one patch along every axis.
    let padded = [
        size[0].max(patch[0]),
        size[1].max(patch[1]),
        size[2].max(patch[2]),
    ];
    let mut vol = vec![0f32; padded.iter().product()];
    for z in 0..nz {
        for y in 0..ny {
            let src = &image.data[(z * ny + y) * nx..(z * ny + y + 1) * nx];
            let o = (z * padded[1] + y) * padded[2];
            for (d, &v) in vol[o..o + nx].iter_mut().zip(src) {
                *d = spec.window.apply(v);
            }
        }
    }
    let p = |a: [usize; 3]| [a[0] as i64, a[1] as i64, a[2] as i64];
    let full = Tensor::f_from_slice(&vol)
        .and_then(|t| t.f_view(p(padded)))
        .map_err(torch)?;
    drop(vol);
    let dev = model.device();
    let w = Tensor::f_from_slice(&gaussian(patch))
        .and_then(|t| t.f_view(p(patch)))
        .and_then(|t| t.f_to_device(dev))
        .map_err(torch)?;
    let mut windows = Vec::new();
    for &a in &starts(padded[0], patch[0], spec.overlap) {
        for &b in &starts(padded[1], patch[1], spec.overlap) {
            for &c in &starts(padded[2], patch[2], spec.overlap) {
                windows.push([a, b, c]);
            }
        }
    }
    let mut acc: Option<Tensor> = None;
    let mut batch = spec.batch_size.max(1);
    let mut i = 0;
    while i < windows.len() {
        let (n, y) = halving_on_oom(&mut batch, windows.len() - i, "3D batch", |n| {
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
            model
                .forward(&x, stats)
                .map_err(|e| model.classify(e, &shape, n))
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_cover_the_axis_and_end_at_the_border() {
        assert_eq!(starts(100, 64, 0.5), vec![0, 32, 36]);
        assert_eq!(starts(64, 64, 0.5), vec![0]);
        assert_eq!(starts(10, 64, 0.5), vec![0]);
        assert_eq!(starts(130, 64, 0.0), vec![0, 64, 66]);
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
