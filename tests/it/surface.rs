//! Surface distances against the peers' own numbers on real segmentations
//! (tests/data/conformance), through the real `evald score`:
//! - HD95 and ASSD equal MONAI's (`peer-monai.json`) to 1e-3 mm, NSD_voxel equals MONAI's
//!   edge-voxel surface Dice to 1e-3;
//! - NSD equals DeepMind's surfel-area surface Dice (`peer-deepmind.json`) to 1e-3;
//! - HD95_pooled and ASSD equal MedPy's (`peer-medpy.json`, openkbp10 only) to 1e-3 mm.
//!
//! Where a peer has no number (it returned inf/NaN or raised: an empty mask), METRICS.md's
//! value is checked instead: one mask empty -> every distance is the volume diagonal in mm
//! and both NSDs are 0; both empty -> null. The mapping per peer value:
//! MONAI HD95 null / ASSD "inf" / DeepMind "inf" / MedPy RuntimeError (null) -> diagonal;
//! a peer's NSD 0 with one empty mask -> 0; a peer's null NSD with both empty -> null.
//!
//! Then hand-computable unit cases on the library: every empty-mask combination, one-voxel
//! masks, masks touching the array border, whole-volume masks, anisotropic spacing.

use evald::metrics::surface;
use evald::metrics::SurfaceMetrics;
use evald::volume::{self, Geometry, LabelVolume, Volume};

use crate::util::{case_metrics, data, evald, read_json, run_ok};

const TOL: f64 = 1e-3;

