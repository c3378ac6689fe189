//! `volume3d` inference with the TorchScript runtime: the tiles and weights of
//! [`super::tiling`] run through the module and accumulated on the device. Outputs are
//! blended as `sum(w * y) / sum(w)`; since `sum(w) > 0` everywhere, the division does not
//! change the argmax and is skipped. `labels` outputs are blended as one-hot votes.

use tch::{Device, Kind, Tensor};

use super::tiling;
use super::torchscript::{torch, TorchScript};
use super::{halve_on_oom, InferError, OutputKind, PredictStats};
use crate::volume::ImageVolume;

/// Predict a whole volume with sliding windows; returns labels in NIfTI order.
pub(crate) fn predict_3d(
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
