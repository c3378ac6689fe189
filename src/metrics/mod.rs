//! Scoring one case, and many: every number in `METRICS.md`.
//!
//! Layout:
//! - [`overlap`]: the single counting pass (TP/FP/FN/TN per class and per slice, voxel
//!   confusion matrix);
//! - [`surface`]: boundary distances (HD, HD95, ASSD, NSD) from one exact EDT per mask pair
//!   and direction ([`edt`]), on the union bounding box of the masks ([`crop`]);
//! - [`lesion`]: connected components and one-to-one lesion matching ([`hungarian`]);
//! - [`aggregate`]: per-class statistics over cases, bootstrap CIs, patient-level diagnosis.
//!
//! `summary.json` is written from a whole evaluation by the `evaluation` module (`evaluation::summary`).
//!
//! [`evaluate_case`] is the one entry point per case: it checks geometry (reorienting the
//! prediction when the grids differ only by axis permutation/flips), then computes
//! everything the [`EvalSpec`] asks for. It is CPU-bound and uses rayon inside; call it
//! from a blocking thread, never from an async task.

pub mod aggregate;
pub mod crop;
pub mod edt;
pub mod hungarian;
pub mod lesion;
pub mod overlap;
pub mod surface;
mod surfel_table;

use std::path::{Path, PathBuf};

use crate::volume::{self, GridRelation, LabelVolume, VolumeError};
pub use overlap::Counts;

/// One evaluated class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassSpec {
    /// Label value in the maps (1..=255).
    pub label: u8,
    /// Human name ("nodule").
    pub name: String,
    /// NSD tolerance in mm.
    pub nsd_tolerance_mm: f64,
    /// Whether lesion-wise detection is computed for this class.
    pub lesion: bool,
}

/// What to compute for every case of an evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalSpec {
    /// Evaluated classes, in report order.
    pub classes: Vec<ClassSpec>,
    /// Surface distances (HD, HD95, ASSD, NSD) on or off.
    pub surface: bool,
    /// Per-slice overlap numbers on or off.
    pub per_slice: bool,
    /// Class whose presence makes a patient "positive" (patient-level diagnosis).
    pub positive_class: Option<u8>,
    /// Minimum volume (mm^3) of `positive_class` for a positive call.
    pub min_positive_mm3: f64,
    /// Lesions (components) smaller than this (mm^3) are ignored in both maps.
    pub min_lesion_mm3: f64,
    /// Lesion pairs count as matched when IoU >= this; 0 = any overlap.
    pub lesion_iou_threshold: f64,
}

impl EvalSpec {
    /// A spec with default settings for these `(label, name)` classes.
    pub fn for_classes(classes: &[(u8, &str)]) -> Self {
        EvalSpec {
            classes: classes
                .iter()
                .map(|&(label, name)| ClassSpec {
                    label,
                    name: name.to_string(),
                    nsd_tolerance_mm: 1.0,
                    lesion: false,
                })
                .collect(),
            surface: true,
            per_slice: true,
            positive_class: None,
            min_positive_mm3: 0.0,
            min_lesion_mm3: 0.0,
            lesion_iou_threshold: 0.0,
        }
    }

    /// Labels of the evaluated classes, in order.
    pub fn labels(&self) -> Vec<u8> {
        self.classes.iter().map(|c| c.label).collect()
    }
}

/// Boundary metrics of one class in one case (mm, or fractions for NSD).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SurfaceMetrics {
    /// Hausdorff distance (max of both directions).
    pub hd: f64,
    /// max(P95(D_AB), P95(D_BA)), linear interpolation (MONAI).
    pub hd95: f64,
    /// P95 of both directions pooled (MedPy).
    pub hd95_pooled: f64,
    /// Pooled mean of both directions (MONAI symmetric).
    pub assd: f64,
    /// Surface Dice at the class tolerance, surfel areas (DeepMind).
    pub nsd: f64,
    /// Surface Dice at the class tolerance, edge-voxel counts (MONAI).
    pub nsd_voxel: f64,
}

