//! Statistics over cases: per class and metric (mean, std, median, quartiles, range, NaN
//! count, percentile-bootstrap 95% CI of the mean), `foreground_mean` as nnU-Net, the
//! summed voxel confusion matrix, per-slice tallies and the patient-level diagnosis.
//!
//! NaN values (undefined, e.g. Dice of two empty masks) are counted and excluded, never
//! averaged in; the bootstrap uses a fixed seed, so the same input gives the same report.

use std::collections::BTreeMap;

use super::{CaseMetrics, ClassMetrics, EvalSpec};

/// A per-class metric: the one name for it in every output (its `summary.json` key, the
/// report's column, the email's table), in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// 2TP / (2TP + FP + FN).
    Dice,
    /// TP / (TP + FP + FN).
    IoU,
    /// True-positive voxels.
    TP,
    /// False-positive voxels.
    FP,
    /// False-negative voxels.
    FN,
    /// True-negative voxels.
    TN,
    /// Predicted voxels of the class.
    NPred,
    /// Reference voxels of the class.
    NRef,
    /// TP / (TP + FN).
    Sensitivity,
    /// TN / (TN + FP).
    Specificity,
    /// TP / (TP + FP).
    Precision,
    /// Reference volume, ml.
    VolRefMl,
    /// Predicted volume, ml.
    VolPredMl,
    /// (pred - ref) / ref volume.
    RelVolDiff,
    /// Hausdorff distance, mm.
    Hd,
    /// 95th-percentile Hausdorff distance (MONAI), mm.
    Hd95,
    /// 95th-percentile Hausdorff distance, both directions pooled (MedPy), mm.
    Hd95Pooled,
    /// Average symmetric surface distance, mm.
    Assd,
    /// Normalised surface Dice (DeepMind surfels).
    Nsd,
    /// Normalised surface Dice on edge voxels (MONAI).
    NsdVoxel,
    /// Matched lesions.
    LesionTP,
    /// Predicted lesions without a match.
    LesionFP,
    /// Reference lesions without a match.
    LesionFN,
    /// Lesion-wise F1.
    LesionF1,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 24] = [
        Metric::Dice,
        Metric::IoU,
        Metric::TP,
        Metric::FP,
        Metric::FN,
        Metric::TN,
        Metric::NPred,
        Metric::NRef,
        Metric::Sensitivity,
        Metric::Specificity,
        Metric::Precision,
        Metric::VolRefMl,
        Metric::VolPredMl,
        Metric::RelVolDiff,
        Metric::Hd,
        Metric::Hd95,
        Metric::Hd95Pooled,
        Metric::Assd,
        Metric::Nsd,
        Metric::NsdVoxel,
        Metric::LesionTP,
        Metric::LesionFP,
        Metric::LesionFN,
        Metric::LesionF1,
    ];

    /// Its key in `summary.json` (nnU-Net's names where nnU-Net has the metric).
    pub fn key(self) -> &'static str {
        match self {
            Metric::Dice => "Dice",
            Metric::IoU => "IoU",
            Metric::TP => "TP",
            Metric::FP => "FP",
            Metric::FN => "FN",
            Metric::TN => "TN",
            Metric::NPred => "n_pred",
            Metric::NRef => "n_ref",
            Metric::Sensitivity => "Sensitivity",
            Metric::Specificity => "Specificity",
            Metric::Precision => "Precision",
            Metric::VolRefMl => "VolRef_ml",
            Metric::VolPredMl => "VolPred_ml",
            Metric::RelVolDiff => "RelVolDiff",
            Metric::Hd => "HD",
            Metric::Hd95 => "HD95",
            Metric::Hd95Pooled => "HD95_pooled",
            Metric::Assd => "ASSD",
            Metric::Nsd => "NSD",
            Metric::NsdVoxel => "NSD_voxel",
            Metric::LesionTP => "LesionTP",
            Metric::LesionFP => "LesionFP",
            Metric::LesionFN => "LesionFN",
            Metric::LesionF1 => "LesionF1",
        }
    }

    /// The metric of a `summary.json` key.
    pub fn parse(key: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.key() == key)
    }

    /// A distance in mm (lower is better).
    pub fn is_distance(self) -> bool {
        matches!(
            self,
            Metric::Hd | Metric::Hd95 | Metric::Hd95Pooled | Metric::Assd
        )
    }

    /// A fraction in [0, 1] where higher is better (overlap and surface agreement).
    pub fn is_score(self) -> bool {
        matches!(
            self,
            Metric::Dice | Metric::IoU | Metric::Nsd | Metric::NsdVoxel
        )
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

impl serde::Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

impl<'de> serde::Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Metric::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown metric '{s}'")))
    }
}

