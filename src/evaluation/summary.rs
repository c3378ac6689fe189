//! `summary.json`: nnU-Net's structure and key names (`metric_per_case`, `mean`,
//! `foreground_mean`), extended with every METRICS.md metric in the same per-label dicts and
//! an `evald` block (conventions, statistics, lesions, patient level, confusion, failures,
//! provenance, and the paired `comparison` with the vendor's previous submission). Undefined
//! values are `null` (strict JSON), never a bare `NaN`.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::Evaluation;
use crate::metrics::aggregate::{class_value, Metric};

/// The conventions used, named in every output.
pub fn conventions(eval: &Evaluation) -> Value {
    let nsd: Map<String, Value> = eval
        .spec
        .classes
        .iter()
        .map(|c| (c.label.to_string(), json!(c.nsd_tolerance_mm)))
        .collect();
    json!({
        "Dice_IoU": "nnU-Net: 2TP/(2TP+FP+FN), TP/(TP+FP+FN); null when both masks are empty; 0 for a pure false positive",
        "HD95": "MONAI HausdorffDistanceMetric(percentile=95): max of the two directed 95th percentiles (linear interpolation) over 6-connected edge voxels, EDT with header spacing",
        "HD95_pooled": "MedPy hd95: 95th percentile of both directions pooled",
        "HD": "maximum of both directed distances over edge voxels",
        "ASSD": "MONAI SurfaceDistanceMetric(symmetric=True): mean of both directions pooled",
        "NSD": "DeepMind compute_surface_dice_at_tolerance: surfel areas on the voxel-corner grid, tolerance per class (nsd_tolerance_mm)",
        "NSD_voxel": "MONAI SurfaceDiceMetric(use_subvoxels=False): edge voxels within the class tolerance / all edge voxels, both directions",
        "empty_masks": "both empty: null for every surface metric; exactly one empty: HD, HD95, HD95_pooled and ASSD = the volume diagonal in mm, NSD = NSD_voxel = 0 (never inf)",
        "nsd_tolerance_mm": nsd,
        "lesions": {"connectivity": 26, "min_lesion_mm3": eval.spec.min_lesion_mm3,
                    "matching": "one-to-one, maximum total IoU (Hungarian); a pair qualifies with >= 1 common voxel when iou_threshold is 0, else with IoU >= iou_threshold",
                    "iou_threshold": eval.spec.lesion_iou_threshold,
                    "f1": "2TP/(2TP+FP+FN) (panoptica RQ); null without lesions in both maps"},
        "patient_level": {"positive_class": eval.spec.positive_class, "min_positive_mm3": eval.spec.min_positive_mm3},
        "aggregation": "mean over cases excluding null; std with n-1; 95% percentile bootstrap CI of the mean, 2000 resamples, fixed seed; foreground_mean = plain mean of the per-class means (nnU-Net), keys every class has; statistics.foreground = statistics over cases of each case's mean over classes (null classes excluded)",
        "unlisted_labels": "labels not in the task's classes count as background in the confusion matrix",
        "rtstruct_rasterisation": crate::dicom::RTSTRUCT_RULE,
    })
}

fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

fn int_or_num(key: Metric, v: f64) -> Value {
    use Metric::*;
    if matches!(
        key,
        TP | FP | FN | TN | NPred | NRef | LesionTP | LesionFP | LesionFN
    ) && v.is_finite()
    {
        json!(v as u64)
    } else {
        num(v)
    }
}

/// `{metric: {n, n_nan, mean, std, median, p25, p75, min, max, ci95}}`.
fn stats_json(
    by_key: &std::collections::BTreeMap<Metric, crate::metrics::aggregate::Stats>,
) -> Value {
    let m: Map<String, Value> = by_key
        .iter()
        .map(|(k, s)| {
            (
                k.key().to_string(),
                json!({"n": s.n, "n_nan": s.n_nan, "mean": num(s.mean), "std": num(s.std),
                       "median": num(s.median), "p25": num(s.p25), "p75": num(s.p75),
                       "min": num(s.min), "max": num(s.max),
                       "ci95": [num(s.ci95_low), num(s.ci95_high)]}),
            )
        })
        .collect();
    Value::Object(m)
}

