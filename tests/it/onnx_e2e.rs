//! An ONNX submission as a vendor drops it (`model.onnx` + `submission.toml` with
//! `format = "onnx"`), evaluated by the real binary, `evald run` and `evald serve`, through
//! the worker pool with the sandbox required (so ONNX Runtime loads under landlock and
//! seccomp from what its format grants). The test set is the stored CT of tests/data/infer
//! with PyTorch's own labels of the model the ONNX file was exported from
//! (tests/data/onnx/e2e/labels, from models/unet2d.pt): the ONNX model must score Dice 1
//! against its torch twin, and the report must say it ran as ONNX on ONNX Runtime.

use std::path::{Path, PathBuf};

use calamine::{Data, Reader};
use evald::store::State;

use crate::daemon::{wait_state, write_files, Daemon, Env, Opts};
use crate::util::{data, evald, read_json, run_ok};

const MANIFEST: &[u8] = b"format = \"onnx\"\ninput = \"slices2d\"\noutput = \"logits\"\n\
batch_size = 4\npad_multiple = 8\nwindow = { level = 40, width = 400 }\n";

/// `images/ct_0000.nii.gz` and its torch labels `labels/ct.nii.gz` under `root`.
fn test_set(root: &Path) -> (PathBuf, PathBuf) {
    let (images, labels) = (root.join("images"), root.join("labels"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    // nnU-Net naming: case `ct`, channel 0000.
    std::fs::copy(data("infer/ct.nii.gz"), images.join("ct_0000.nii.gz")).unwrap();
    std::fs::copy(data("onnx/e2e/labels/ct.nii.gz"), labels.join("ct.nii.gz")).unwrap();
    (images, labels)
}

/// The Run sheet's value for `key`.
fn run_sheet(report: &Path, key: &str) -> String {
    let mut wb: calamine::Xlsx<_> = calamine::open_workbook(report).unwrap();
    let run = wb.worksheet_range("Run").unwrap();
    let row = (0..run.height())
        .find(|&r| matches!(run.get((r, 0)), Some(Data::String(s)) if s == key))
        .unwrap_or_else(|| panic!("no '{key}' row in the Run sheet"));
    match run.get((row, 1)) {
        Some(Data::String(s)) => s.clone(),
        other => panic!("'{key}': {other:?}"),
    }
}

/// The ONNX model scored against its torch twin's labels, and named as what ran.
fn assert_onnx_report(sub: &Path) {
    let summary = read_json(&sub.join("summary.json"));
    assert_eq!(summary["evald"]["cases_scored"], 1, "{summary:#}");
    for label in ["1", "2"] {
        let dice = summary["mean"][label]["Dice"].as_f64().unwrap();
        assert_eq!(
            dice, 1.0,
            "class {label}: Dice against the torch model's labels"
        );
    }
    let run = &summary["evald"]["run"];
    assert_eq!(run["model_format"], "ONNX", "{run:#}");
    let runtime = run["runtime"].as_str().unwrap();
    assert!(runtime.starts_with("ONNX Runtime 1."), "{runtime}");
    let report = sub.join("report.xlsx");
    assert_eq!(run_sheet(&report, "model format"), "ONNX");
    assert_eq!(run_sheet(&report, "runtime"), runtime);
}

fn config(root: &Path, images: &Path, labels: &Path) -> PathBuf {
    let text = evald::cli::demo_config(root, images, labels).replace(
        "[pool]\n",
        "[pool]\nsandbox = \"required\"\nthreads_per_worker = 1\n",
    );
    let cfg = root.join("evald.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn submission(root: &Path, name: &str, model: &[u8]) -> PathBuf {
    let sub = root.join(format!("drop/thyroid-ca/acme/{name}"));
    write_files(
        &sub,
        &[("model.onnx", model), ("submission.toml", MANIFEST)],
    );
    sub
}

/// `evald run` on an ONNX submission: a report whose numbers are those of the torch model.
#[test]
fn evald_run_evaluates_an_onnx_submission() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (images, labels) = test_set(root);
    let cfg = config(root, &images, &labels);
    let model = std::fs::read(data("onnx/unet2d.onnx")).unwrap();
    let sub = submission(root, "onnx1", &model);
    run_ok(evald().arg("run").arg(&sub).arg("--config").arg(&cfg));
    assert_onnx_report(&sub);
}

/// Without its runtime library, an ONNX evaluation stops with evald's problem named
/// (where the library was looked for), not a verdict on the vendor's model.
#[test]
fn a_missing_onnx_runtime_is_an_installation_error_not_the_vendors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (images, labels) = test_set(root);
    let cfg = config(root, &images, &labels);
    let model = std::fs::read(data("onnx/unet2d.onnx")).unwrap();
    let sub = submission(root, "onnx1", &model);
    let missing = root.join("nowhere/libonnxruntime.so");
    let out = evald()
        .arg("run")
        .arg(&sub)
        .arg("--config")
        .arg(&cfg)
        .env(evald::infer::onnx::DYLIB_ENV, &missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("ONNX runtime unavailable") && err.contains(&*missing.to_string_lossy()),
        "{err}"
    );
    assert!(!sub.join("summary.json").exists());
}

/// The service: an ONNX submission dropped into the drop folder is evaluated and
/// reported; a file that is no ONNX model is rejected with the ONNX export instructions.
#[test]
fn the_service_evaluates_an_onnx_submission_and_rejects_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (images, labels) = test_set(&root);
    let env = Env {
        drop: root.join("drop"),
        state: root.join("state"),
        logs: root.join("logs"),
        cfg: root.join("evald.toml"),
        images,
        labels,
        dir,
    };
    std::fs::create_dir_all(env.drop.join("t")).unwrap();
    let opts = Opts {
        pool_extra: "sandbox = \"required\"\nthreads_per_worker = 1",
        ..Opts::default()
    };
    env.write_config(opts, &["t"]);
    let d = Daemon::start(&env);

    let good = env.sub("t/acme/onnx-good");
    let model = std::fs::read(data("onnx/unet2d.onnx")).unwrap();
    write_files(
        &good,
        &[("model.onnx", &model), ("submission.toml", MANIFEST)],
    );
    wait_state(&env, &d, &good, &[State::Reported, State::Mailed]);
    assert_onnx_report(&good);

    let broken = env.sub("t/acme/onnx-broken");
    write_files(
        &broken,
        &[
            ("model.onnx", b"this is not an ONNX protobuf"),
            ("submission.toml", MANIFEST),
        ],
    );
    let s = wait_state(
        &env,
        &d,
        &broken,
        &[State::Rejected, State::Mailed, State::Failed],
    );
    assert_eq!(s.state, State::Rejected, "{s:?}");
    let txt = std::fs::read_to_string(broken.join("REJECTED.txt")).unwrap();
    assert!(
        txt.contains("as ONNX") && txt.contains("torch.onnx.export"),
        "{txt}"
    );
    assert!(
        !txt.contains("torch.jit"),
        "TorchScript advice for an ONNX model:\n{txt}"
    );
}

