//! Lesion-wise detection on hand-built label maps (26-connectivity, size filter, one-to-one
//! matching maximising total IoU, thresholds), and the empty-mask conventions of every
//! metric end to end through `evald score` (summary.json values, finite means, patient level).

use evald::metrics::lesion;
use evald::metrics::LesionMetrics;
use evald::volume::{self, Geometry, LabelVolume, Volume};

use crate::util::{case_metrics, evald, read_json, run_ok};

fn vol(dims: [usize; 3], spacing: [f64; 3], voxels: &[[usize; 3]]) -> LabelVolume {
    let mut data = vec![0u8; dims.iter().product()];
    for v in voxels {
        data[v[0] + dims[0] * (v[1] + dims[1] * v[2])] = 2;
    }
    Volume {
        geom: Geometry::axis_aligned(dims, spacing, [0.0; 3]),
        data,
    }
}

fn cube(at: [usize; 3], n: usize) -> Vec<[usize; 3]> {
    let mut v = Vec::new();
    for z in 0..n {
        for y in 0..n {
            for x in 0..n {
                v.push([at[0] + x, at[1] + y, at[2] + z]);
            }
        }
    }
    v
}

fn seg(x0: usize, x1: usize) -> Vec<[usize; 3]> {
    (x0..x1).map(|x| [x, 0, 0]).collect()
}

fn run(r: &LabelVolume, p: &LabelVolume, min_mm3: f64, thr: f64) -> LesionMetrics {
    lesion::compute(r, p, 2, min_mm3, thr)
}

#[test]
fn cubes_touching_at_a_corner_are_one_lesion_under_26_connectivity() {
    let dims = [12, 12, 12];
    let r = vol(dims, [1.0; 3], &cube([2, 2, 2], 3));
    // two predicted cubes meeting only at one corner (5,5,5)-(4,4,4): one component
    let mut p = cube([2, 2, 2], 3);
    p.extend(cube([5, 5, 5], 2));
    let p = vol(dims, [1.0; 3], &p);
    let m = run(&r, &p, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (1, 0, 0), "{m:?}");
    let pred_rows: Vec<_> = m
        .lesions
        .iter()
        .filter(|l| l.source == "prediction")
        .collect();
    assert_eq!(pred_rows.len(), 1);
    assert!((pred_rows[0].volume_ml - 35.0 / 1000.0).abs() < 1e-12);
    // Dice 2*27/(27+35)
    assert!((m.mean_matched_dice - 54.0 / 62.0).abs() < 1e-12, "{m:?}");
}

#[test]
fn two_predicted_lesions_on_one_reference_give_one_tp_and_one_fp() {
    let dims = [20, 8, 8];
    let r = vol(dims, [1.0; 3], &cube([2, 2, 2], 4)); // x 2..6
                                                      // two predictions separated by a one-voxel gap, both overlapping the reference
    let mut p = cube([1, 2, 2], 3); // x 1..4: 2 columns overlap (x 2,3)
    p.extend(cube([5, 2, 2], 3)); // x 5..8: 1 column overlaps (x 5)
    let p = vol(dims, [1.0; 3], &p);
    let m = run(&r, &p, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (1, 1, 0), "{m:?}");
    assert!((m.precision - 0.5).abs() < 1e-12 && (m.recall - 1.0).abs() < 1e-12);
    assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
    // the better one (IoU 18/(64+27-18)) wins: prediction id 1 (first in scan order)
    let r1 = m.lesions.iter().find(|l| l.source == "reference").unwrap();
    assert_eq!(r1.matched_with, Some(1));
    assert!((r1.dice - 36.0 / 91.0).abs() < 1e-12, "{r1:?}");
    let p2 = m
        .lesions
        .iter()
        .find(|l| l.source == "prediction" && l.id == 2)
        .unwrap();
    assert_eq!(p2.matched_with, None);
    assert!(p2.dice.is_nan());
    assert_eq!(p2.centroid_vox, [6.0, 3.0, 3.0]);
}

