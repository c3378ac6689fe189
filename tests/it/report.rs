//! The Excel report, read back with calamine: every number equals summary.json (written
//! from the same evaluation), undefined values are empty cells, the native charts, the
//! plot, frozen panes, filters and colour scales exist in the xlsx parts, no formulas; the
//! file is replaced atomically and an earlier report is kept; the Slices sheet stays fast
//! and small at test-set scale.
//!
//! Evaluations come from real scoring: openkbp10's clinical contours against their seeded
//! perturbations (tests/data/conformance/openkbp10), plus a class no map contains (its
//! Dice is undefined everywhere) and a case whose prediction is missing (a real failure).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use calamine::{open_workbook, Data, Reader, Xlsx};
use evald::evaluation::{Evaluation, Failure, RunMeta, Stage};
use evald::metrics::{self, aggregate::Metric, EvalSpec};

use crate::util::data;

/// openkbp10 classes (labels 1-7) plus label 9, which no map contains.
pub const CLASSES: [(u8, &str); 8] = [
    (1, "brainstem"),
    (2, "spinal cord"),
    (3, "parotid R"),
    (4, "parotid L"),
    (5, "esophagus"),
    (6, "larynx"),
    (7, "mandible"),
    (9, "absent"),
];

/// Score openkbp10 (real files) into an Evaluation for vendor `acme`, submission `name`.
/// `predictions` = None scores the references against themselves (a perfect model).
pub fn openkbp_eval(name: &str, predictions: Option<&Path>) -> Evaluation {
    let labels = data("conformance/openkbp10/labelsTs");
    let preds = predictions.map_or_else(|| labels.clone(), Path::to_path_buf);
    let mut spec = EvalSpec::for_classes(&CLASSES);
    spec.positive_class = Some(6);
    spec.min_positive_mm3 = 0.0;
    spec.classes[5].lesion = true; // larynx: lesion-wise detection on
    let mut cases = Vec::new();
    let mut failures = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&labels)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".nii.gz")
                .to_string()
        })
        .collect();
    names.sort();
    names.push("pt_999".into()); // no such files: a real read failure
    for case in &names {
        let r = labels.join(format!("{case}.nii.gz"));
        let p = preds.join(format!("{case}.nii.gz"));
        match metrics::evaluate_files(case, &r, &p, &spec) {
            Ok(m) => cases.push(m),
            Err(e) => failures.push(Failure {
                case: case.clone(),
                stage: Stage::Read,
                reason: e.to_string(),
                attempts: 1,
            }),
        }
    }
    assert_eq!(cases.len(), 10, "openkbp10 has 10 scorable cases");
    let meta = RunMeta {
        task: "head-neck".into(),
        vendor: Some("acme".into()),
        submission: Some(name.into()),
        submission_dir: None,
        model_sha256: Some("ab".repeat(32)),
        labels_dir: labels.clone(),
        inputs_dir: preds,
        dataset_hash: "0f".repeat(32),
        devices: vec!["cpu".into()],
        evald_version: env!("CARGO_PKG_VERSION").into(),
        model_format: None,
        runtime: None,
        config_digest: Some("cd".repeat(32)),
        started: "2026-11-26T10:00:00Z".into(),
        finished: "2026-11-26T10:01:00Z".into(),
        timings: vec![("metrics".into(), 1.25), ("total".into(), 2.5)],
        stopped_early: None,
    };
    Evaluation::new(spec, cases, failures, meta)
}

/// The perturbed predictions of openkbp10.
pub fn openkbp_predictions() -> PathBuf {
    data("conformance/openkbp10/predictions")
}

/// Write summary.json and report.xlsx of `eval` into `dir`.
pub fn write_both(eval: &Evaluation, dir: &Path) -> (serde_json::Value, PathBuf) {
    let summary = dir.join("summary.json");
    evald::evaluation::summary::write(eval, &summary).unwrap();
    let report = dir.join("report.xlsx");
    evald::report::write(eval, &report).unwrap();
    (crate::util::read_json(&summary), report)
}

