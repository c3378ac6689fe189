//! nnU-Net v2 trained-model folders run natively (tests/data/nnunet/tinyct: a real
//! 2-fold folder made with nnunetv2 2.8.1, and nnU-Net's own CPU predictions): the labels
//! equal nnU-Net's bit for bit, for one fold and for the ensemble; and a folder dropped as
//! a vendor has it is evaluated by `evald run` and by the service, scoring what nnU-Net's
//! own predictions score.

use std::path::{Path, PathBuf};

use evald::infer::{InferSpec, InputKind, Model, ModelFormat, OutputKind, Window};
use evald::store::State;
use evald::volume;

use crate::daemon::{wait_state, Daemon, Env, Opts};
use crate::util::{evald, read_json, run_ok};

const TRAINER: &str = "nnUNetTrainer__nnUNetPlansTiny__3d_fullres";
const CASES: [&str; 2] = ["TinyCT_006", "TinyCT_007"];

fn tinyct() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tinyct")
}

/// A copy of the model folder with only `folds` (read-only copies are not needed here).
fn folder_with(root: &Path, folds: &[usize]) -> PathBuf {
    let from = tinyct().join("model").join(TRAINER);
    let to = root.join(TRAINER);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    for k in folds {
        let d = to.join(format!("fold_{k}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            from.join(format!("fold_{k}/checkpoint_final.pth")),
            d.join("checkpoint_final.pth"),
        )
        .unwrap();
    }
    to
}

/// What the task would say; nnU-Net's plans decide everything for this format.
fn spec() -> InferSpec {
    InferSpec {
        input: InputKind::Volume3d,
        output: OutputKind::Logits,
        window: Window {
            level: 40.0,
            width: 400.0,
        },
        batch_size: 1,
        patch_size: [32, 64, 64],
        overlap: 0.5,
        pad_multiple: 1,
        num_classes: 3,
    }
}

fn assert_nnunets_labels(run: &str, folds: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let folder = folder_with(dir.path(), folds);
    let model = Model::load_as(ModelFormat::NnUnet, &folder, "cpu", spec()).unwrap();
    for case in CASES {
        let image =
            volume::read_image(&tinyct().join(format!("imagesTs/{case}_0000.nii.gz"))).unwrap();
        let (ours, _) = model.predict(&image).unwrap();
        let theirs =
            volume::read_labels(&tinyct().join(format!("reference/{run}/{case}.nii.gz"))).unwrap();
        assert_eq!(ours.geom, theirs.geom, "{run} {case}");
        let differ = ours
            .data
            .iter()
            .zip(&theirs.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{run} {case}: {differ} of {} voxels differ from nnU-Net's own labels",
            ours.data.len()
        );
    }
}

#[test]
fn fold_0_gives_nnunets_own_labels_bit_for_bit() {
    assert_nnunets_labels("fold0", &[0]);
}

#[test]
fn the_two_fold_ensemble_gives_nnunets_own_labels_bit_for_bit() {
    assert_nnunets_labels("folds01", &[0, 1]);
}

/// Per-case Dice of a summary.json, by case file name.
fn dice(summary: &serde_json::Value) -> Vec<(String, f64, f64)> {
    let mut v: Vec<(String, f64, f64)> = summary["metric_per_case"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let r = Path::new(c["reference_file"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let d = |l: &str| c["metrics"][l]["Dice"].as_f64().unwrap();
            (r, d("1"), d("2"))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// What nnU-Net's own ensemble predictions score against the test set's labels
/// (`evald score` over nnU-Net's files: no model run by evald involved).
fn nnunets_own_dice(root: &Path) -> Vec<(String, f64, f64)> {
    let out = root.join("nnunet-own.json");
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--labels"])
            .arg(tinyct().join("labelsTs"))
            .arg("--predictions")
            .arg(tinyct().join("reference/folds01"))
            .arg("--out")
            .arg(&out),
    );
    dice(&read_json(&out))
}

fn assert_nnunet_report(sub: &Path, root: &Path) {
    let summary = read_json(&sub.join("summary.json"));
    assert_eq!(summary["evald"]["cases_scored"], 2, "{summary:#}");
    assert_eq!(dice(&summary), nnunets_own_dice(root));
    let run = &summary["evald"]["run"];
    assert_eq!(run["model_format"], "nnU-Net v2", "{run:#}");
    assert!(
        run["runtime"].as_str().unwrap().contains("nnunetv2 2.8.1"),
        "{run:#}"
    );
}

/// A vendor's submission folder: the trained-model folder as nnU-Net wrote it, no
/// manifest (the format is found by content).
fn submission(root: &Path, name: &str) -> PathBuf {
    let sub = root.join(format!("drop/t/acme/{name}"));
    std::fs::create_dir_all(&sub).unwrap();
    folder_with(&sub, &[0, 1]);
    sub
}

fn env(dir: tempfile::TempDir) -> Env {
    let root = dir.path().to_path_buf();
    Env {
        drop: root.join("drop"),
        state: root.join("state"),
        logs: root.join("logs"),
        cfg: root.join("evald.toml"),
        images: tinyct().join("imagesTs"),
        labels: tinyct().join("labelsTs"),
        dir,
    }
}

#[test]
fn evald_run_evaluates_an_nnunet_folder_and_saves_its_predictions() {
    let env = env(tempfile::tempdir().unwrap());
    env.write_config(
        Opts {
            pool_extra: "sandbox = \"required\"\nthreads_per_worker = 1",
            ..Opts::default()
        },
        &["t"],
    );
    let root = env.dir.path();
    let sub = submission(root, "nn1");
    let preds = root.join("preds");
    run_ok(
        evald()
            .arg("run")
            .arg(&sub)
            .arg("--config")
            .arg(&env.cfg)
            .arg("--save-predictions")
            .arg(&preds),
    );
    assert_nnunet_report(&sub, root);
    for case in CASES {
        let ours = volume::read_labels(&preds.join(format!("{case}.nii.gz"))).unwrap();
        let theirs =
            volume::read_labels(&tinyct().join(format!("reference/folds01/{case}.nii.gz")))
                .unwrap();
        assert_eq!(ours.data, theirs.data, "{case}");
    }
}

#[test]
fn the_service_evaluates_an_nnunet_folder_dropped_as_nnunet_wrote_it() {
    let env = env(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(env.drop.join("t")).unwrap();
    env.write_config(
        Opts {
            pool_extra: "sandbox = \"required\"\nthreads_per_worker = 1",
            ..Opts::default()
        },
        &["t"],
    );
    let d = Daemon::start(&env);
    let sub = submission(env.dir.path(), "nn-service");
    wait_state(&env, &d, &sub, &[State::Reported, State::Mailed]);
    assert_nnunet_report(&sub, env.dir.path());
}
