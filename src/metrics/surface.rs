//! Boundary distances between two masks. (Filled in by the surface-metrics work, issue 3.)

use super::SurfaceMetrics;
use crate::volume::LabelVolume;

/// Boundary metrics of `label` in `reference` vs `prediction` (same grid).
pub fn compute(
    _reference: &LabelVolume,
    _prediction: &LabelVolume,
    _label: u8,
    _tolerance_mm: f64,
) -> SurfaceMetrics {
    SurfaceMetrics {
        hd: f64::NAN,
        hd95: f64::NAN,
        hd95_pooled: f64::NAN,
        assd: f64::NAN,
        nsd: f64::NAN,
        nsd_voxel: f64::NAN,
    }
}