/// The value of `metric` for a class; `None` when it was not computed (surface off, not
/// a lesion class), NaN when it is undefined.
pub fn class_value(m: &ClassMetrics, metric: Metric) -> Option<f64> {
    let c = &m.counts;
    let s = m.surface.as_ref();
    let l = m.lesions.as_ref();
    Some(match metric {
        Metric::Dice => c.dice(),
        Metric::IoU => c.iou(),
        Metric::TP => c.tp as f64,
        Metric::FP => c.fp as f64,
        Metric::FN => c.fn_ as f64,
        Metric::TN => c.tn as f64,
        Metric::NPred => c.n_pred() as f64,
        Metric::NRef => c.n_ref() as f64,
        Metric::Sensitivity => c.sensitivity(),
        Metric::Specificity => c.specificity(),
        Metric::Precision => c.precision(),
        Metric::VolRefMl => m.vol_ref_ml,
        Metric::VolPredMl => m.vol_pred_ml,
        Metric::RelVolDiff => m.rel_vol_diff(),
        Metric::Hd => s?.hd,
        Metric::Hd95 => s?.hd95,
        Metric::Hd95Pooled => s?.hd95_pooled,
        Metric::Assd => s?.assd,
        Metric::Nsd => s?.nsd,
        Metric::NsdVoxel => s?.nsd_voxel,
        Metric::LesionTP => f64::from(l?.tp),
        Metric::LesionFP => f64::from(l?.fp),
        Metric::LesionFN => f64::from(l?.fn_),
        Metric::LesionF1 => l?.f1,
    })
}

/// Descriptive statistics of one metric over cases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Cases with a value (defined or NaN).
    pub n: usize,
    /// Of those, undefined (excluded from everything below).
    pub n_nan: usize,
    /// Mean of the defined values.
    pub mean: f64,
    /// Sample standard deviation (n - 1); NaN with fewer than two values.
    pub std: f64,
    /// Median (linear interpolation, as numpy).
    pub median: f64,
    /// 25th percentile.
    pub p25: f64,
    /// 75th percentile.
    pub p75: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// 95% percentile-bootstrap CI of the mean, lower end.
    pub ci95_low: f64,
    /// Upper end.
    pub ci95_high: f64,
}

/// Bootstrap resamples for the CI of the mean.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Fixed seed: same input, same CI.
pub const BOOTSTRAP_SEED: u64 = 0x5EED_E7A1_D000_0001;

/// Percentile with linear interpolation between closest ranks (numpy's default) of a
/// sorted, non-empty slice.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// SplitMix64: tiny, deterministic, good enough for resampling indices.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Mean of the defined (non-NaN) values; NaN when none is defined.
pub fn mean_defined(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Statistics of `values` (NaN = undefined).
pub fn stats(values: &[f64]) -> Stats {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = values.len();
    let n_nan = n - v.len();
    v.sort_by(f64::total_cmp);
    let m = v.len();
    let nan = f64::NAN;
    if m == 0 {
        return Stats {
            n,
            n_nan,
            mean: nan,
            std: nan,
            median: nan,
            p25: nan,
            p75: nan,
            min: nan,
            max: nan,
            ci95_low: nan,
            ci95_high: nan,
        };
    }
    let mean = v.iter().sum::<f64>() / m as f64;
    let std = if m > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1) as f64).sqrt()
    } else {
        nan
    };
    let (ci95_low, ci95_high) = if m > 1 {
        let mut rng = SplitMix(BOOTSTRAP_SEED);
        let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
            .map(|_| (0..m).map(|_| v[rng.below(m)]).sum::<f64>() / m as f64)
            .collect();
        means.sort_by(f64::total_cmp);
        (
            percentile_sorted(&means, 2.5),
            percentile_sorted(&means, 97.5),
        )
    } else {
        (mean, mean)
    };
    Stats {
        n,
        n_nan,
        mean,
        std,
        median: percentile_sorted(&v, 50.0),
        p25: percentile_sorted(&v, 25.0),
        p75: percentile_sorted(&v, 75.0),
        min: v[0],
        max: v[m - 1],
        ci95_low,
        ci95_high,
    }
}