type Sheet = calamine::Range<Data>;

fn sheet(wb: &mut Xlsx<std::io::BufReader<std::fs::File>>, name: &str) -> Sheet {
    wb.worksheet_range(name)
        .unwrap_or_else(|e| panic!("sheet {name}: {e}"))
}

fn cell(s: &Sheet, r: usize, c: usize) -> &Data {
    s.get((r, c)).unwrap_or(&Data::Empty)
}

fn text(s: &Sheet, r: usize, c: usize) -> String {
    match cell(s, r, c) {
        Data::String(t) => t.clone(),
        Data::Empty => String::new(),
        other => other.to_string(),
    }
}

fn number(d: &Data) -> Option<f64> {
    match d {
        Data::Float(f) => Some(*f),
        Data::Int(i) => Some(*i as f64),
        Data::Empty => None,
        other => panic!("expected a number or an empty cell, found {other:?}"),
    }
}

/// A JSON value as the report must show it: null -> empty cell.
fn expected(v: &serde_json::Value) -> Option<f64> {
    if v.is_null() {
        None
    } else {
        Some(v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")))
    }
}

fn header_map(s: &Sheet, row: usize) -> BTreeMap<String, usize> {
    (0..s.width())
        .map(|c| (text(s, row, c), c))
        .filter(|(t, _)| !t.is_empty())
        .collect()
}

/// Row index of the first row whose column 0 text is `t`.
fn find_row(s: &Sheet, col: usize, t: &str) -> usize {
    (0..s.height())
        .find(|&r| text(s, r, col) == t)
        .unwrap_or_else(|| panic!("no row with '{t}' in column {col}"))
}

#[test]
fn workbook_numbers_equal_summary_json() {
    let dir = tempfile::tempdir().unwrap();
    let eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    let (json, report) = write_both(&eval, dir.path());
    let mut wb: Xlsx<_> = open_workbook(&report).unwrap();
    assert_eq!(
        wb.sheet_names(),
        evald::report::SHEETS.map(String::from).to_vec()
    );

    // Cases: one row per case x class, every key of summary.json's per-label dicts.
    let cases = sheet(&mut wb, "Cases");
    let h = header_map(&cases, 0);
    let per_case = json["metric_per_case"].as_array().unwrap();
    assert_eq!(cases.height() - 1, per_case.len() * CLASSES.len());
    let mut checked = 0;
    let mut empty_cells = 0;
    for r in 1..cases.height() {
        let case = text(&cases, r, h["case"]);
        let label = number(cell(&cases, r, h["label"])).unwrap() as u8;
        let entry = per_case
            .iter()
            .find(|c| {
                c["reference_file"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/{case}.nii.gz"))
            })
            .unwrap_or_else(|| panic!("{case} not in summary.json"));
        let m = &entry["metrics"][label.to_string()];
        let keys = m.as_object().unwrap();
        for key in Metric::ALL.map(Metric::key) {
            match (keys.get(key), h.get(key)) {
                (Some(v), Some(&c)) => {
                    let got = number(cell(&cases, r, c));
                    assert_eq!(got, expected(v), "Cases {case} label {label} {key}");
                    empty_cells += usize::from(got.is_none());
                    checked += 1;
                }
                // Computed for other classes only (lesion keys): an empty cell here.
                (None, Some(&c)) => assert_eq!(
                    number(cell(&cases, r, c)),
                    None,
                    "Cases {case} label {label} {key} is not computed for this class"
                ),
                (None, None) => {}
                (Some(_), None) => panic!("{key} is in summary.json but not in Cases"),
            }
        }
        assert_eq!(
            text(&cases, r, h["reference_file"]),
            entry["reference_file"].as_str().unwrap()
        );
    }
    assert!(checked > 1000, "{checked} values checked");
    // The absent class has undefined Dice/IoU in every case: empty cells, never 0.
    assert!(empty_cells >= 20, "{empty_cells} empty cells");

    // Summary: the statistics table equals evald.statistics, the headline equals mean.
    let summary = sheet(&mut wb, "Summary");
    let stats = &json["evald"]["statistics"];
    let top = find_row(&summary, 2, "Metric");
    let sh = header_map(&summary, top);
    let mut n_stats = 0;
    for r in top + 1..summary.height() {
        let metric = text(&summary, r, sh["Metric"]);
        if metric.is_empty() {
            break;
        }
        // Class rows carry their label; the foreground rows (each case's mean over
        // classes) have none and are summary.json's `statistics.foreground`.
        let label = match number(cell(&summary, r, sh["Label"])) {
            Some(l) => (l as u8).to_string(),
            None => {
                assert_eq!(text(&summary, r, sh["Class"]), "foreground");
                "foreground".to_string()
            }
        };
        let s = &stats[&label][&metric];
        assert!(
            s.is_object(),
            "{label} {metric} not in summary.json statistics"
        );
        for (col, key) in [
            ("n", "n"),
            ("n undefined", "n_nan"),
            ("mean", "mean"),
            ("std", "std"),
            ("median", "median"),
            ("p25", "p25"),
            ("p75", "p75"),
            ("min", "min"),
            ("max", "max"),
        ] {
            assert_eq!(
                number(cell(&summary, r, sh[col])),
                expected(&s[key]),
                "Summary statistics {label} {metric} {col}"
            );
        }
        assert_eq!(
            number(cell(&summary, r, sh["CI95 low"])),
            expected(&s["ci95"][0])
        );
        assert_eq!(
            number(cell(&summary, r, sh["CI95 high"])),
            expected(&s["ci95"][1])
        );
        n_stats += 1;
    }
    let stat_count: usize = stats
        .as_object()
        .unwrap()
        .values()
        .map(|m| m.as_object().unwrap().len())
        .sum();
    assert_eq!(
        n_stats, stat_count,
        "every statistic is in the Summary sheet"
    );
    let head = find_row(&summary, 0, "Class");
    let hh = header_map(&summary, head);
    for (i, (label, name)) in CLASSES.iter().enumerate() {
        let r = head + 1 + i;
        assert_eq!(text(&summary, r, 0), *name);
        let mean = &json["mean"][label.to_string()];
        assert_eq!(
            number(cell(&summary, r, hh["Dice"])),
            expected(&mean["Dice"])
        );
        assert_eq!(number(cell(&summary, r, hh["IoU"])), expected(&mean["IoU"]));
        assert_eq!(
            number(cell(&summary, r, hh["HD95 (mm)"])),
            expected(&mean["HD95"])
        );
        assert_eq!(number(cell(&summary, r, hh["NSD"])), expected(&mean["NSD"]));
    }
    let fg = head + 1 + CLASSES.len();
    assert_eq!(text(&summary, fg, 0), "foreground mean");
    assert_eq!(
        number(cell(&summary, fg, hh["Dice"])),
        expected(&json["foreground_mean"]["Dice"])
    );
    let pl = find_row(&summary, 0, "Patients");
    let ph = header_map(&summary, pl);
    let p = &json["evald"]["patient_level"];
    for (col, key) in [
        ("TP", "tp"),
        ("FP", "fp"),
        ("FN", "fn"),
        ("TN", "tn"),
        ("Sensitivity", "sensitivity"),
        ("Specificity", "specificity"),
        ("PPV", "ppv"),
        ("NPV", "npv"),
        ("Accuracy", "accuracy"),
    ] {
        assert_eq!(
            number(cell(&summary, pl + 1, ph[col])),
            expected(&p[key]),
            "patient level {col}"
        );
    }

    // Confusion: the voxel matrix equals summary.json's.
    let conf = sheet(&mut wb, "Confusion");
    let matrix = json["evald"]["confusion_matrix"]["matrix"]
        .as_array()
        .unwrap();
    let top = find_row(&conf, 0, "reference \\ prediction");
    assert_eq!(text(&conf, top, 1), "background / other");
    assert_eq!(text(&conf, top, 2), "brainstem");
    for (i, row) in matrix.iter().enumerate() {
        for (j, v) in row.as_array().unwrap().iter().enumerate() {
            assert_eq!(
                number(cell(&conf, top + 1 + i, 1 + j)),
                Some(v.as_f64().unwrap()),
                "confusion [{i}][{j}]"
            );
        }
    }
    let two = find_row(&conf, 0, "reference positive");
    assert_eq!(number(cell(&conf, two, 1)), expected(&p["tp"]));
    assert_eq!(number(cell(&conf, two, 2)), expected(&p["fn"]));
    assert_eq!(number(cell(&conf, two + 1, 1)), expected(&p["fp"]));
    assert_eq!(number(cell(&conf, two + 1, 2)), expected(&p["tn"]));

    // Failures: the missing case, as summary.json lists it.
    let fails = sheet(&mut wb, "Failures");
    let jf = json["evald"]["failures"].as_array().unwrap();
    assert_eq!(jf.len(), 1);
    assert_eq!(text(&fails, 1, 0), jf[0]["case"].as_str().unwrap());
    assert_eq!(text(&fails, 1, 1), "read");
    assert_eq!(text(&fails, 1, 2), jf[0]["reason"].as_str().unwrap());
    assert_eq!(number(cell(&fails, 1, 3)), Some(1.0));

    // Slices: per case and class, the slice counts add up to the case's counts, and each
    // row's Dice/IoU follow from its counts; slices where neither map has the class are
    // left out.
    let slices = sheet(&mut wb, "Slices");
    let sh = header_map(&slices, 0);
    let mut sums: BTreeMap<(String, u8), [f64; 3]> = BTreeMap::new();
    for r in 1..slices.height() {
        let case = text(&slices, r, sh["case"]);
        let label = number(cell(&slices, r, sh["label"])).unwrap() as u8;
        let c: Vec<f64> = ["TP", "FP", "FN"]
            .iter()
            .map(|k| number(cell(&slices, r, sh[*k])).unwrap())
            .collect();
        assert!(
            c.iter().sum::<f64>() > 0.0,
            "an empty slice is listed at row {r}"
        );
        let dice = number(cell(&slices, r, sh["Dice"])).unwrap();
        assert!((dice - 2.0 * c[0] / (2.0 * c[0] + c[1] + c[2])).abs() < 1e-12);
        let s = sums.entry((case, label)).or_default();
        for k in 0..3 {
            s[k] += c[k];
        }
    }
    for entry in per_case {
        let case = Path::new(entry["reference_file"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".nii.gz")
            .to_string();
        for (label, m) in entry["metrics"].as_object().unwrap() {
            let l: u8 = label.parse().unwrap();
            let got = sums.get(&(case.clone(), l)).copied().unwrap_or_default();
            let want = ["TP", "FP", "FN"].map(|k| m[k].as_f64().unwrap());
            assert_eq!(got, want, "Slices sums of {case} label {l}");
        }
    }

    // Run: provenance as given.
    let run = sheet(&mut wb, "Run");
    let r = find_row(&run, 0, "config digest");
    assert_eq!(text(&run, r, 1), "cd".repeat(32));
    let r = find_row(&run, 0, "test set content hash");
    assert_eq!(text(&run, r, 1), "0f".repeat(32));
    let r = find_row(&run, 0, "total");
    assert_eq!(number(cell(&run, r, 1)), Some(2.5));
}

/// Names and contents of the parts of an xlsx (a zip).
fn parts(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().to_string(), b)
        })
        .collect()
}