/// Lesion-wise detection of one class in one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LesionMetrics {
    /// Matched pairs.
    pub tp: u32,
    /// Predicted lesions without a match.
    pub fp: u32,
    /// Reference lesions without a match.
    pub fn_: u32,
    /// TP/(TP+FP); NaN without predicted lesions.
    pub precision: f64,
    /// TP/(TP+FN); NaN without reference lesions.
    pub recall: f64,
    /// 2TP/(2TP+FP+FN) (panoptica RQ); NaN when both have none.
    pub f1: f64,
    /// Mean Dice of matched pairs; NaN without matches.
    pub mean_matched_dice: f64,
    /// One row per lesion (reference and predicted).
    pub lesions: Vec<LesionRow>,
}

/// One lesion (connected component) of a case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LesionRow {
    /// "reference" or "prediction".
    pub source: &'static str,
    /// Component index within its map (1-based, scan order).
    pub id: u32,
    /// Volume in ml.
    pub volume_ml: f64,
    /// Index of the matched component in the other map, if any.
    pub matched_with: Option<u32>,
    /// Dice with the matched component (NaN when unmatched).
    pub dice: f64,
    /// Voxel centre of mass (x, y, z), for finding it in a viewer.
    pub centroid_vox: [f64; 3],
}

/// Everything about one class in one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassMetrics {
    /// The class label.
    pub label: u8,
    /// Voxel counts.
    pub counts: Counts,
    /// Reference volume in ml.
    pub vol_ref_ml: f64,
    /// Predicted volume in ml.
    pub vol_pred_ml: f64,
    /// Boundary metrics (when the spec asks for them).
    pub surface: Option<SurfaceMetrics>,
    /// Lesion detection (lesion classes only).
    pub lesions: Option<LesionMetrics>,
}

impl ClassMetrics {
    /// (n_pred - n_ref) / n_ref; NaN without reference voxels.
    pub fn rel_vol_diff(&self) -> f64 {
        let r = self.counts.n_ref();
        if r == 0 {
            f64::NAN
        } else {
            (self.counts.n_pred() as f64 - r as f64) / r as f64
        }
    }
}

/// Per-slice counts of one class (slices with neither reference nor prediction are kept:
/// their Dice is NaN by the same rule as per case).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SliceCounts {
    /// True positives in the slice.
    pub tp: u32,
    /// False positives in the slice.
    pub fp: u32,
    /// False negatives in the slice.
    pub fn_: u32,
}

impl SliceCounts {
    /// Dice of the slice (NaN when both empty).
    pub fn dice(&self) -> f64 {
        let d = 2 * u64::from(self.tp) + u64::from(self.fp) + u64::from(self.fn_);
        if d == 0 {
            f64::NAN
        } else {
            2.0 * f64::from(self.tp) / d as f64
        }
    }
    /// IoU of the slice (NaN when both empty).
    pub fn iou(&self) -> f64 {
        let d = u64::from(self.tp) + u64::from(self.fp) + u64::from(self.fn_);
        if d == 0 {
            f64::NAN
        } else {
            f64::from(self.tp) / d as f64
        }
    }
}

/// All metrics of one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CaseMetrics {
    /// Case identifier (file name without `.nii.gz`).
    pub case: String,
    /// Reference label file.
    pub reference_file: PathBuf,
    /// Prediction label file (or where the prediction was written).
    pub prediction_file: PathBuf,
    /// One entry per [`EvalSpec::classes`], same order.
    pub classes: Vec<ClassMetrics>,
    /// `slices[class_index][z]` when per-slice metrics are on.
    pub slices: Vec<Vec<SliceCounts>>,
    /// Voxel confusion matrix over `[0] + labels` (labels not evaluated fold into 0).
    pub confusion: Vec<u64>,
    /// Voxel volume in mm^3 (for volumes and patient-level thresholds).
    pub voxel_mm3: f64,
    /// Set when the prediction was reoriented onto the reference grid.
    pub reoriented: Option<String>,
    /// Labels found in either map that are not among the task's classes (they count as
    /// background in every metric; listed so that nobody takes that for granted: a model
    /// with more output channels than the task's classes, a reference with an extra
    /// structure).
    pub unevaluated: Vec<UnevaluatedLabel>,
}