/// Per-slice tallies of one class over all cases.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SliceTally {
    /// Slices scored.
    pub slices: u64,
    /// Slices where the reference has the class.
    pub with_reference: u64,
    /// Slices where the prediction has the class.
    pub with_prediction: u64,
    /// Slices with prediction but no reference (false-positive-only).
    pub fp_only: u64,
    /// Slices with reference but no prediction (missed).
    pub fn_only: u64,
}

/// Patient-level diagnosis over cases (2x2 confusion and derived rates).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PatientLevel {
    /// The class whose presence makes a patient positive.
    pub positive_class: u8,
    /// Minimum volume (mm^3) for a positive call.
    pub min_positive_mm3: f64,
    /// Reference positive, predicted positive.
    pub tp: u32,
    /// Reference negative, predicted positive.
    pub fp: u32,
    /// Reference positive, predicted negative.
    pub fn_: u32,
    /// Reference negative, predicted negative.
    pub tn: u32,
    /// TP/(TP+FN).
    pub sensitivity: f64,
    /// TN/(TN+FP).
    pub specificity: f64,
    /// TP/(TP+FP).
    pub ppv: f64,
    /// TN/(TN+FN).
    pub npv: f64,
    /// (TP+TN)/all.
    pub accuracy: f64,
    /// Per case: (case, reference positive, predicted positive).
    pub calls: Vec<(String, bool, bool)>,
}

/// Aggregated results of an evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Per class label: metric key -> statistics (keys that were computed).
    pub per_class: BTreeMap<u8, BTreeMap<Metric, Stats>>,
    /// nnU-Net `foreground_mean`: plain mean over classes of the per-class means.
    pub foreground_mean: BTreeMap<Metric, f64>,
    /// Statistics over cases of each case's mean over classes (NaN classes excluded), for
    /// the keys of `foreground_mean`.
    pub foreground: BTreeMap<Metric, Stats>,
    /// Summed voxel confusion matrix over `[0] + labels` (row = reference).
    pub confusion: Vec<u64>,
    /// Per class label: per-slice tallies.
    pub slices: BTreeMap<u8, SliceTally>,
    /// Patient-level diagnosis, when the spec names a positive class.
    pub patient: Option<PatientLevel>,
}

fn rate(a: u32, b: u32) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        f64::from(a) / f64::from(b)
    }
}