fn sheet_xml(parts: &BTreeMap<String, Vec<u8>>, index: usize) -> String {
    String::from_utf8(parts[&format!("xl/worksheets/sheet{index}.xml")].clone()).unwrap()
}

#[test]
fn workbook_has_native_charts_the_plot_and_no_formulas() {
    let dir = tempfile::tempdir().unwrap();
    let eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    let (_, report) = write_both(&eval, dir.path());
    let p = parts(&report);
    // Histogram + scatter + one sorted column chart per class with a defined Dice (7).
    let charts: Vec<&String> = p
        .keys()
        .filter(|k| k.starts_with("xl/charts/chart"))
        .collect();
    assert_eq!(charts.len(), 2 + 7, "{charts:?}");
    let all_charts: String = charts
        .iter()
        .map(|k| String::from_utf8_lossy(&p[*k]).into_owned())
        .collect();
    assert!(all_charts.contains("<c:scatterChart>"));
    assert_eq!(all_charts.matches("<c:barChart>").count(), 8);
    assert!(
        all_charts.contains("Charts!$"),
        "series read the Charts sheet"
    );
    // The Dice plot, a real PNG, on the Summary sheet.
    let png = &p["xl/media/image1.png"];
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(String::from_utf8_lossy(&p["xl/worksheets/_rels/sheet1.xml.rels"]).contains("drawing"));
    // Cases (sheet 3): frozen header, autofilter, colour scales on Dice/IoU/NSD.
    let cases = sheet_xml(&p, 3);
    assert!(cases.contains("<pane ") && cases.contains("state=\"frozen\""));
    assert!(cases.contains("<autoFilter "));
    assert!(cases.matches("<colorScale>").count() >= 3);
    // Slices (sheet 4, constant memory): the same, written as inline strings.
    let slices = sheet_xml(&p, 4);
    assert!(slices.contains("state=\"frozen\"") && slices.contains("<autoFilter "));
    assert!(slices.contains("t=\"inlineStr\""), "constant-memory sheet");
    // No formulas anywhere: every number is a value computed once.
    for (name, bytes) in &p {
        if name.starts_with("xl/worksheets/sheet") {
            let xml = String::from_utf8_lossy(bytes);
            assert!(
                !xml.contains("<f>") && !xml.contains("<f "),
                "formula in {name}"
            );
        }
    }
    // Never Excel's NAN/INF text for an undefined number.
    let mut wb: Xlsx<_> = open_workbook(&report).unwrap();
    for name in evald::report::SHEETS {
        let s = sheet(&mut wb, name);
        for row in s.rows() {
            for c in row {
                if let Data::String(t) = c {
                    assert!(!matches!(t.as_str(), "NAN" | "INF" | "-INF"), "{name}: {t}");
                }
                if let Data::Float(f) = c {
                    assert!(f.is_finite(), "{name}: {f}");
                }
            }
        }
    }
}

