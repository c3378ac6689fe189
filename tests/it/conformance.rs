//! Overlap metrics against nnU-Net's own numbers on real segmentations (tests/data/conformance):
//! TP/FP/FN/TN/n_ref/n_pred exactly, Dice and IoU to 1e-9, through the real `evald score`;
//! the aggregates `mean` and `foreground_mean` against nnU-Net's own summary to 1e-12 relative.

use std::path::Path;

use crate::util::{case_metrics, data, evald, read_json, run_ok};

fn labels_of(peer: &serde_json::Value) -> Vec<String> {
    peer["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn score(set: &str, preds: &Path, out: &Path) -> serde_json::Value {
    let peer = read_json(&data(&format!("conformance/{set}/peer-nnunet.json")));
    run_ok(
        evald().args([
            "score",
            "--labels",
            data(&format!("conformance/{set}/labelsTs"))
                .to_str()
                .unwrap(),
            "--predictions",
            preds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--classes",
            &labels_of(&peer).join(","),
            "--no-surface",
        ]),
    );
    read_json(out)
}

fn assert_matches_nnunet(set: &str, summary: &serde_json::Value) {
    let peer = read_json(&data(&format!("conformance/{set}/peer-nnunet.json")));
    let mut checked = 0;
    for (case, labels) in peer["cases"].as_object().unwrap() {
        let ours = case_metrics(summary, case);
        for (label, theirs) in labels.as_object().unwrap() {
            let m = &ours[label.as_str()];
            for (pk, ok) in [
                ("tp", "TP"),
                ("fp", "FP"),
                ("fn", "FN"),
                ("tn", "TN"),
                ("n_ref", "n_ref"),
                ("n_pred", "n_pred"),
            ] {
                assert_eq!(
                    m[ok].as_u64(),
                    theirs[pk].as_u64(),
                    "{set} {case} label {label} {ok}: ours {} nnU-Net {}",
                    m[ok],
                    theirs[pk]
                );
            }
            for (pk, ok) in [("dice", "Dice"), ("iou", "IoU")] {
                match theirs[pk].as_f64() {
                    Some(t) => {
                        let o = m[ok].as_f64().unwrap_or_else(|| {
                            panic!("{set} {case} {label} {ok} is null, nnU-Net {t}")
                        });
                        assert!(
                            (o - t).abs() < 1e-9,
                            "{set} {case} label {label} {ok}: ours {o} nnU-Net {t}"
                        );
                    }
                    None => assert!(
                        m[ok].is_null(),
                        "{set} {case} label {label} {ok}: nnU-Net NaN, ours {}",
                        m[ok]
                    ),
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "checked only {checked} case/labels");
}

/// nnU-Net's own aggregates (`peer-nnunet.nnunet_summary.json`, written by
/// `compute_metrics_on_folder`): `mean` = per label, the nanmean over cases; `foreground_mean`
/// = the plain mean over labels of those means. evald's summary.json must carry the same
/// numbers under the same keys (METRICS.md, "Aggregation" and "summary.json"). Relative
/// tolerance 1e-12: only the summation order may differ (numpy sums pairwise).
fn assert_aggregates_match_nnunet(set: &str, summary: &serde_json::Value) {
    let peer = read_json(&data(&format!(
        "conformance/{set}/peer-nnunet.nnunet_summary.json"
    )));
    let close = |what: &str, ours: &serde_json::Value, theirs: &serde_json::Value| {
        let t = theirs
            .as_f64()
            .unwrap_or_else(|| panic!("{set} {what}: nnU-Net {theirs}"));
        let o = ours
            .as_f64()
            .unwrap_or_else(|| panic!("{set} {what}: ours {ours}, nnU-Net {t}"));
        assert!(
            (o - t).abs() <= 1e-12 * t.abs().max(1.0),
            "{set} {what}: ours {o} nnU-Net {t}"
        );
    };
    const KEYS: [&str; 8] = ["Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref"];
    let mut checked = 0;
    let labels = peer["mean"].as_object().unwrap();
    for (label, theirs) in labels {
        for k in KEYS {
            close(
                &format!("mean[{label}][{k}]"),
                &summary["mean"][label.as_str()][k],
                &theirs[k],
            );
            checked += 1;
        }
    }
    assert_eq!(
        summary["mean"].as_object().map(|m| m.len()),
        Some(labels.len()),
        "{set}: labels in mean"
    );
    for k in KEYS {
        close(
            &format!("foreground_mean[{k}]"),
            &summary["foreground_mean"][k],
            &peer["foreground_mean"][k],
        );
        checked += 1;
    }
    assert!(checked >= 8 * 8, "{set}: checked only {checked} aggregates");
}

#[test]
fn openkbp10_counts_dice_iou_equal_nnunet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("summary.json");
    let s = score(
        "openkbp10",
        &data("conformance/openkbp10/predictions"),
        &out,
    );
    assert_matches_nnunet("openkbp10", &s);
    assert_aggregates_match_nnunet("openkbp10", &s);
    // strict JSON: no bare NaN anywhere
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains("NaN") && !text.contains("Infinity"));
    assert_eq!(s["evald"]["cases_scored"], 10);
}

#[test]
fn ts_abdomen_40_labels_equal_nnunet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("summary.json");
    let s = score(
        "ts-abdomen",
        &data("conformance/ts-abdomen/predictions"),
        &out,
    );
    assert_matches_nnunet("ts-abdomen", &s);
    assert_aggregates_match_nnunet("ts-abdomen", &s);
}

/// A prediction saved with permuted and flipped axes (same world grid) scores exactly like
/// the aligned one: reorientation is index arithmetic, never resampling.
#[test]
// Affine columns are rebuilt row by row: index loops read best here.
#[allow(clippy::needless_range_loop)]
fn reoriented_predictions_score_like_aligned_ones() {
    use evald::volume::{self, Volume};
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("preds");
    std::fs::create_dir_all(&preds).unwrap();
    let src = data("conformance/openkbp10/predictions");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let v = volume::read_labels(&p).unwrap();
        // New storage order: new axis 0 = old z reversed, new 1 = old x, new 2 = old y.
        let [nx, ny, nz] = v.geom.dims;
        let mut data = vec![0u8; v.data.len()];
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let (i, j, k) = (nz - 1 - z, x, y);
                    data[i + nz * (j + nx * k)] = v.data[x + nx * (y + ny * z)];
                }
            }
        }
        let a = v.geom.affine;
        let mut g = v.geom.clone();
        g.dims = [nz, nx, ny];
        g.spacing = [v.geom.spacing[2], v.geom.spacing[0], v.geom.spacing[1]];
        for r in 0..3 {
            // world = A * (x, y, z) with x = j, y = k, z = nz - 1 - i
            g.affine[r][0] = -a[r][2];
            g.affine[r][1] = a[r][0];
            g.affine[r][2] = a[r][1];
            g.affine[r][3] = a[r][3] + a[r][2] * (nz as f64 - 1.0);
        }
        volume::write_volume(
            &preds.join(p.file_name().unwrap()),
            &Volume { geom: g, data },
        )
        .unwrap();
    }
    let s = score("openkbp10", &preds, &dir.path().join("summary.json"));
    assert_matches_nnunet("openkbp10", &s);
    assert_eq!(s["evald"]["reoriented"].as_array().unwrap().len(), 10);
}