/// The layout `scripts/install.sh` makes (`<prefix>/bin/evald`, ONNX Runtime in
/// `<prefix>/lib/evald/onnxruntime`): the binary loads ONNX Runtime from beside itself,
/// with no variable set, so the service never reads the build checkout.
#[test]
fn an_installed_binary_loads_onnx_runtime_from_beside_itself() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bin = prefix.path().join("bin/evald");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    if std::fs::hard_link(env!("CARGO_BIN_EXE_evald"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_evald"), &bin).unwrap();
    }
    let lib = prefix.path().join("lib/evald");
    std::fs::create_dir_all(lib.join("onnxruntime")).unwrap();
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    for d in ["torch", "nvidia"] {
        std::os::unix::fs::symlink(checkout.join(".libtorch/site").join(d), lib.join(d)).unwrap();
    }
    // Files of their own (hard links where possible), not links back into the checkout,
    // which the loader would resolve to the checkout's path.
    let ort = checkout.join(".onnxruntime/lib");
    for e in std::fs::read_dir(&ort).unwrap().flatten() {
        let to = lib.join("onnxruntime").join(e.file_name());
        if e.file_type().unwrap().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &to).unwrap();
        } else if std::fs::hard_link(e.path(), &to).is_err() {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
    let (images, labels) = test_set(root);
    let cfg = config(root, &images, &labels);
    let model = std::fs::read(data("onnx/unet2d.onnx")).unwrap();
    let sub = submission(root, "installed", &model);
    let out = run_ok(
        std::process::Command::new(&bin)
            .arg("run")
            .arg(&sub)
            .arg("--config")
            .arg(&cfg)
            .arg("--in-process")
            .env_remove(evald::infer::onnx::DYLIB_ENV)
            .env_remove("LD_LIBRARY_PATH")
            .env("LD_DEBUG", "libs"),
    );
    let debug = String::from_utf8_lossy(&out.stderr);
    let want = std::fs::canonicalize(lib.join("onnxruntime/libonnxruntime.so")).unwrap();
    assert!(
        debug.contains(&format!("calling init: {}", want.display())),
        "ONNX Runtime not loaded from {}:\n{}",
        want.display(),
        debug
            .lines()
            .filter(|l| l.contains("calling init") && l.contains("onnxruntime"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_onnx_report(&sub);
}