#[test]
fn report_is_replaced_atomically_and_the_previous_one_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.xlsx");
    let v2 = openkbp_eval("v2", None);
    evald::report::write(&v2, &path).unwrap();
    let first = std::fs::read(&path).unwrap();
    let v3 = openkbp_eval("v3", Some(&openkbp_predictions()));
    evald::report::write(&v3, &path).unwrap();
    evald::report::write(&v3, &path).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".xlsx")),
        "no temp files left: {names:?}"
    );
    let kept: Vec<&String> = names.iter().filter(|n| n.starts_with("report-")).collect();
    assert_eq!(kept.len(), 2, "{names:?}");
    // The first report survives byte for byte under a history name.
    assert!(
        kept.iter()
            .any(|k| std::fs::read(dir.path().join(k)).unwrap() == first),
        "the first report was not kept"
    );
    let mut wb: Xlsx<_> = open_workbook(&path).unwrap();
    let s = sheet(&mut wb, "Summary");
    assert!(text(&s, 0, 0).ends_with("acme / v3"), "{}", text(&s, 0, 0));

    // A failed write leaves the current report alone: the folder is a file here.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let err = evald::report::write(&v3, &blocker.join("report.xlsx")).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
}

/// A test-set-sized evaluation, scored for real: `cases` volumes of 40x40x`slices` voxels
/// where both classes are present (and imperfect) in every slice.
fn big_eval(cases: usize, slices: usize) -> Evaluation {
    use evald::volume::{Geometry, Volume};
    let spec = {
        let mut s = EvalSpec::for_classes(&[(1, "thyroid"), (2, "nodule")]);
        s.surface = false;
        s
    };
    let (nx, ny) = (40usize, 40usize);
    let geom = Geometry::axis_aligned([nx, ny, slices], [0.8, 0.8, 2.5], [0.0; 3]);
    let mut scored = Vec::new();
    for c in 0..cases {
        let mut r = vec![0u8; nx * ny * slices];
        let mut p = r.clone();
        for z in 0..slices {
            for y in 0..ny {
                for x in 0..nx {
                    let i = x + nx * (y + ny * z);
                    let s = (c + z) % 5;
                    // Each class under half the slice (real anatomy is much smaller).
                    r[i] = if x < 12 {
                        1
                    } else if (20..26).contains(&x) && y < 10 {
                        2
                    } else {
                        0
                    };
                    p[i] = if x < 12 + s && y > s {
                        1
                    } else if (20..27).contains(&x) && y < 10 - s {
                        2
                    } else {
                        0
                    };
                }
            }
        }
        let rv = Volume {
            geom: geom.clone(),
            data: r,
        };
        let pv = Volume {
            geom: geom.clone(),
            data: p,
        };
        let name = format!("case_{c:03}");
        let f = PathBuf::from(format!("{name}.nii.gz"));
        scored.push(metrics::evaluate_case(&name, &rv, &f, pv, &f, &spec).unwrap());
    }
    Evaluation::new(spec, scored, Vec::new(), RunMeta::default())
}