#[test]
fn matching_maximises_total_iou_not_greedy() {
    // along a line: reference A = [0,10), B = [12,22); prediction Y = [0,3), X = [4,16).
    // IoU(A,X) = 6/16 is the single best pair, but A-Y (0.3) + B-X (4/18) is the larger
    // total and matches both references.
    let dims = [24, 1, 1];
    let mut r = seg(0, 10);
    r.extend(seg(12, 22));
    let mut p = seg(0, 3);
    p.extend(seg(4, 16));
    let m = run(&vol(dims, [1.0; 3], &r), &vol(dims, [1.0; 3], &p), 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (2, 0, 0), "{m:?}");
    let a = m
        .lesions
        .iter()
        .find(|l| l.source == "reference" && l.id == 1)
        .unwrap();
    assert_eq!(a.matched_with, Some(1)); // Y
                                         // with an IoU threshold of 0.35 only A-X qualifies
    let m = run(
        &vol(dims, [1.0; 3], &r),
        &vol(dims, [1.0; 3], &p),
        0.0,
        0.35,
    );
    assert_eq!((m.tp, m.fp, m.fn_), (1, 1, 1), "{m:?}");
    let a = m
        .lesions
        .iter()
        .find(|l| l.source == "reference" && l.id == 1)
        .unwrap();
    assert_eq!(a.matched_with, Some(2)); // X
}

#[test]
fn small_components_are_dropped_from_both_maps() {
    let dims = [16, 16, 4];
    let sp = [0.5, 0.5, 2.0]; // 0.5 mm^3 voxels
    let mut r = cube([1, 1, 0], 3); // 27 voxels = 13.5 mm^3
    r.push([12, 12, 0]); // 0.5 mm^3 speck: dropped
    let mut p = cube([1, 1, 0], 3);
    p.push([8, 12, 0]);
    p.push([9, 12, 0]); // 1 mm^3 speck: dropped at min 2 mm^3, kept at 1 mm^3
    let (r, p) = (vol(dims, sp, &r), vol(dims, sp, &p));
    let m = run(&r, &p, 2.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (1, 0, 0), "{m:?}");
    assert_eq!(m.lesions.len(), 2);
    let m = run(&r, &p, 1.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (1, 1, 0), "{m:?}");
    let m = run(&r, &p, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (1, 1, 1), "{m:?}");
}

#[test]
fn no_lesions_anywhere_is_undefined_not_perfect() {
    let e = vol([4, 4, 4], [1.0; 3], &[]);
    let m = run(&e, &e, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (0, 0, 0));
    assert!(m.f1.is_nan() && m.precision.is_nan() && m.recall.is_nan());
    assert!(m.mean_matched_dice.is_nan() && m.lesions.is_empty());
    let one = vol([4, 4, 4], [1.0; 3], &[[0, 0, 0]]);
    let m = run(&e, &one, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (0, 1, 0));
    assert!(m.recall.is_nan() && m.precision == 0.0 && m.f1 == 0.0);
    let m = run(&one, &e, 0.0, 0.0);
    assert_eq!((m.tp, m.fp, m.fn_), (0, 0, 1));
    assert!(m.precision.is_nan() && m.recall == 0.0 && m.f1 == 0.0);
}

// ---------------------------------------------------------------------------------------
// Empty masks end to end.

/// Writes a case: label 1 (a box) always present in both; label 2 per the flags.
fn write_case(dir: &std::path::Path, case: &str, ref2: bool, pred2: bool) {
    let dims = [24, 20, 10];
    let sp = [0.8, 0.8, 2.0];
    for (sub, has2, shift) in [("labelsTs", ref2, 0), ("predictions", pred2, 1)] {
        let mut v = vol(dims, sp, &[]);
        for z in 2..8 {
            for y in 3..15 {
                for x in 3 + shift..18 {
                    v.data[x + dims[0] * (y + dims[1] * z)] = 1;
                }
            }
        }
        if has2 {
            for p in cube([19, 5, 3], 3) {
                v.data[p[0] + dims[0] * (p[1] + dims[1] * p[2])] = 2;
            }
        }
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        volume::write_volume(&dir.join(sub).join(format!("{case}.nii.gz")), &v).unwrap();
    }
}