/// A label outside the task's classes, with its voxels in each map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UnevaluatedLabel {
    /// The label value.
    pub label: u8,
    /// Voxels of it in the reference.
    pub reference_voxels: u64,
    /// Voxels of it in the prediction.
    pub prediction_voxels: u64,
}

impl UnevaluatedLabel {
    /// `label 3 (prediction 120 voxels, reference 0)`.
    pub fn describe(&self) -> String {
        format!(
            "label {} (prediction {} voxels, reference {})",
            self.label, self.prediction_voxels, self.reference_voxels
        )
    }
}

/// Labels of `reference` / `prediction` outside `labels` (0 is background).
fn unevaluated_labels(reference: &[u8], prediction: &[u8], labels: &[u8]) -> Vec<UnevaluatedLabel> {
    let (r, p) = rayon::join(
        || overlap::label_histogram(reference),
        || overlap::label_histogram(prediction),
    );
    (1..=255u8)
        .filter(|l| !labels.contains(l))
        .filter(|&l| r[l as usize] + p[l as usize] > 0)
        .map(|l| UnevaluatedLabel {
            label: l,
            reference_voxels: r[l as usize],
            prediction_voxels: p[l as usize],
        })
        .collect()
}

/// Why a case could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// Reading a map failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The maps are on different grids.
    #[error("case {case}: prediction {prediction} and reference {reference} are on different grids: {detail}")]
    Geometry {
        /// Case id.
        case: String,
        /// Prediction file.
        prediction: PathBuf,
        /// Reference file.
        reference: PathBuf,
        /// What differs.
        detail: String,
    },
}