fn peak_rss_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

#[test]
fn slices_sheet_stays_fast_and_small_at_test_set_scale() {
    // 300 cases x 300 slices x 2 classes = 180,000 slice rows, every one listed.
    let eval = big_eval(300, 300);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.xlsx");
    let hwm_before = peak_rss_kb();
    let t = std::time::Instant::now();
    evald::report::write(&eval, &path).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).unwrap().len();
    // Informative only (other tests share the process): the peak grows little while the
    // Slices rows stream to disk. The time is printed, not asserted: a loaded CI machine
    // is no failure of the report (scripts/bench.sh is where speed is measured).
    eprintln!(
        "report of 300 cases x 300 slices x 2 classes: {secs:.2} s, {size} bytes, process peak RSS {hwm_before:?} -> {:?} kB",
        peak_rss_kb()
    );
    assert!(size < 12 << 20, "{size} bytes");
    let mut wb: Xlsx<_> = open_workbook(&path).unwrap();
    let s = sheet(&mut wb, "Slices");
    assert_eq!(s.height(), 1 + 300 * 300 * 2);
}

#[test]
fn lesion_rows_equal_summary_json() {
    use evald::metrics::{LesionMetrics, LesionRow};
    let dir = tempfile::tempdir().unwrap();
    let mut eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    // Known lesion rows in exactly two cases (whatever the matcher found elsewhere is
    // cleared), so the sheet's layout and numbers are checked against a fixed count.
    for case in &mut eval.cases {
        for m in &mut case.classes {
            m.lesions = None;
        }
    }
    for (ci, n) in [(0usize, 2u32), (3, 1)] {
        let m = &mut eval.cases[ci].classes[5];
        let rows: Vec<LesionRow> = (1..=n)
            .flat_map(|id| {
                [
                    LesionRow {
                        source: "reference",
                        id,
                        volume_ml: 0.25 * f64::from(id),
                        matched_with: Some(id),
                        dice: 0.5 + 0.1 * f64::from(id),
                        centroid_vox: [10.0, 20.5, 30.25],
                    },
                    LesionRow {
                        source: "prediction",
                        id,
                        volume_ml: 0.2 * f64::from(id),
                        matched_with: None,
                        dice: f64::NAN,
                        centroid_vox: [11.0, 21.5, 31.25],
                    },
                ]
            })
            .collect();
        m.lesions = Some(LesionMetrics {
            tp: n,
            fp: 0,
            fn_: 0,
            precision: 1.0,
            recall: 1.0,
            f1: 1.0,
            mean_matched_dice: 0.6,
            lesions: rows,
        });
    }
    let (json, report) = write_both(&eval, dir.path());
    let mut wb: Xlsx<_> = open_workbook(&report).unwrap();
    let s = sheet(&mut wb, "Lesions");
    let h = header_map(&s, 0);
    let want: Vec<(String, &serde_json::Value)> = json["evald"]["lesions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            let case = c["case"].as_str().unwrap().to_string();
            c["lesions"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |l| (case.clone(), l))
        })
        .collect();
    assert_eq!(want.len(), 6);
    assert_eq!(s.height() - 1, want.len());
    for (r, (case, l)) in want.iter().enumerate() {
        let r = r + 1;
        assert_eq!(&text(&s, r, h["case"]), case);
        assert_eq!(text(&s, r, h["class"]), "larynx");
        assert_eq!(text(&s, r, h["source"]), l["source"].as_str().unwrap());
        assert_eq!(number(cell(&s, r, h["lesion"])), expected(&l["id"]));
        assert_eq!(
            number(cell(&s, r, h["volume_ml"])),
            expected(&l["volume_ml"])
        );
        assert_eq!(
            number(cell(&s, r, h["matched_with"])),
            expected(&l["matched_with"])
        );
        assert_eq!(number(cell(&s, r, h["Dice"])), expected(&l["dice"]));
        for (i, k) in ["centroid_x", "centroid_y", "centroid_z"]
            .iter()
            .enumerate()
        {
            assert_eq!(number(cell(&s, r, h[*k])), expected(&l["centroid_vox"][i]));
        }
    }
    // The per-case detection numbers sit in Cases beside the other keys.
    let cases = sheet(&mut wb, "Cases");
    let ch = header_map(&cases, 0);
    let row = (1..cases.height())
        .find(|&r| text(&cases, r, 0) == eval.cases[0].case && text(&cases, r, 1) == "larynx")
        .unwrap();
    assert_eq!(number(cell(&cases, row, ch["LesionTP"])), Some(2.0));
    assert_eq!(
        number(cell(&cases, row, ch["LesionMeanMatchedDice"])),
        Some(0.6)
    );
}