/// The `evald.comparison` block: `null` without a previous submission; `{"against",
/// "paired": false, "reason"}` when it cannot be paired; otherwise the paired changes per
/// class and metric (`n`, `undefined`, means, `mean_difference`, `ci95`, `wilcoxon`), the
/// patient-level change and the cases failed in either.
pub fn comparison_json(against: Option<&super::compare::Against>) -> Value {
    use super::compare::Against;
    let Some(a) = against else {
        return Value::Null;
    };
    let c = match a {
        Against::Unpaired { against, reason } => {
            return json!({"against": against, "paired": false, "reason": reason});
        }
        Against::Paired(c) => c,
    };
    let mut metrics = Map::new();
    for m in &c.metrics {
        let w = m.wilcoxon.map(|w| {
            json!({"p": w.p.map_or(Value::Null, num), "method": w.method, "n": w.n,
                   "zeros": w.zeros, "r_plus": w.r_plus, "r_minus": w.r_minus})
        });
        let entry = metrics
            .entry(m.label.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(o) = entry {
            o.insert(
                m.metric.key().to_string(),
                json!({"n": m.n, "undefined": m.undefined,
                       "mean_before": num(m.mean_before), "mean_after": num(m.mean_after),
                       "mean_difference": num(m.mean_difference),
                       "ci95": m.ci95.map(|(l, h)| json!([num(l), num(h)])),
                       "wilcoxon": w}),
            );
        }
    }
    let patient = c.patient.as_ref().map(|p| {
        json!({"positive_class": p.positive_class, "positives": p.positives, "negatives": p.negatives,
               "sensitivity_before": num(p.sensitivity_before), "sensitivity_after": num(p.sensitivity_after),
               "sensitivity_discordant": {"right_only_before": p.sensitivity_discordant.0, "right_only_after": p.sensitivity_discordant.1},
               "sensitivity_mcnemar_p": num(p.sensitivity_p),
               "specificity_before": num(p.specificity_before), "specificity_after": num(p.specificity_after),
               "specificity_discordant": {"right_only_before": p.specificity_discordant.0, "right_only_after": p.specificity_discordant.1},
               "specificity_mcnemar_p": num(p.specificity_p),
               "reference_disagrees": p.reference_disagrees})
    });
    json!({"against": c.before, "paired": true, "testset_hash": c.testset_hash,
           "methods": super::compare::METHODS, "paired_cases": c.paired_cases,
           "failed_in_either": c.failed, "scored_in_one_only": c.scored_in_one_only,
           "metrics": metrics, "patient_level": patient})
}

/// Build the whole document.
pub fn to_json(eval: &Evaluation) -> Value {
    let mut per_case = Vec::new();
    for cm in &eval.cases {
        let mut metrics = Map::new();
        for m in &cm.classes {
            let mut d = Map::new();
            for key in Metric::ALL {
                if let Some(v) = class_value(m, key) {
                    d.insert(key.key().to_string(), int_or_num(key, v));
                }
            }
            metrics.insert(m.label.to_string(), Value::Object(d));
        }
        per_case.push(json!({
            "case": cm.case,
            "prediction_file": cm.prediction_file,
            "reference_file": cm.reference_file,
            "metrics": metrics,
        }));
    }
    let mut mean = Map::new();
    let mut stats = Map::new();
    for (label, by_key) in &eval.summary.per_class {
        let m: Map<String, Value> = by_key
            .iter()
            .map(|(k, s)| (k.key().to_string(), num(s.mean)))
            .collect();
        mean.insert(label.to_string(), Value::Object(m));
        stats.insert(label.to_string(), stats_json(by_key));
    }
    // "foreground": statistics of each case's mean over classes (not a label).
    stats.insert(
        "foreground".to_string(),
        stats_json(&eval.summary.foreground),
    );
    let fg: Map<String, Value> = eval
        .summary
        .foreground_mean
        .iter()
        .map(|(k, v)| (k.key().to_string(), num(*v)))
        .collect();
    let labels: Vec<u8> = std::iter::once(0).chain(eval.spec.labels()).collect();
    let k = labels.len();
    let matrix: Vec<Vec<u64>> = eval
        .summary
        .confusion
        .chunks(k)
        .map(<[u64]>::to_vec)
        .collect();
    let lesions: Vec<Value> = eval
        .cases
        .iter()
        .flat_map(|cm| {
            cm.classes.iter().filter_map(move |m| {
                m.lesions.as_ref().map(|l| {
                    json!({"case": cm.case, "label": m.label, "tp": l.tp, "fp": l.fp, "fn": l.fn_,
                           "precision": num(l.precision), "recall": num(l.recall), "f1": num(l.f1),
                           "mean_matched_dice": num(l.mean_matched_dice),
                           "lesions": l.lesions.iter().map(|r| json!({
                               "source": r.source, "id": r.id, "volume_ml": num(r.volume_ml),
                               "matched_with": r.matched_with, "dice": num(r.dice),
                               "centroid_vox": r.centroid_vox})).collect::<Vec<_>>()})
                })
            })
        })
        .collect();
    let patient = eval.summary.patient.as_ref().map(|p| {
        json!({"positive_class": p.positive_class, "min_positive_mm3": p.min_positive_mm3,
               "tp": p.tp, "fp": p.fp, "fn": p.fn_, "tn": p.tn,
               "sensitivity": num(p.sensitivity), "specificity": num(p.specificity),
               "ppv": num(p.ppv), "npv": num(p.npv), "accuracy": num(p.accuracy),
               "calls": p.calls.iter().map(|(c, r, q)| json!({"case": c, "reference": r, "prediction": q})).collect::<Vec<_>>()})
    });
    let classes: Map<String, Value> = eval
        .spec
        .classes
        .iter()
        .map(|c| (c.label.to_string(), json!(c.name)))
        .collect();
    let slice_tallies: Map<String, Value> = eval
        .summary
        .slices
        .iter()
        .map(|(l, t)| (l.to_string(), json!(t)))
        .collect();
    let reoriented: Vec<Value> = eval
        .cases
        .iter()
        .filter_map(|c| {
            c.reoriented
                .as_ref()
                .map(|r| json!({"case": c.case, "note": r}))
        })
        .collect();
    let unevaluated: Vec<Value> = eval
        .cases
        .iter()
        .flat_map(|c| {
            c.unevaluated.iter().map(move |u| {
                json!({
                    "case": c.case,
                    "label": u.label,
                    "reference_voxels": u.reference_voxels,
                    "prediction_voxels": u.prediction_voxels,
                })
            })
        })
        .collect();
    json!({
        "foreground_mean": fg,
        "mean": mean,
        "metric_per_case": per_case,
        "evald": {
            "version": env!("CARGO_PKG_VERSION"),
            "classes": classes,
            "conventions": conventions(eval),
            "cases_scored": eval.cases.len(),
            "cases_failed": eval.failures.len(),
            "failures": eval.failures,
            "statistics": stats,
            "slice_tallies": slice_tallies,
            "patient_level": patient,
            "lesions": lesions,
            "confusion_matrix": {"labels": labels, "rows_are": "reference", "matrix": matrix},
            "reoriented": reoriented,
            "unevaluated_labels": unevaluated,
            "comparison": comparison_json(eval.comparison.as_ref()),
            "run": eval.meta,
        }
    })
}

/// Write `summary.json` atomically (temp file in the same folder, then rename).
///
/// # Errors
/// I/O errors creating, writing or renaming the file.
pub fn write(eval: &Evaluation, path: &Path) -> std::io::Result<()> {
    let doc = to_json(eval);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = crate::files::output_temp_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, &doc)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