fn score_with_surfaces(set: &str, dir: &std::path::Path) -> serde_json::Value {
    let peer = read_json(&data(&format!("conformance/{set}/peer-monai.json")));
    let labels: Vec<String> = peer["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.to_string())
        .collect();
    let out = dir.join("summary.json");
    run_ok(
        evald()
            .args(["score", "--no-slices", "--nsd-tolerance", "1", "--classes"])
            .arg(labels.join(","))
            .arg("--labels")
            .arg(data(&format!("conformance/{set}/labelsTs")))
            .arg("--predictions")
            .arg(data(&format!("conformance/{set}/predictions")))
            .arg("--out")
            .arg(&out),
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("NaN") && !text.contains("Infinity"),
        "summary.json must be strict JSON without NaN/inf"
    );
    serde_json::from_str(&text).unwrap()
}

/// Volume diagonal (mm) of a case, from its reference header.
fn diagonal(set: &str, case: &str) -> f64 {
    volume::read_geometry(&data(&format!("conformance/{set}/labelsTs/{case}.nii.gz")))
        .unwrap()
        .diagonal_mm()
}

/// A peer value: Some(finite number), or None for null / "inf".
fn peer_num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// Compare one metric of every case/label of a peer file with ours.
fn check_against(
    set: &str,
    summary: &serde_json::Value,
    peer_file: &str,
    pairs: &[(&str, &str)],
) -> usize {
    let peer = read_json(&data(&format!("conformance/{set}/{peer_file}")));
    let mut checked = 0;
    for (case, labels) in peer["cases"].as_object().unwrap() {
        let ours = case_metrics(summary, case);
        let diag = diagonal(set, case);
        for (label, theirs) in labels.as_object().unwrap() {
            let m = &ours[label.as_str()];
            let n_ref = theirs["n_ref"].as_u64().unwrap();
            let n_pred = theirs["n_pred"].as_u64().unwrap();
            for &(pk, ok) in pairs {
                let o = m[ok].as_f64();
                let ctx = format!(
                    "{set} {case} label {label} {ok} vs {peer_file} {pk}: ours {} theirs {}",
                    m[ok], theirs[pk]
                );
                match (n_ref > 0, n_pred > 0) {
                    (true, true) => {
                        let t = peer_num(&theirs[pk]).unwrap_or_else(|| panic!("{ctx}"));
                        let o = o.unwrap_or_else(|| panic!("{ctx}"));
                        assert!((o - t).abs() <= TOL, "{ctx}");
                    }
                    (false, false) => assert!(m[ok].is_null(), "{ctx}"),
                    _ => {
                        // one empty: peers give inf / null / raise for distances, 0 for NSD
                        let want = if ok.starts_with("NSD") { 0.0 } else { diag };
                        if ok.starts_with("NSD") {
                            assert_eq!(peer_num(&theirs[pk]), Some(0.0), "{ctx}");
                        } else {
                            assert!(peer_num(&theirs[pk]).is_none(), "{ctx}");
                        }
                        let o = o.unwrap_or_else(|| panic!("{ctx}"));
                        assert!((o - want).abs() <= 1e-9, "{ctx} (METRICS.md: {want})");
                    }
                }
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn openkbp10_surface_metrics_equal_monai_deepmind_medpy() {
    let dir = tempfile::tempdir().unwrap();
    let s = score_with_surfaces("openkbp10", dir.path());
    let n = check_against(
        "openkbp10",
        &s,
        "peer-monai.json",
        &[
            ("hd95_mm", "HD95"),
            ("assd_mm", "ASSD"),
            ("nsd_1mm", "NSD_voxel"),
        ],
    );
    assert_eq!(n, 10 * 7 * 3);
    check_against("openkbp10", &s, "peer-deepmind.json", &[("nsd_1mm", "NSD")]);
    check_against(
        "openkbp10",
        &s,
        "peer-medpy.json",
        &[("hd95_mm", "HD95_pooled"), ("assd_mm", "ASSD")],
    );
    // the conventions are named in the output
    let conv = &s["evald"]["conventions"];
    assert!(conv["HD95"].as_str().unwrap().contains("MONAI"));
    assert!(conv["NSD"].as_str().unwrap().contains("DeepMind"));
    assert_eq!(conv["nsd_tolerance_mm"]["1"], 1.0);
}

#[test]
fn ts_abdomen_surface_metrics_equal_monai_and_deepmind() {
    let dir = tempfile::tempdir().unwrap();
    let s = score_with_surfaces("ts-abdomen", dir.path());
    let n = check_against(
        "ts-abdomen",
        &s,
        "peer-monai.json",
        &[
            ("hd95_mm", "HD95"),
            ("assd_mm", "ASSD"),
            ("nsd_1mm", "NSD_voxel"),
        ],
    );
    assert!(n >= 40 * 3, "checked {n}");
    check_against(
        "ts-abdomen",
        &s,
        "peer-deepmind.json",
        &[("nsd_1mm", "NSD")],
    );
}

// ---------------------------------------------------------------------------------------
// Hand-computable cases on the library.

fn vol(dims: [usize; 3], spacing: [f64; 3], voxels: &[[usize; 3]]) -> LabelVolume {
    let mut data = vec![0u8; dims.iter().product()];
    for v in voxels {
        data[v[0] + dims[0] * (v[1] + dims[1] * v[2])] = 1;
    }
    Volume {
        geom: Geometry::axis_aligned(dims, spacing, [0.0; 3]),
        data,
    }
}

fn full(
    dims: [usize; 3],
    spacing: [f64; 3],
    keep: impl Fn(usize, usize, usize) -> bool,
) -> LabelVolume {
    let mut v = vol(dims, spacing, &[]);
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                v.data[x + dims[0] * (y + dims[1] * z)] = u8::from(keep(x, y, z));
            }
        }
    }
    v
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn assert_all(m: &SurfaceMetrics, d: f64, nsd: f64) {
    for (name, v) in [
        ("hd", m.hd),
        ("hd95", m.hd95),
        ("hd95_pooled", m.hd95_pooled),
        ("assd", m.assd),
    ] {
        assert!(close(v, d), "{name} = {v}, want {d} ({m:?})");
    }
    assert!(close(m.nsd, nsd) && close(m.nsd_voxel, nsd), "{m:?}");
}

#[test]
fn both_empty_is_nan_everywhere() {
    let e = vol([4, 4, 4], [1.0; 3], &[]);
    let m = surface::compute(&e, &e, 1, 1.0);
    for v in [m.hd, m.hd95, m.hd95_pooled, m.assd, m.nsd, m.nsd_voxel] {
        assert!(v.is_nan(), "{m:?}");
    }
    // another label present does not change that
    let mut other = e.clone();
    other.data[5] = 2;
    let m = surface::compute(&other, &other, 1, 1.0);
    assert!(m.hd95.is_nan() && m.nsd.is_nan());
}

#[test]
fn exactly_one_empty_is_the_diagonal_and_zero_nsd_either_way() {
    let sp = [0.5, 1.0, 2.5];
    let e = vol([10, 8, 6], sp, &[]);
    let one = vol([10, 8, 6], sp, &[[3, 3, 3], [4, 3, 3]]);
    let diag = (5.0f64.powi(2) + 8.0f64.powi(2) + 15.0f64.powi(2)).sqrt();
    assert!(close(e.geom.diagonal_mm(), diag));
    assert_all(&surface::compute(&one, &e, 1, 1.0), diag, 0.0); // missed (pure FN)
    assert_all(&surface::compute(&e, &one, 1, 1.0), diag, 0.0); // pure FP
}

#[test]
fn identical_masks_are_zero_and_nsd_one() {
    let sp = [0.7, 0.7, 3.0];
    for voxels in [
        vec![[0, 0, 0]],                       // one voxel in a corner of the array
        vec![[2, 2, 2]],                       // one voxel inside
        vec![[0, 1, 1], [1, 1, 1], [4, 4, 2]], // two pieces, one on the border
    ] {
        let a = vol([5, 5, 3], sp, &voxels);
        assert_all(&surface::compute(&a, &a, 1, 0.0), 0.0, 1.0);
    }
}

#[test]
fn one_voxel_masks_apart_anisotropic() {
    // reference voxel (2,2,2), prediction (2,2,4), spacing z 2.5 mm: 5 mm apart.
    let sp = [1.0, 1.0, 2.5];
    let r = vol([5, 5, 7], sp, &[[2, 2, 2]]);
    let p = vol([5, 5, 7], sp, &[[2, 2, 4]]);
    let m = surface::compute(&r, &p, 1, 1.0);
    assert_all(&m, 5.0, 0.0);
    // surfels sit on voxel corners: the facing corner planes are 2.5 mm apart, the far
    // ones 5 mm; a single voxel's 8 corner surfels all have the same area.
    let m = surface::compute(&r, &p, 1, 2.5);
    assert!(close(m.nsd, 0.5), "{m:?}");
    assert!(close(m.nsd_voxel, 0.0), "{m:?}");
    let m = surface::compute(&r, &p, 1, 2.49);
    assert!(close(m.nsd, 0.0), "{m:?}");
    let m = surface::compute(&r, &p, 1, 5.0);
    assert!(close(m.nsd, 1.0) && close(m.nsd_voxel, 1.0), "{m:?}");
    // diagonal offset mixes spacings: voxels (0,0,0) and (1,0,1) at spacing (3, 1, 4) mm
    // are 5 mm apart, but share the corner edge x = 1, z = 1: 2 of each voxel's 8 equal
    // corner surfels are at distance 0, the others >= 3 mm.
    let sp = [3.0, 1.0, 4.0];
    let r = vol([3, 3, 3], sp, &[[0, 0, 0]]);
    let p = vol([3, 3, 3], sp, &[[1, 0, 1]]);
    let m = surface::compute(&r, &p, 1, 1.0);
    assert!(
        close(m.hd, 5.0) && close(m.hd95, 5.0) && close(m.assd, 5.0),
        "{m:?}"
    );
    assert!(close(m.nsd, 0.25) && close(m.nsd_voxel, 0.0), "{m:?}");
}

#[test]
fn whole_volume_masks_have_their_border_as_edge() {
    // Outside the array is background: a mask filling the array has edges on its faces.
    let dims = [9, 9, 4];
    let sp = [1.0, 1.0, 0.5];
    let all = full(dims, sp, |_, _, _| true);
    assert_all(&surface::compute(&all, &all, 1, 1.0), 0.0, 1.0);
    // prediction misses the top slice: 9x9x3 box. Prediction edges 243 - 49 = 194, of which
    // the 49 inner ones of its top face are 0.5 mm from the reference's top face; reference
    // edges 324 - 98 = 226, of which its 81 top-slice voxels are 0.5 mm from the prediction.
    let pred = full(dims, sp, |_, _, z| z < 3);
    let m = surface::compute(&all, &pred, 1, 1.0);
    assert!(
        close(m.hd, 0.5) && close(m.hd95, 0.5) && close(m.hd95_pooled, 0.5),
        "{m:?}"
    );
    assert!(close(m.assd, 130.0 * 0.5 / 420.0), "{m:?}");
    assert!(close(m.nsd_voxel, 1.0) && close(m.nsd, 1.0), "{m:?}");
    let m = surface::compute(&all, &pred, 1, 0.4);
    assert!(close(m.nsd_voxel, 290.0 / 420.0), "{m:?}");
    assert!(m.nsd > 0.0 && m.nsd < 1.0, "{m:?}");
}

#[test]
fn hd95_is_max_of_directed_percentiles_and_pooled_differs() {
    // A reference line of 20 voxels along x; the prediction is the same line plus one far
    // voxel (10 voxels above the line's end): only the prediction->reference direction has a
    // large distance, so the MONAI (max of directed P95) and MedPy (pooled P95) conventions
    // differ in a hand-computable way.
    let sp = [1.0; 3];
    let line: Vec<[usize; 3]> = (0..20).map(|x| [x, 0, 0]).collect();
    let mut with_far = line.clone();
    with_far.push([19, 10, 0]);
    let r = vol([20, 11, 1], sp, &line);
    let p = vol([20, 11, 1], sp, &with_far);
    let m = surface::compute(&r, &p, 1, 1.0);
    // pred->ref: 20 zeros and 10.0; P95 at position 0.95*20 = 19 -> 0 ... 0 and 10 -> 0.0
    // ref->pred: 20 zeros. pooled: 40 zeros and one 10 -> P95 at 38 -> 0.
    assert!(close(m.hd, 10.0), "{m:?}");
    assert!(close(m.hd95, 0.0) && close(m.hd95_pooled, 0.0), "{m:?}");
    assert!(close(m.assd, 10.0 / 41.0), "{m:?}");
    // now with 3 far voxels pred->ref has 23 values: position 0.95*22 = 20.9, between
    // v[20] = 10 and v[21] = 10 -> 10.
    let mut p3 = line.clone();
    p3.extend([[19, 10, 0], [17, 10, 0], [15, 10, 0]]);
    let p = vol([20, 11, 1], sp, &p3);
    let m = surface::compute(&r, &p, 1, 1.0);
    assert!(close(m.hd95, 10.0), "{m:?}");
    // pooled: 40 zeros, three 10s: sorted index 39.9 -> v[39] = 0, v[40] = 10 -> 9.0
    assert!(close(m.hd95_pooled, 9.0), "{m:?}");
}

#[test]
fn labels_other_than_the_class_are_ignored_and_results_are_symmetric_where_they_should_be() {
    let sp = [0.8, 0.8, 2.0];
    let dims = [12, 10, 6];
    let mut r = full(dims, sp, |x, y, z| {
        (2..8).contains(&x) && (2..7).contains(&y) && (1..4).contains(&z)
    });
    let p = full(dims, sp, |x, y, z| {
        (3..9).contains(&x) && (2..8).contains(&y) && (1..5).contains(&z)
    });
    let a = surface::compute(&r, &p, 1, 1.0);
    let b = surface::compute(&p, &r, 1, 1.0);
    // HD, HD95 (max of both), pooled values, ASSD and both NSDs are symmetric
    for (x, y) in [
        (a.hd, b.hd),
        (a.hd95, b.hd95),
        (a.hd95_pooled, b.hd95_pooled),
        (a.assd, b.assd),
        (a.nsd, b.nsd),
        (a.nsd_voxel, b.nsd_voxel),
    ] {
        assert!(close(x, y), "{a:?} vs {b:?}");
    }
    // another label far away in the reference changes nothing for label 1
    r.data[11 + 12 * (9 + 10 * 5)] = 3;
    assert_eq!(surface::compute(&r, &p, 1, 1.0), a);
}