#[test]
fn a_run_where_every_case_failed_still_gets_a_report_and_an_email() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data("conformance/openkbp10/labelsTs");
    let spec = EvalSpec::for_classes(&CLASSES[..2]);
    let failures: Vec<Failure> = ["pt_13", "pt_17"]
        .iter()
        .map(|case| {
            let e = metrics::evaluate_files(
                case,
                &labels.join(format!("{case}.nii.gz")),
                &dir.path().join(format!("missing/{case}.nii.gz")),
                &spec,
            )
            .unwrap_err();
            Failure {
                case: case.to_string(),
                stage: Stage::Read,
                reason: e.to_string(),
                attempts: 3,
            }
        })
        .collect();
    let meta = RunMeta {
        task: "head-neck".into(),
        vendor: Some("acme".into()),
        submission: Some("broken".into()),
        ..RunMeta::default()
    };
    let eval = Evaluation::new(spec, Vec::new(), failures, meta);
    let (json, report) = write_both(&eval, dir.path());
    assert_eq!(json["evald"]["cases_failed"], 2);
    let mut wb: Xlsx<_> = open_workbook(&report).unwrap();
    let fails = sheet(&mut wb, "Failures");
    assert_eq!(
        (text(&fails, 1, 0), text(&fails, 2, 0)),
        ("pt_13".into(), "pt_17".into())
    );
    let charts = sheet(&mut wb, "Charts");
    assert!(text(&charts, 3, 0).starts_with("No case has a defined Dice"));
    let m = evald::mail::compose(
        &eval,
        &["ai-eval@example.org".into()],
        None,
        Some(&report),
        &evald::config::MailSettings {
            transport: evald::config::MailTransport::File,
            outbox_dir: dir.path().join("outbox"),
            from: "evald <evald@localhost>".into(),
            attach_max_bytes: 1 << 20,
        },
    )
    .unwrap();
    assert_eq!(
        m.subject,
        "[evald] head-neck / acme / broken: no case scored, 0/2 cases"
    );
    assert!(m.text.contains("Failed cases (2):"));
    assert!(m.plot_png.is_some());
}