#[test]
fn empty_mask_conventions_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_case(d, "both_empty", false, false);
    write_case(d, "pure_fp", false, true);
    write_case(d, "pure_fn", true, false);
    write_case(d, "hit", true, true);
    let out = d.join("summary.json");
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--lesion-classes", "2"])
            .args(["--positive-class", "2", "--labels"])
            .arg(d.join("labelsTs"))
            .arg("--predictions")
            .arg(d.join("predictions"))
            .arg("--out")
            .arg(&out),
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains("NaN") && !text.contains("Infinity"));
    let s = read_json(&out);
    // the header stores spacing as f32: take the diagonal from the file, not from 0.8 mm
    let diag = volume::read_geometry(&d.join("labelsTs/hit.nii.gz"))
        .unwrap()
        .diagonal_mm();
    assert!((diag - (19.2f64.powi(2) + 16.0f64.powi(2) + 20.0f64.powi(2)).sqrt()).abs() < 1e-5);
    let dist = ["HD", "HD95", "HD95_pooled", "ASSD"];
    let nsd = ["NSD", "NSD_voxel"];

    let m = &case_metrics(&s, "both_empty")["2"];
    for k in dist.iter().chain(&nsd).chain(&["Dice", "IoU", "LesionF1"]) {
        assert!(m[*k].is_null(), "both empty {k}: {}", m[*k]);
    }
    assert_eq!(
        [&m["LesionTP"], &m["LesionFP"], &m["LesionFN"]].map(|v| v.as_u64()),
        [Some(0); 3]
    );
    for (case, lfp, lfn) in [("pure_fp", 1, 0), ("pure_fn", 0, 1)] {
        let m = &case_metrics(&s, case)["2"];
        for k in dist {
            let v = m[k].as_f64().unwrap_or_else(|| panic!("{case} {k} null"));
            assert!((v - diag).abs() < 1e-9, "{case} {k} = {v}, diagonal {diag}");
        }
        for k in nsd.iter().chain(&["Dice", "IoU", "LesionF1"]) {
            assert_eq!(m[*k].as_f64(), Some(0.0), "{case} {k}");
        }
        assert_eq!(
            (m["LesionFP"].as_u64(), m["LesionFN"].as_u64()),
            (Some(lfp), Some(lfn))
        );
    }
    let m = &case_metrics(&s, "hit")["2"];
    assert_eq!(m["HD95"].as_f64(), Some(0.0));
    assert_eq!(m["NSD"].as_f64(), Some(1.0));
    assert_eq!(m["LesionTP"].as_u64(), Some(1));
    // label 1 is shifted by one voxel (0.8 mm) in x in every case
    let m1 = &case_metrics(&s, "hit")["1"];
    assert!((m1["HD"].as_f64().unwrap() - 0.8).abs() < 1e-6);
    assert_eq!(m1["NSD_voxel"].as_f64(), Some(1.0));

    // means stay finite: the empty-vs-nonempty diagonal enters, both-empty is excluded
    let mean_hd95 = s["mean"]["2"]["HD95"].as_f64().unwrap();
    assert!(
        (mean_hd95 - (2.0 * diag + 0.0) / 3.0).abs() < 1e-9,
        "{mean_hd95}"
    );
    let st = &s["evald"]["statistics"]["2"]["HD95"];
    assert_eq!((st["n"].as_u64(), st["n_nan"].as_u64()), (Some(4), Some(1)));
    assert_eq!(s["mean"]["2"]["NSD"].as_f64(), Some(1.0 / 3.0));
    assert!(s["foreground_mean"]["HD95"].as_f64().is_some());
    // lesion keys exist for label 2 only: not averaged into the foreground
    assert!(s["foreground_mean"].get("LesionF1").is_none());
    // foreground statistics: each case's mean over its defined classes (label 1 always is)
    let fg = &s["evald"]["statistics"]["foreground"]["Dice"];
    assert_eq!((fg["n"].as_u64(), fg["n_nan"].as_u64()), (Some(4), Some(0)));

    // patient level on label 2: hit = TP, pure_fp = FP, pure_fn = FN, both_empty = TN
    let pl = &s["evald"]["patient_level"];
    assert_eq!(
        [&pl["tp"], &pl["fp"], &pl["fn"], &pl["tn"]].map(|v| v.as_u64()),
        [Some(1), Some(1), Some(1), Some(1)]
    );
    assert_eq!(pl["sensitivity"].as_f64(), Some(0.5));
    assert_eq!(pl["specificity"].as_f64(), Some(0.5));
    assert_eq!(pl["accuracy"].as_f64(), Some(0.5));
    // lesion rows are reported per case
    let lesions = s["evald"]["lesions"].as_array().unwrap();
    let hit = lesions.iter().find(|l| l["case"] == "hit").unwrap();
    assert_eq!(hit["lesions"].as_array().unwrap().len(), 2);
    assert_eq!(hit["lesions"][0]["matched_with"], 1);
}
