//! nnU-Net's export of a prediction (`inference/export_prediction.py`
//! `convert_predicted_logits_to_segmentation_with_correct_shape`, L14-71, nnunetv2 2.8.1):
//! the network's float16 logits resampled back to the cropped input grid (order 1, kept
//! float16), turned into labels (argmax, or region-based sigmoids painted in
//! `regions_class_order`), pasted into the bounding box of a zero image, and transposed
//! back to the input's axis order. Owns the label decision rules.

use half::f16;
use rayon::prelude::*;

use super::plans::{Labels, ModelFolder};
use super::preprocess::{gather, CaseProps};
use super::resample::{self, ResampleError};

/// Why logits cannot be turned into labels.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The logits do not have the model's channels on the preprocessed grid.
    #[error("{len} logits given for {channels} channel(s) of shape {shape:?}")]
    Length {
        /// Values given.
        len: usize,
        /// The model's output channels.
        channels: usize,
        /// The preprocessed grid.
        shape: [usize; 3],
    },
    /// The case properties do not describe a box inside an image evald can hold.
    #[error("case properties inconsistent: bbox {bbox:?} of a {shape_before_cropping:?} image with cropped shape {shape_after_cropping:?} (or the image exceeds evald's label-map limit)")]
    Props {
        /// `bbox_used_for_cropping`.
        bbox: [[usize; 2]; 3],
        /// `shape_before_cropping`.
        shape_before_cropping: [usize; 3],
        /// `shape_after_cropping_and_before_resampling`.
        shape_after_cropping: [usize; 3],
    },
    /// Labels that do not fit nnU-Net's uint8 output.
    #[error("{0}")]
    Labels(String),
    /// Resampling the logits back failed.
    #[error(
        "resampling the logits from spacing {from:?} to {to:?} (network axis order): {source}"
    )]
    Resample {
        /// The configuration's spacing.
        from: [f64; 3],
        /// The image's spacing.
        to: [f64; 3],
        /// The cause.
        source: Box<ResampleError>,
    },
}

/// The label map nnU-Net writes for `logits` (`[K, z', y', x']` C order on the
/// preprocessed grid `shape`, K = the model's output channels), on the input image's grid:
/// C-order `[z, y, x]` of the image as read (an `ImageVolume`'s own layout).
///
/// # Errors
/// [`ExportError`] for logits of the wrong size, properties that do not fit together, more
/// classes than uint8 holds, or a resampling that cannot be done.
pub fn labels(
    logits: &[f16],
    shape: [usize; 3],
    props: &CaseProps,
    folder: &ModelFolder,
) -> Result<Vec<u8>, ExportError> {
    let k = folder.labels.channels();
    let n_pre = shape[0]
        .checked_mul(shape[1])
        .and_then(|n| n.checked_mul(shape[2]));
    if k == 0 || n_pre.and_then(|n| n.checked_mul(k)) != Some(logits.len()) {
        return Err(ExportError::Length {
            len: logits.len(),
            channels: k,
            shape,
        });
    }
    let sb = props.shape_before_cropping;
    let sc = props.shape_after_cropping;
    let n_full = sb[0].checked_mul(sb[1]).and_then(|n| n.checked_mul(sb[2]));
    if n_full.is_none_or(|n| n as u64 > crate::volume::DEFAULT_MAX_LABEL_VOXELS)
        || (0..3).any(|a| {
            let [lo, hi] = props.bbox[a];
            lo > hi || hi > sb[a] || hi - lo != sc[a]
        })
    {
        return Err(ExportError::Props {
            bbox: props.bbox,
            shape_before_cropping: sb,
            shape_after_cropping: sc,
        });
    }
    if let Labels::Classes { num_classes } = folder.labels {
        // export_prediction.py L47-48: uint8 only while there are < 255 foreground labels.
        if num_classes > 255 {
            return Err(ExportError::Labels(format!(
                "{num_classes} classes: nnU-Net writes more than 254 foreground labels as uint16, which evald's label maps (uint8) cannot hold"
            )));
        }
    }

    // L25-33: from the configuration's spacing (2D: the image's first axis kept) to the
    // image's, both transposed.
    let cfg = &folder.configuration.spacing;
    let current: [f64; 3] = match cfg[..] {
        [a, b, c] => [a, b, c],
        [b, c] => [props.spacing[0], b, c],
        _ => {
            return Err(ExportError::Labels(format!(
                "configuration spacing {cfg:?} has neither 2 nor 3 entries"
            )))
        }
    };
    let probs = resample::resample(
        logits,
        k,
        shape,
        sc,
        current,
        props.spacing,
        &folder.configuration.resampling_probabilities,
    )
    .map_err(|source| ExportError::Resample {
        from: current,
        to: props.spacing,
        source: Box::new(source),
    })?;

    let n = sc[0] * sc[1] * sc[2];
    let mut seg = vec![0u8; n];
    const CHUNK: usize = 4096;
    match &folder.labels {
        Labels::Classes { .. } => {
            seg.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let v0 = c * CHUNK;
                let chans: Vec<&[f16]> = (0..k)
                    .map(|ch| &probs[ch * n + v0..ch * n + v0 + out.len()])
                    .collect();
                argmax_into(&chans, out);
            });
        }
        Labels::Regions { class_order } => {
            seg.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                for (i, s) in out.iter_mut().enumerate() {
                    let v = c * CHUNK + i;
                    // label_handling.py L170-171: later regions overwrite earlier ones.
                    for (ch, &label) in class_order.iter().enumerate() {
                        if sigmoid_above_half(probs[ch * n + v]) {
                            *s = label;
                        }
                    }
                }
            });
        }
    }

    // insert_crop_into_image into zeros of shape_before_cropping (L44-50).
    let mut full = vec![0u8; sb[0] * sb[1] * sb[2]];
    let [b0, b1, b2] = props.bbox.map(|b| b[0]);
    if n > 0 {
        for (i0, plane) in seg.chunks(sc[1] * sc[2]).enumerate() {
            for (i1, row) in plane.chunks(sc[2]).enumerate() {
                let o = ((b0 + i0) * sb[1] + b1 + i1) * sb[2] + b2;
                full[o..o + sc[2]].copy_from_slice(row);
            }
        }
    }
    // transpose(transpose_backward) (L56-57).
    let tb = folder.transpose_backward;
    Ok(gather(&full, sb, [0; 3], tb, tb.map(|a| sb[a])))
}

