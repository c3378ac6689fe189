//! `evald compare A B` on the real binary: two `evald score` runs of the same test set
//! (the second with one case replaced by its reference), the paired
//! numbers recomputed here from the two summary.json files' per-case values, and the
//! refusal on other test-set content.

use std::path::{Path, PathBuf};

use crate::util::{data, evald, read_json, run_ok};

const LABELS: &str = "conformance/openkbp10/labelsTs";
const PREDICTIONS: &str = "conformance/openkbp10/predictions";

/// `evald score` of `preds` against `labels` into `out` (classes 1, 2, no surface distances:
/// fast, and the comparison then covers Dice and IoU).
fn score(labels: &Path, preds: &Path, out: &Path) {
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--no-slices"])
            .arg("--labels")
            .arg(labels)
            .arg("--predictions")
            .arg(preds)
            .arg("--out")
            .arg(out),
    );
}

/// A copy of the stored predictions, with `perfect` replaced by its reference and `drop`
/// left out.
fn predictions(dir: &Path, perfect: Option<&str>, drop: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(data(PREDICTIONS)).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let case = name.strip_suffix(".nii.gz").unwrap();
        if Some(case) == drop {
            continue;
        }
        let src = if Some(case) == perfect {
            data(LABELS).join(&name)
        } else {
            e.path()
        };
        std::fs::copy(src, dir.join(&name)).unwrap();
    }
    dir.to_path_buf()
}

/// Per case id: the value of `metric` for `label` (None: null/undefined).
fn per_case(summary: &serde_json::Value, label: &str, metric: &str) -> Vec<(String, Option<f64>)> {
    summary["metric_per_case"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["case"].as_str().unwrap().to_string(),
                c["metrics"][label][metric].as_f64(),
            )
        })
        .collect()
}

#[test]
fn compare_prints_the_paired_mean_differences_of_the_two_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    score(
        &data(LABELS),
        &predictions(&dir.path().join("pa"), None, None),
        &a,
    );
    score(
        &data(LABELS),
        &predictions(&dir.path().join("pb"), Some("pt_13"), None),
        &b,
    );
    let o = run_ok(evald().arg("compare").arg(&a).arg(&b).arg("--json"));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(got["paired"], true, "{got}");
    let (sa, sb) = (read_json(&a), read_json(&b));
    let scored_a = sa["metric_per_case"].as_array().unwrap().len();
    // `evald score` hashes the cases it paired with predictions, so both runs score every
    // case (a case left out would be other test-set content).
    assert_eq!(got["paired_cases"], scored_a);
    assert_eq!(got["failed_in_either"], serde_json::json!([]), "{got}");
    for label in ["1", "2"] {
        for metric in ["Dice", "IoU"] {
            let before: std::collections::BTreeMap<_, _> =
                per_case(&sa, label, metric).into_iter().collect();
            let diffs: Vec<f64> = per_case(&sb, label, metric)
                .into_iter()
                .filter_map(|(case, v)| Some(v? - (*before.get(&case)?)?))
                .collect();
            let want = diffs.iter().sum::<f64>() / diffs.len() as f64;
            let m = &got["metrics"][label][metric];
            assert_eq!(m["n"], diffs.len(), "{label} {metric}: {m}");
            let d = m["mean_difference"].as_f64().unwrap();
            assert!((d - want).abs() < 1e-12, "{label} {metric}: {d} vs {want}");
            let ci = m["ci95"].as_array().unwrap();
            let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
            let (min, max) = diffs
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                    (l.min(x), h.max(x))
                });
            // A bootstrap mean lies within the range of the differences.
            assert!(
                min <= lo && lo <= hi && hi <= max,
                "{label} {metric}: {ci:?}"
            );
        }
    }
    // The text form says the same mean difference, the pairs and the failed case.
    let o = run_ok(evald().arg("compare").arg(&a).arg(&b));
    let text = String::from_utf8_lossy(&o.stdout);
    let d = got["metrics"]["2"]["Dice"]["mean_difference"]
        .as_f64()
        .unwrap();
    assert!(text.contains(&format!("label 2 Dice {d:+.3}")), "{text}");
    assert!(text.contains(&format!("{scored_a} paired cases")), "{text}");
}

#[test]
fn compare_refuses_evaluations_of_other_test_set_content() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    // The same cases but one: other test-set content.
    for e in std::fs::read_dir(data(LABELS)).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "pt_4.nii.gz" {
            std::fs::copy(e.path(), labels.join(e.file_name())).unwrap();
        }
    }
    let preds = predictions(&dir.path().join("p"), None, None);
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    score(&data(LABELS), &preds, &a);
    score(&labels, &preds, &b);
    let o = evald().arg("compare").arg(&a).arg(&b).output().unwrap();
    assert!(!o.status.success(), "{o:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("not paired: different test-set content"),
        "{stderr}"
    );
    assert!(o.stdout.is_empty(), "nothing printed as a comparison");
}