/// Score a prediction already in memory against its reference.
///
/// # Errors
/// [`CaseError::Geometry`] when the grids are neither identical nor an exact reorientation.
pub fn evaluate_case(
    case: &str,
    reference: &LabelVolume,
    reference_file: &Path,
    prediction: LabelVolume,
    prediction_file: &Path,
    spec: &EvalSpec,
) -> Result<CaseMetrics, CaseError> {
    let (prediction, reoriented) = match prediction.geom.relate(&reference.geom) {
        GridRelation::Same => (prediction, None),
        GridRelation::Reoriented { perm, flip } => {
            let note =
                format!("prediction axes {perm:?} flipped {flip:?} mapped onto the reference grid");
            (
                volume::reorient_to(&prediction, &reference.geom, perm, flip),
                Some(note),
            )
        }
        GridRelation::Incompatible(detail) => {
            return Err(CaseError::Geometry {
                case: case.to_string(),
                prediction: prediction_file.to_path_buf(),
                reference: reference_file.to_path_buf(),
                detail,
            })
        }
    };
    let labels = spec.labels();
    let tally = overlap::tally(
        &reference.data,
        &prediction.data,
        reference.slice_len(),
        &labels,
    );
    let vol = tally.volume();
    let unevaluated = unevaluated_labels(&reference.data, &prediction.data, &labels);
    let voxel_mm3 = reference.geom.voxel_mm3();
    let needs_boxes = spec.surface || spec.classes.iter().any(|c| c.lesion);
    // One scan per volume finds every label's box; surface and lesion work stays inside.
    let (ref_boxes, pred_boxes) = if needs_boxes {
        // Only slices where an evaluated class occurs in either map (the tally's
        // background-background cell is not the whole slice) can hold a box's voxels.
        // (A class 0, background, is not in the tally: then every slice is scanned.)
        let slice_len = reference.slice_len() as u32;
        let all = labels.contains(&0);
        let busy = |z: usize| all || tally.hist[z][0] != slice_len;
        rayon::join(
            || crop::label_boxes_on(reference, busy),
            || crop::label_boxes_on(&prediction, busy),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let extra: Vec<(Option<SurfaceMetrics>, Option<LesionMetrics>)> = {
        use rayon::prelude::*;
        spec.classes
            .par_iter()
            .map(|c| {
                let l = c.label as usize;
                let boxes = || (ref_boxes[l], pred_boxes[l]);
                let s = spec.surface.then(|| {
                    let (r, p) = boxes();
                    surface::compute_boxed(
                        reference,
                        &prediction,
                        c.label,
                        c.nsd_tolerance_mm,
                        r,
                        p,
                    )
                });
                let les = c.lesion.then(|| {
                    let (r, p) = boxes();
                    lesion::compute_boxed(
                        reference,
                        &prediction,
                        c.label,
                        spec.min_lesion_mm3,
                        spec.lesion_iou_threshold,
                        r,
                        p,
                    )
                });
                (s, les)
            })
            .collect()
    };
    let classes = spec
        .classes
        .iter()
        .enumerate()
        .zip(extra)
        .map(|((i, c), (surface, lesions))| {
            let counts = overlap::counts_of(&vol, tally.k, i + 1);
            ClassMetrics {
                label: c.label,
                vol_ref_ml: counts.n_ref() as f64 * voxel_mm3 / 1000.0,
                vol_pred_ml: counts.n_pred() as f64 * voxel_mm3 / 1000.0,
                counts,
                surface,
                lesions,
            }
        })
        .collect();
    let slices = if spec.per_slice {
        (0..labels.len())
            .map(|i| {
                tally
                    .hist
                    .iter()
                    .map(|h| {
                        let c = overlap::counts_of(h, tally.k, i + 1);
                        SliceCounts {
                            tp: c.tp as u32,
                            fp: c.fp as u32,
                            fn_: c.fn_ as u32,
                        }
                    })
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(CaseMetrics {
        case: case.to_string(),
        reference_file: reference_file.to_path_buf(),
        prediction_file: prediction_file.to_path_buf(),
        classes,
        slices,
        confusion: vol,
        voxel_mm3,
        reoriented,
        unevaluated,
    })
}

/// Read both label files (in parallel) and score them. The headers are read first: grids
/// with different voxel counts are refused without decoding, and neither read may allocate
/// more than the reference's header declares.
///
/// # Errors
/// [`CaseError`] naming the file or the grid difference.
pub fn evaluate_files(
    case: &str,
    reference_file: &Path,
    prediction_file: &Path,
    spec: &EvalSpec,
) -> Result<CaseMetrics, CaseError> {
    // Headers first: grids with different voxel counts can never match (a reorientation
    // keeps the count), so they are reported from the headers without decoding anything,
    // and the prediction is then read with at most the reference's voxel count.
    let reference_geom = volume::read_geometry(reference_file)?;
    if let Ok(g) = volume::read_geometry(prediction_file) {
        if g.len() != reference_geom.len() {
            if let GridRelation::Incompatible(detail) = g.relate(&reference_geom) {
                return Err(CaseError::Geometry {
                    case: case.to_string(),
                    prediction: prediction_file.to_path_buf(),
                    reference: reference_file.to_path_buf(),
                    detail,
                });
            }
        }
    }
    let max_voxels = (reference_geom.len() as u64).min(volume::DEFAULT_MAX_LABEL_VOXELS);
    let limits = volume::ReadLimits {
        max_voxels,
        max_voxels_why: Some(
            "the reference's grid has that many, and a prediction with more voxels cannot \
             match it: resample the prediction onto the reference grid",
        ),
        ..volume::ReadLimits::default()
    };
    let (r, p) = rayon::join(
        || {
            volume::read_labels_with(
                reference_file,
                volume::ReadLimits {
                    max_voxels,
                    ..volume::ReadLimits::default()
                },
            )
        },
        || volume::read_labels_with(prediction_file, limits),
    );
    evaluate_case(case, &r?, reference_file, p?, prediction_file, spec)
}