/// numpy's argmax over channels (`arraytypes.c.src` `HALF_argmax`: `if !(v <= max)` take
/// it): the first maximum wins; a NaN is maximal (the first one). `chans[k][i]` is channel
/// `k` at voxel `i`; compared as integers ordered like the values (both zeros equal).
fn argmax_into(chans: &[&[f16]], out: &mut [u8]) {
    // A NaN is maximal and ends numpy's search: its key exceeds every value's, and an
    // equal key never replaces the maximum, so the first NaN stays.
    const NAN_KEY: i32 = i32::MAX;
    let key = |h: f16| -> i32 {
        let b = h.to_bits();
        let mag = i32::from(b & 0x7fff);
        if mag > 0x7c00 {
            NAN_KEY
        } else if b & 0x8000 != 0 {
            -mag
        } else {
            mag
        }
    };
    let Some((first, rest)) = chans.split_first() else {
        return;
    };
    // Channel by channel over all voxels (the loops vectorise), the running maximum kept.
    let mut m: Vec<i32> = first.iter().map(|&h| key(h)).collect();
    out.fill(0);
    for (ch, c) in rest.iter().enumerate() {
        // At most 255 channels (checked by the caller).
        let label = (ch + 1) as u8;
        for ((o, mi), &h) in out.iter_mut().zip(m.iter_mut()).zip(c.iter()) {
            let k = key(h);
            if k > *mi {
                *mi = k;
                *o = label;
            }
        }
    }
}

