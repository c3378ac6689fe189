//! DICOM test sets end to end through the real binary (`format = "dicom"`): a run scores
//! exactly as against the fixture's independent truth NIfTI, an unmapped segment is a
//! config error, a refused case is one failure while the others are scored, and the
//! decoded cases come from the cache the second time.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::{case_metrics, data, evald, read_json, run_ok};

/// A DICOM test set of two case folders: `chest` (the real CT + its label-map SEG) and
/// `tilted` (a 15 degree gantry-tilt series, which must be refused), plus a junk file.
fn dicom_set(root: &Path) -> PathBuf {
    let set = root.join("set");
    let chest = set.join("chest");
    copy_dir(&data("dicom/ts-chest/ct"), &chest.join("ct"));
    std::fs::copy(
        data("dicom/ts-chest/seg-labelmap.dcm"),
        chest.join("seg-labelmap.dcm"),
    )
    .unwrap();
    std::fs::write(chest.join("notes.txt"), "not DICOM").unwrap();
    copy_dir(&data("dicom/refuse/tilt15"), &set.join("tilted"));
    set
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A config with one DICOM task `ct` (the demo model's two classes: liver -> 1,
/// spleen -> 2) and its state folder under `root`.
fn config(root: &Path, set: &Path, mapping: &str) -> PathBuf {
    let cfg = root.join("evald.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ndrop_dir = \"{d}/drop\"\nstate_dir = \"{d}/state\"\nlog_dir = \"{d}/log\"\n\n\
             [mail]\ntransport = \"file\"\noutbox_dir = \"{d}/outbox\"\n\n\
             [tasks.ct]\nformat = \"dicom\"\nimages = \"{s}\"\nlabels = \"{s}\"\n\
             classes = {{ 1 = \"liver\", 2 = \"spleen\" }}\nsurface_metrics = false\n\
             dicom_classes = {{ {mapping} }}\n",
            d = root.display(),
            s = set.display()
        ),
    )
    .unwrap();
    cfg
}

const FULL_MAPPING: &str =
    "liver = 1, \"SCT:78961009\" = 2, aorta = \"ignore\", vertebrae_T12 = \"ignore\", rib_left_12 = \"ignore\"";

/// A submission folder holding the demo TorchScript model (it segments by HU window, so
/// on real CT it predicts something for both classes: numbers to compare).
fn submission(root: &Path) -> PathBuf {
    let sub = root.join("drop/ct/vendor/v1");
    std::fs::create_dir_all(&sub).unwrap();
    evald::phantom::write_demo_model(&sub.join("model.pt")).unwrap();
    sub
}

fn run(cfg: &Path, sub: &Path, preds: &Path) -> Output {
    evald()
        .arg("run")
        .arg(sub)
        .arg("--config")
        .arg(cfg)
        .args(["--task", "ct", "--in-process", "--save-predictions"])
        .arg(preds)
        .env("EVALD_LOG", "info")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The fixture's truth label map (segment numbers) with the task's mapping applied:
/// liver 1, spleen 2, the ignored segments background.
fn truth_labels(dir: &Path) -> PathBuf {
    let mut v =
        evald::volume::read_labels(&data("dicom/ts-chest/seg-labelmap_truth.nii.gz")).unwrap();
    for x in &mut v.data {
        if *x > 2 {
            *x = 0;
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    evald::volume::write_volume(&dir.join("chest.nii.gz"), &v).unwrap();
    dir.to_path_buf()
}

#[test]
fn a_dicom_task_scores_like_its_truth_nifti_refuses_the_tilted_case_and_decodes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let set = dicom_set(root);
    let cfg = config(root, &set, FULL_MAPPING);
    let sub = submission(root);
    let preds = root.join("preds");

    let first = run(&cfg, &sub, &preds);
    let out = text(&first);
    assert!(first.status.success(), "{out}");
    assert!(out.contains("2 decoded"), "{out}");
    let summary = read_json(&sub.join("summary.json"));
    assert_eq!(summary["evald"]["cases_scored"], 1, "{summary}");

    // The tilted case: one failure naming the reason, the folder and the fix.
    let failures = summary["evald"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["case"], "tilted");
    assert_eq!(failures[0]["stage"], "reference");
    let why = failures[0]["reason"].as_str().unwrap();
    assert!(
        why.contains("gantry_tilt") && why.contains("tilted") && why.contains("15"),
        "{why}"
    );
    assert!(
        summary["evald"]["conventions"]["rtstruct_rasterisation"]
            .as_str()
            .unwrap()
            .contains("even-odd"),
        "{summary}"
    );

    // The same predictions scored against the fixture's truth NIfTI (pydicom/highdicom
    // made, not evald): every number equal.
    let truth = truth_labels(&root.join("truth"));
    let score_out = root.join("score.json");
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--labels"])
            .arg(&truth)
            .arg("--predictions")
            .arg(&preds)
            .arg("--out")
            .arg(&score_out),
    );
    let reference = read_json(&score_out);
    for class in ["1", "2"] {
        let ours = &case_metrics(&summary, "chest")[class];
        let theirs = &case_metrics(&reference, "chest")[class];
        assert!(ours["Dice"].as_f64().is_some(), "{ours}");
        assert_eq!(ours, theirs, "class {class}");
    }

    // Second run: both cases (the refused one too) come from the cache, none is decoded.
    let cache = root.join("state/dicom-cache");
    let entries = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("case.json").is_file())
            .count()
    };
    assert_eq!(entries(), 2);
    let second = run(&cfg, &sub, &preds);
    let out = text(&second);
    assert!(second.status.success(), "{out}");
    assert!(
        out.contains("2 from cache, 0 decoded"),
        "second run decoded again:\n{out}"
    );
    assert_eq!(entries(), 2);
    let again = read_json(&sub.join("summary.json"));
    assert_eq!(
        case_metrics(&again, "chest")["1"],
        case_metrics(&summary, "chest")["1"]
    );
}

#[test]
fn an_unmapped_segment_is_a_config_error_naming_the_key_and_the_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let set = dicom_set(root);
    // spleen, aorta, ... are not mapped.
    let cfg = config(root, &set, "liver = 1");
    let sub = submission(root);

    let o = run(&cfg, &sub, &root.join("preds"));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("tasks.ct.dicom_classes") && out.contains("'spleen'") && out.contains("chest"),
        "{out}"
    );
    assert!(!sub.join("summary.json").exists());

    let o = evald()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("tasks.ct.dicom_classes") && out.contains("'spleen'"),
        "{out}"
    );
}

#[test]
fn check_config_counts_a_dicom_set_and_lists_its_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let set = dicom_set(root);
    let cfg = config(root, &set, FULL_MAPPING);
    std::fs::create_dir_all(root.join("drop")).unwrap();
    let o = evald()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("DICOM, 2 case folder(s)") && out.contains("1 read, 1 refused"),
        "{out}"
    );
    assert!(out.contains("refused: case tilted"), "{out}");
}
