//! The real binary: demo end to end, score's reporting of missing/extra cases, run's errors.

use crate::util::{data, evald, read_json, run_ok, Demo};

#[test]
fn demo_runs_the_whole_pipeline_and_says_where_the_outputs_are() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::run(&dir.path().join("d"), 4, "64,64,16");
    let summary = read_json(&demo.path("summary"));
    assert_eq!(summary["evald"]["cases_scored"], 4);
    // The demo vendor is a good model (the phantoms are easy): a demo that showed a
    // failing model would make the pipeline look broken.
    let dice = |label: &str| summary["mean"][label]["Dice"].as_f64().unwrap();
    assert!(dice("1") > 0.9, "demo thyroid Dice {}", dice("1"));
    assert!(dice("2") > 0.7, "demo nodule Dice {}", dice("2"));
    let patient = &summary["evald"]["patient_level"];
    assert_eq!(patient["fp"], 0, "{patient}");
    assert!(demo.path("report").is_file());
}

#[test]
fn score_reports_missing_and_extra_cases_instead_of_skipping_them() {
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("p");
    std::fs::create_dir_all(&preds).unwrap();
    let src = data("conformance/openkbp10/predictions");
    std::fs::copy(src.join("pt_13.nii.gz"), preds.join("pt_13.nii.gz")).unwrap();
    std::fs::copy(src.join("pt_17.nii.gz"), preds.join("unknown_case.nii.gz")).unwrap();
    let out = dir.path().join("s.json");
    let o = run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--labels"])
            .arg(data("conformance/openkbp10/labelsTs"))
            .arg("--predictions")
            .arg(&preds)
            .arg("--out")
            .arg(&out),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("unknown_case") && stderr.contains("has no reference"),
        "{stderr}"
    );
    let s = read_json(&out);
    assert_eq!(s["evald"]["cases_scored"], 1);
    let failures = s["evald"]["failures"].as_array().unwrap();
    assert_eq!(
        failures.len(),
        9,
        "the 9 cases without prediction are listed as failures"
    );
    assert!(failures.iter().all(|f| f["stage"] == "missing"));
}

#[test]
fn run_with_a_missing_config_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let o = evald()
        .args(["run"])
        .arg(dir.path())
        .args(["--config"])
        .arg(dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("nope.toml") && e.contains("no such file"), "{e}");
}

/// The layout `scripts/install.sh` makes (`<prefix>/bin/evald`, libtorch in
/// `<prefix>/lib/evald/torch/lib`): the binary loads libtorch from beside itself, so the
/// service never reads the build checkout (hidden by `ProtectHome=yes` when under /home).
#[test]
fn an_installed_binary_loads_libtorch_from_beside_itself() {
    let prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bin = prefix.path().join("bin/evald");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    // A hard link where possible ($ORIGIN is the binary's real folder, so not a symlink).
    if std::fs::hard_link(env!("CARGO_BIN_EXE_evald"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_evald"), &bin).unwrap();
    }
    let lib = prefix.path().join("lib/evald");
    std::fs::create_dir_all(&lib).unwrap();
    // Links to the checkout's copies stand in for the copies install.sh makes.
    let site = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch/site");
    for dir in ["torch", "nvidia"] {
        std::os::unix::fs::symlink(site.join(dir), lib.join(dir)).unwrap();
    }
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .env("LD_DEBUG", "libs")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let debug = String::from_utf8_lossy(&out.stderr);
    // ld.so names them by the RUNPATH it expanded: $ORIGIN/../lib/evald/torch/lib, then
    // libtorch's own $ORIGIN/../../nvidia/cu13/lib.
    let torch_lib = prefix.path().join("bin/../lib/evald/torch/lib");
    for (name, path) in [
        ("libtorch_cpu.so", torch_lib.join("libtorch_cpu.so")),
        (
            "libcudart.so.13",
            torch_lib.join("../../nvidia/cu13/lib/libcudart.so.13"),
        ),
    ] {
        assert!(
            debug.contains(&format!("calling init: {}", path.display())),
            "{name} not loaded from {}:\n{}",
            path.display(),
            debug
                .lines()
                .filter(|l| l.contains("calling init"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Labels outside the task's classes (a model with an extra output channel, a reference
/// with an extra structure) count as background: the Cases sheet and summary.json say so,
/// with their voxel counts, instead of scoring them silently.
#[test]
fn labels_outside_the_task_are_listed_not_scored_silently() {
    use evald::volume;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let set = evald::phantom::generate(&dir.path().join("d"), 1, [24, 24, 6], [1.0, 1.0, 2.0], 3)
        .unwrap();
    let case = &set.cases[0].id;
    let ref_file = set.labels.join(format!("{case}.nii.gz"));
    let mut pred = volume::read_labels(&ref_file).unwrap();
    // 7 voxels of a label the task does not have (classes 1 and 2).
    let background: Vec<usize> = (0..pred.data.len())
        .filter(|&i| pred.data[i] == 0)
        .collect();
    for &i in background.iter().take(7) {
        pred.data[i] = 5;
    }
    let preds = dir.path().join("p");
    std::fs::create_dir_all(&preds).unwrap();
    volume::write_volume(&preds.join(format!("{case}.nii.gz")), &pred).unwrap();
    let out = dir.path().join("s.json");
    let report = dir.path().join("r.xlsx");
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--labels"])
            .arg(&set.labels)
            .arg("--predictions")
            .arg(&preds)
            .arg("--out")
            .arg(&out)
            .arg("--report")
            .arg(&report),
    );
    let s = read_json(&out);
    let listed = s["evald"]["unevaluated_labels"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["label"], 5);
    assert_eq!(listed[0]["prediction_voxels"], 7);
    assert_eq!(listed[0]["reference_voxels"], 0);
    // Scored as background: the prediction equals the reference on the task's classes.
    let m = &s["metric_per_case"][0]["metrics"];
    for class in ["1", "2"] {
        assert_eq!(
            (&m[class]["FP"], &m[class]["FN"]),
            (&json!(0), &json!(0)),
            "{m}"
        );
    }
    use calamine::{open_workbook, Reader, Xlsx};
    let mut wb: Xlsx<_> = open_workbook(&report).unwrap();
    let cases = wb.worksheet_range("Cases").unwrap();
    let note = cases
        .rows()
        .flat_map(|r| r.iter().map(|c| c.to_string()))
        .find(|c| c.contains("outside the task's classes"))
        .expect("a note in the Cases sheet");
    assert!(
        note.contains("label 5 (prediction 7 voxels, reference 0)"),
        "{note}"
    );
}