/// `torch.sigmoid(logits.float()) > 0.5` (label_handling.py L130-141 and L170-171). In
/// float32, `1 / (1 + exp(-x))` exceeds 0.5 exactly for the positive float16 values (+inf
/// included) except the smallest subnormal, 2^-24: `exp(-2^-24)` rounds to `1 - 2^-24`,
/// `1 + that` ties to even at 2, and the quotient is exactly 0.5. So the decision is a
/// range of bit patterns, checked against torch for all 65536 of them in the tests (and
/// free of a float32 `exp` per voxel and region).
fn sigmoid_above_half(x: f16) -> bool {
    (0x0002..=0x7c00).contains(&x.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_nan_as_largest() {
        let am = |v: &[f32]| {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let chans: Vec<&[f16]> = h.chunks(1).collect();
            let mut o = [9u8];
            argmax_into(&chans, &mut o);
            o[0]
        };
        assert_eq!(am(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(am(&[0.0, -0.0]), 0);
        assert_eq!(am(&[-1.0, -0.5, f32::NEG_INFINITY]), 1);
        assert_eq!(am(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(am(&[f32::NAN, 5.0, f32::INFINITY]), 0);
        assert_eq!(am(&[f32::INFINITY, f32::NAN]), 1);
    }
}

#[cfg(test)]
mod parity {
    use super::*;
    use crate::infer::nnunet::npy;
    use crate::infer::nnunet::preprocess::fixtures::{case_folder, cases, dir, props, tiny};
    use crate::infer::nnunet::preprocess::preprocess;
    use crate::volume::{read_image, read_labels};

    fn logits(path: &std::path::Path) -> (Vec<f16>, [usize; 3]) {
        let a = npy::read(path).unwrap();
        let shape = [a.shape[1], a.shape[2], a.shape[3]];
        (
            a.to_f16_bits().into_iter().map(f16::from_bits).collect(),
            shape,
        )
    }

    fn assert_same_labels(ours: &[u8], theirs: &[u8], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        let diff = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{what}: {diff} of {} voxels differ", ours.len());
    }

    #[test]
    fn sigmoid_threshold_matches_torch_for_every_float16() {
        let t = npy::read(&dir().join("tables/sigmoid_gt_half_u8.npy.gz")).unwrap();
        assert_eq!(t.bytes.len(), 65536);
        for (b, &want) in t.bytes.iter().enumerate() {
            let x = f16::from_bits(b as u16);
            assert_eq!(u8::from(sigmoid_above_half(x)), want, "{x} ({b:#06x})");
        }
    }

    #[test]
    fn tinyct_labels_are_nnunets_bit_for_bit() {
        let m = tiny();
        let d = dir().join("tinyct");
        for case in ["TinyCT_006", "TinyCT_007"] {
            let img = read_image(&d.join(format!("imagesTs/{case}_0000.nii.gz"))).unwrap();
            let pre = preprocess(&img, &m).unwrap();
            for run in ["fold0", "folds01"] {
                let r = d.join("reference").join(run);
                let pj = r.join(format!("intermediates/{case}_properties.json"));
                assert_eq!(pre.props, props(&pj, m.transpose_forward));
                let (lg, shape) =
                    logits(&r.join(format!("intermediates/{case}_logits_f16.npy.gz")));
                assert_eq!(shape, pre.shape);
                let ours = labels(&lg, shape, &pre.props, &m).unwrap();
                let theirs = read_labels(&r.join(format!("{case}.nii.gz"))).unwrap();
                assert_eq!(theirs.geom.dims, img.geom.dims);
                assert_same_labels(&ours, &theirs.data, &format!("{run}/{case}"));
            }
        }
    }

    #[test]
    fn generated_cases_export_as_nnunet_does() {
        for name in cases() {
            let (_t, m) = case_folder(&name);
            let d = dir().join("cases").join(&name);
            let p = props(&d.join("properties.json"), m.transpose_forward);
            let (lg, shape) = logits(&d.join("logits_f16.npy.gz"));
            let ours = labels(&lg, shape, &p, &m).unwrap();
            let want = npy::read(&d.join("seg_u8.npy.gz")).unwrap();
            let img = read_image(&d.join("image.nii.gz")).unwrap();
            let [nx, ny, nz] = img.geom.dims;
            assert_eq!(want.shape, [nz, ny, nx], "{name}");
            assert_same_labels(&ours, &want.bytes, &name);
        }
    }

    #[test]
    fn inconsistent_inputs_are_refused() {
        let m = tiny();
        let p = CaseProps {
            spacing: [2.5, 0.8, 0.8],
            shape_before_cropping: [4, 4, 4],
            bbox: [[0, 4]; 3],
            shape_after_cropping: [4, 4, 4],
        };
        let lg = vec![f16::ZERO; 3 * 64];
        assert!(labels(&lg, [4, 4, 4], &p, &m).is_ok());
        assert!(matches!(
            labels(&lg[1..], [4, 4, 4], &p, &m),
            Err(ExportError::Length { .. })
        ));
        let bad = CaseProps {
            bbox: [[1, 6], [0, 4], [0, 4]],
            shape_after_cropping: [5, 4, 4],
            ..p.clone()
        };
        assert!(matches!(
            labels(&lg, [4, 4, 4], &bad, &m),
            Err(ExportError::Props { .. })
        ));
        let zero = CaseProps {
            spacing: [0.0, 0.8, 0.8],
            ..p
        };
        // (Only when there is something to resample: equal shapes skip it, as in nnU-Net.)
        assert!(matches!(
            labels(&lg[..3 * 32], [2, 4, 4], &zero, &m),
            Err(ExportError::Resample { .. })
        ));
    }
}
