//! Lesion-wise detection. (Filled in by the lesion-metrics work, issue 3.)

use super::LesionMetrics;
use crate::volume::LabelVolume;

/// Lesion detection of `label` in `reference` vs `prediction` (same grid).
pub fn compute(
    _reference: &LabelVolume,
    _prediction: &LabelVolume,
    _label: u8,
    _min_lesion_mm3: f64,
    _iou_threshold: f64,
) -> LesionMetrics {
    LesionMetrics {
        tp: 0,
        fp: 0,
        fn_: 0,
        precision: f64::NAN,
        recall: f64::NAN,
        f1: f64::NAN,
        mean_matched_dice: f64::NAN,
        lesions: Vec::new(),
    }
}