/// Aggregate scored cases.
pub fn summarize(cases: &[CaseMetrics], spec: &EvalSpec) -> Summary {
    let k = spec.classes.len() + 1;
    let mut per_class = BTreeMap::new();
    let mut slices = BTreeMap::new();
    for (ci, c) in spec.classes.iter().enumerate() {
        let mut by_key = BTreeMap::new();
        for key in Metric::ALL {
            let vals: Vec<f64> = cases
                .iter()
                .filter_map(|cm| cm.classes.get(ci).and_then(|m| class_value(m, key)))
                .collect();
            if !vals.is_empty() {
                by_key.insert(key, stats(&vals));
            }
        }
        per_class.insert(c.label, by_key);
        let mut t = SliceTally::default();
        for cm in cases {
            if let Some(sl) = cm.slices.get(ci) {
                for s in sl {
                    t.slices += 1;
                    let r = s.tp + s.fn_ > 0;
                    let p = s.tp + s.fp > 0;
                    t.with_reference += u64::from(r);
                    t.with_prediction += u64::from(p);
                    t.fp_only += u64::from(p && !r);
                    t.fn_only += u64::from(r && !p);
                }
            }
        }
        slices.insert(c.label, t);
    }
    let mut foreground_mean = BTreeMap::new();
    if let Some(first) = per_class.values().next() {
        for key in first.keys() {
            // Only keys every class has: lesion metrics exist for lesion classes only, and a
            // "foreground" mean over a subset of the classes would be mislabelled.
            if !per_class.values().all(|m| m.contains_key(key)) {
                continue;
            }
            let means: Vec<f64> = per_class
                .values()
                .map(|m| m.get(key).map_or(f64::NAN, |s| s.mean))
                .collect();
            foreground_mean.insert(*key, means.iter().sum::<f64>() / means.len() as f64);
        }
    }
    // Foreground statistics over cases: per case, the mean over classes of the defined
    // values (NaN classes excluded, NaN when none is defined), then the usual statistics.
    let mut foreground = BTreeMap::new();
    for &key in foreground_mean.keys() {
        let per_case: Vec<f64> = cases
            .iter()
            .map(|cm| mean_defined(cm.classes.iter().filter_map(|m| class_value(m, key))))
            .collect();
        foreground.insert(key, stats(&per_case));
    }
    let mut confusion = vec![0u64; k * k];
    for cm in cases {
        for (a, b) in confusion.iter_mut().zip(&cm.confusion) {
            *a += b;
        }
    }
    let patient = spec.positive_class.and_then(|pc| {
        let ci = spec.classes.iter().position(|c| c.label == pc)?;
        let mut p = PatientLevel {
            positive_class: pc,
            min_positive_mm3: spec.min_positive_mm3,
            tp: 0,
            fp: 0,
            fn_: 0,
            tn: 0,
            sensitivity: 0.0,
            specificity: 0.0,
            ppv: 0.0,
            npv: 0.0,
            accuracy: 0.0,
            calls: Vec::new(),
        };
        for cm in cases {
            let m = &cm.classes[ci];
            let positive = |n: u64| n > 0 && n as f64 * cm.voxel_mm3 >= spec.min_positive_mm3;
            let (r, q) = (positive(m.counts.n_ref()), positive(m.counts.n_pred()));
            match (r, q) {
                (true, true) => p.tp += 1,
                (false, true) => p.fp += 1,
                (true, false) => p.fn_ += 1,
                (false, false) => p.tn += 1,
            }
            p.calls.push((cm.case.clone(), r, q));
        }
        p.sensitivity = rate(p.tp, p.tp + p.fn_);
        p.specificity = rate(p.tn, p.tn + p.fp);
        p.ppv = rate(p.tp, p.tp + p.fp);
        p.npv = rate(p.tn, p.tn + p.fn_);
        p.accuracy = rate(p.tp + p.tn, p.tp + p.tn + p.fp + p.fn_);
        Some(p)
    });
    Summary {
        per_class,
        foreground_mean,
        foreground,
        confusion,
        slices,
        patient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], [25, 50, 75, 95]) = [2, 3, 4, 8.8]
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile_sorted(&v, 25.0), 2.0);
        assert_eq!(percentile_sorted(&v, 50.0), 3.0);
        assert_eq!(percentile_sorted(&v, 75.0), 4.0);
        assert!((percentile_sorted(&v, 95.0) - 8.8).abs() < 1e-12);
    }

    #[test]
    fn stats_exclude_nan_and_are_deterministic() {
        let s = stats(&[0.5, f64::NAN, 0.7, 0.9]);
        assert_eq!((s.n, s.n_nan), (4, 1));
        assert!((s.mean - 0.7).abs() < 1e-12);
        // sample std of 0.5, 0.7, 0.9 is 0.2
        assert!((s.std - 0.2).abs() < 1e-12);
        assert!(s.ci95_low >= 0.5 && s.ci95_high <= 0.9 && s.ci95_low < s.ci95_high);
        assert_eq!(s, stats(&[0.5, f64::NAN, 0.7, 0.9]));
        let none = stats(&[f64::NAN]);
        assert!(none.mean.is_nan() && none.n_nan == 1);
    }
}
