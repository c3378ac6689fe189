//! The worker pool against crashes, hangs, hostile models and escapes: real `evald worker`
//! processes (the built binary), small phantoms, CPU. Fixture models: tests/data/models/
//! `pool_*.pt` (made by `make_pool_fixtures.py` there).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use evald::config::{PoolSettings, SandboxPolicy};
use evald::dataset::{self, Dataset};
use evald::evaluation::{Failure, Stage};
use evald::exec::{Job, Totals};
use evald::infer::{InferSpec, InputKind, OutputKind, Window};
use evald::metrics::{CaseMetrics, EvalSpec};
use evald::pipeline;
use evald::pool::{PoolError, PoolPredictor};
use evald::volume::{self, Volume};

use crate::util::{data, evald, run_ok};

const GRID: [usize; 3] = [48, 48, 12];

fn settings(workers: usize, timeout_s: u64, max_attempts: u32) -> PoolSettings {
    PoolSettings {
        workers,
        devices: vec!["cpu".into()],
        case_timeout: Duration::from_secs(timeout_s),
        max_attempts,
        max_consecutive_timeouts: 0,
        submission_budget: None,
        threads_per_worker: 1,
        memory_max_bytes: 0,
        sandbox: SandboxPolicy::Required,
    }
}

fn spec() -> InferSpec {
    InferSpec {
        input: InputKind::Slices2d,
        output: OutputKind::Logits,
        window: Window {
            level: 40.0,
            width: 400.0,
        },
        batch_size: 6,
        patch_size: [16, 32, 32],
        overlap: 0.5,
        pad_multiple: 1,
        num_classes: 3,
    }
}

fn eval_spec() -> EvalSpec {
    let mut s = EvalSpec::for_classes(&[(1, "thyroid"), (2, "nodule")]);
    s.surface = false;
    s
}

/// Phantoms under `dir`; `bright` cases get an image of 1000 HU everywhere (the fixture
/// models misbehave on those).
fn phantoms(dir: &Path, n: usize, bright: &[usize]) -> Dataset {
    let set = evald::phantom::generate(&dir.join("data"), n, GRID, [0.8, 0.8, 2.5], 77).unwrap();
    for &i in bright {
        let p = set.images.join(format!("{}_0000.nii.gz", set.cases[i].id));
        let img = volume::read_image(&p).unwrap();
        let hot = Volume {
            geom: img.geom.clone(),
            data: vec![1000f32; img.data.len()],
        };
        volume::write_volume(&p, &hot).unwrap();
    }
    dataset::pair_cases(&set.images, &set.labels).unwrap()
}

fn job(dir: &Path, data: &Dataset, model: &str) -> Job {
    let images = data.cases[0].input.parent().unwrap().to_path_buf();
    let labels = data.cases[0].label.parent().unwrap().to_path_buf();
    Job {
        format: evald::infer::ModelFormat::TorchScript,
        model: data_model(model),
        model_sha256: None,
        spec: spec(),
        images,
        labels: Some(labels),
        scratch: dir.join("scratch"),
    }
}

fn data_model(name: &str) -> PathBuf {
    data(&format!("models/{name}"))
}

fn start(s: &PoolSettings, j: &Job) -> PoolPredictor {
    PoolPredictor::start_exe(
        s,
        j,
        Some(j.model.clone()),
        PathBuf::from(env!("CARGO_BIN_EXE_evald")),
    )
    .unwrap_or_else(|e| panic!("pool did not start: {e}"))
}

fn evaluate(pool: &PoolPredictor, data: &Dataset) -> (Vec<CaseMetrics>, Vec<Failure>, Totals) {
    let (mut cases, failures, _) = pipeline::evaluate(
        data,
        &eval_spec(),
        pool,
        None,
        &|_| {},
        &AtomicBool::new(false),
    );
    cases.sort_by(|a, b| a.case.cmp(&b.case));
    (cases, failures, pool.totals())
}

/// Everything a summary is computed from, NaN-safe (Debug prints NaN as NaN).
fn fingerprint(cases: &[CaseMetrics]) -> Vec<String> {
    cases.iter().map(|c| format!("{c:?}")).collect()
}

fn pid_alive(pid: u32) -> bool {
    // Zombies count as dead: they run nothing and hold no GPU.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// kill -9 of a worker in the middle of a case: the case is retried on a fresh worker and
/// the evaluation ends exactly as an undisturbed one.
#[test]
fn kill_9_mid_case_gives_the_same_result_as_an_undisturbed_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 5, &[]);
    let j = job(dir.path(), &data, "pool_slow.pt");
    let s = settings(2, 60, 3);

    let pool = start(&s, &j);
    let (calm, calm_failures, calm_totals) = evaluate(&pool, &data);
    drop(pool);
    assert!(calm_failures.is_empty(), "{calm_failures:?}");
    assert_eq!(calm.len(), 5);
    assert_eq!(calm_totals.retries, 0);

    let pool = start(&s, &j);
    let mut killed = None;
    let (cases, failures, totals) = std::thread::scope(|sc| {
        let killer = sc.spawn(|| {
            // The first worker seen holding a case loses its process, mid-case.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Some(w) = pool
                    .workers()
                    .into_iter()
                    .find(|w| w.state == evald::pool::SlotState::Busy && w.pid.is_some())
                {
                    let pid = w.pid.unwrap();
                    // SAFETY: SIGKILL to a worker process this test started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return Some((pid, w.cases));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        let r = evaluate(&pool, &data);
        killed = killer.join().unwrap();
        r
    });
    let (pid, held) = killed.expect("no busy worker was seen");
    assert!(!pid_alive(pid), "worker {pid} survived SIGKILL");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(fingerprint(&cases), fingerprint(&calm));
    assert!(totals.worker_losses >= 1, "{totals:?}");
    assert!(
        totals.retries >= 1,
        "the case {held:?} was not retried: {totals:?}"
    );
    let restarted = pool.workers().iter().map(|w| w.restarts).sum::<u32>();
    assert!(restarted >= 1, "{:?}", pool.workers());
}

/// A model that never returns on one input: that case times out (twice: one retry on a
/// fresh worker), is recorded as a timeout, and the other cases are scored.
#[test]
fn a_model_that_never_returns_times_out_and_the_rest_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 4, &[1]);
    let bad = data.cases[1].id.clone();
    let j = job(dir.path(), &data, "pool_hang.pt");
    let pool = start(&settings(2, 2, 3), &j);
    // Bounded wait, not a timing: the evaluation runs on its own thread and a hang fails
    // the test here instead of blocking it (two 2 s timeouts and a restart need far less).
    let (tx, rx) = std::sync::mpsc::channel();
    let ev_data = data.clone();
    std::thread::spawn(move || {
        let _ = tx.send(evaluate(&pool, &ev_data));
    });
    let (cases, failures, totals) = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the evaluation did not end within 300 s: a case that never returns hangs it");
    assert_eq!(cases.len(), 3, "{failures:?}");
    assert!(cases.iter().all(|c| c.case != bad));
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(
        (f.case.as_str(), f.stage.as_str()),
        (bad.as_str(), "timeout")
    );
    assert_eq!(f.attempts, 2, "{f:?}");
    assert!(f.reason.contains("case_timeout"), "{}", f.reason);
    assert_eq!(totals.timeouts, 2, "{totals:?}");
}

/// A model that raises on one input: that case fails once (no pointless retries) with the
/// model's own message; the others are scored.
#[test]
fn a_model_that_raises_fails_that_case_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 4, &[2]);
    let bad = data.cases[2].id.clone();
    let j = job(dir.path(), &data, "pool_raise.pt");
    let pool = start(&settings(1, 60, 3), &j);
    let (cases, failures, totals) = evaluate(&pool, &data);
    assert_eq!(cases.len(), 3, "{failures:?}");
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(
        (f.case.as_str(), f.stage.as_str()),
        (bad.as_str(), "inference")
    );
    assert_eq!(f.attempts, 1);
    assert!(
        f.reason.contains("refuses bright input"),
        "model's message missing: {}",
        f.reason
    );
    assert_eq!(totals.retries, 0);
    assert_eq!(totals.worker_losses, 0);
}

/// A file that is not TorchScript: the pool refuses to start, with the loader's words.
#[test]
fn a_model_that_cannot_load_stops_the_pool_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 1, &[]);
    let mut j = job(dir.path(), &data, "pool_slow.pt");
    j.model = dir.path().join("model.pt");
    std::fs::write(&j.model, b"not a zip archive").unwrap();
    let e = PoolPredictor::start_exe(
        &settings(2, 60, 3),
        &j,
        Some(j.model.clone()),
        PathBuf::from(env!("CARGO_BIN_EXE_evald")),
    )
    .unwrap_err();
    assert!(matches!(e, PoolError::Fatal { .. }), "{e}");
    assert!(e.to_string().contains("TorchScript"), "{e}");
}

/// A model that hangs on every case: after `max_consecutive_timeouts` timed-out attempts
/// in a row the pool stops the evaluation, instead of timing out (and retrying) every case
/// of the test set; every case not run says why, and the pool says it stopped early.
#[test]
fn a_model_that_always_hangs_is_stopped_after_consecutive_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let data = phantoms(dir.path(), n, &(0..n).collect::<Vec<_>>());
    let j = job(dir.path(), &data, "pool_hang.pt");
    let mut s = settings(2, 2, 3);
    s.max_consecutive_timeouts = 2;
    let pool = start(&s, &j);
    let (cases, failures, totals) = evaluate(&pool, &data);
    assert!(cases.is_empty(), "{cases:?}");
    assert_eq!(failures.len(), n, "{failures:?}");
    let why = pool
        .stopped_early()
        .expect("the pool says it stopped early");
    assert!(why.contains("2 case attempts in a row timed out"), "{why}");
    let stages = |st: Stage| failures.iter().filter(|f| f.stage == st).count();
    assert!(stages(Stage::Timeout) >= 1, "{failures:?}");
    assert!(stages(Stage::Aborted) >= 1, "{failures:?}");
    assert_eq!(
        stages(Stage::Timeout) + stages(Stage::Aborted),
        n,
        "{failures:?}"
    );
    for f in failures.iter().filter(|f| f.stage == Stage::Aborted) {
        assert!(f.reason.contains("in a row timed out"), "{f:?}");
    }
    // Without the limit every case would time out twice (12 timeouts).
    assert!(totals.timeouts < n as u64, "{totals:?}");
    // No worker is left running a hung case.
    wait_until("the workers to stop", Duration::from_secs(30), || {
        pool.workers().iter().all(|w| w.pid.is_none())
    });
}

/// The evaluation's budget: past it, nothing more runs (the case in flight is killed),
/// every case not done is recorded as aborted with the budget as the reason.
#[test]
fn an_evaluation_past_its_budget_stops_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 3, &[0, 1, 2]);
    let j = job(dir.path(), &data, "pool_hang.pt");
    // The case timeout alone would take 10 minutes per case.
    let mut s = settings(1, 600, 3);
    s.submission_budget = Some(Duration::from_secs(3));
    let pool = start(&s, &j);
    let (cases, failures, totals) = evaluate(&pool, &data);
    assert!(cases.is_empty());
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(
        failures.iter().all(|f| f.stage == Stage::Aborted),
        "{failures:?}"
    );
    let why = pool.stopped_early().expect("stopped early");
    assert!(why.contains("budget of 3 s"), "{why}");
    assert!(
        failures[0].reason.contains("pool.submission_budget_secs"),
        "{failures:?}"
    );
    assert_eq!(totals.timeouts, 0, "{totals:?}");
}

/// Workers load the model only when its bytes have the recorded sha256: a snapshot that
/// was altered is refused (as evald's problem, not the vendor's), the right one runs.
#[test]
fn workers_load_only_the_model_bytes_that_were_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 1, &[]);
    let mut j = job(dir.path(), &data, "pool_slow.pt");
    j.model_sha256 = Some("0".repeat(64));
    let e = PoolPredictor::start_exe(
        &settings(1, 60, 1),
        &j,
        Some(j.model.clone()),
        PathBuf::from(env!("CARGO_BIN_EXE_evald")),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Fatal {
                kind: Some(evald::pool::protocol::FatalKind::Integrity),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("is not the 000000"), "{e}");
    let bytes = std::fs::read(&j.model).unwrap();
    j.model_sha256 = Some(evald::files::sha256_hex(&bytes[..]).unwrap());
    let pool = start(&settings(1, 60, 1), &j);
    let (cases, failures, _) = evaluate(&pool, &data);
    assert_eq!((cases.len(), failures.len()), (1, 0), "{failures:?}");
}

/// The sandbox seen from inside a real worker: no TCP, no labels, images read-only,
/// scratch writable. With the sandbox off the same check reports the escape.
#[test]
fn a_worker_cannot_open_tcp_sockets_nor_read_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 1, &[]);
    let images = data.cases[0].input.parent().unwrap();
    let labels = data.cases[0].label.parent().unwrap();
    let out = run_ok(
        evald()
            .args(["worker-selfcheck", "--sandbox", "required", "--images"])
            .arg(images)
            .arg("--labels")
            .arg(labels),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["confined"], true, "{r:#}");
    assert_eq!(r["probe"]["tcp_socket"]["allowed"], false, "{r:#}");
    assert_eq!(r["probe"]["tcp_connect"]["allowed"], false, "{r:#}");
    assert_eq!(
        r["probe"]["reads"][0]["allowed"], false,
        "label read: {r:#}"
    );
    assert!(r["probe"]["reads"][0]["what"]
        .as_str()
        .unwrap()
        .contains("labelsTs"));
    assert_eq!(
        r["probe"]["lists"][0]["allowed"], false,
        "labels listing: {r:#}"
    );
    assert_eq!(r["probe"]["reads"][1]["allowed"], true, "image read: {r:#}");
    assert_eq!(
        r["probe"]["writes"][0]["allowed"], true,
        "scratch write: {r:#}"
    );
    assert_eq!(
        r["probe"]["writes"][1]["allowed"], false,
        "images write: {r:#}"
    );
    for layer in ["landlock", "seccomp"] {
        assert_eq!(r["sandbox"][layer]["state"], "enforced", "{layer}: {r:#}");
    }

    let off = evald()
        .args(["worker-selfcheck", "--sandbox", "off", "--images"])
        .arg(images)
        .arg("--labels")
        .arg(labels)
        .output()
        .unwrap();
    assert!(
        !off.status.success(),
        "an unsandboxed worker passed the check"
    );
    let r: serde_json::Value = serde_json::from_slice(&off.stdout).unwrap();
    assert_eq!(r["confined"], false);
    assert_eq!(r["probe"]["reads"][0]["allowed"], true);
}

/// Dropping the pool leaves no worker process behind.
#[test]
fn dropping_the_pool_leaves_no_worker_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = phantoms(dir.path(), 1, &[]);
    let j = job(dir.path(), &data, "pool_hang.pt");
    let pool = start(&settings(3, 60, 1), &j);
    wait_until("three workers", Duration::from_secs(60), || {
        pool.workers().iter().all(|w| w.pid.is_some())
    });
    let pids: Vec<u32> = pool.workers().iter().filter_map(|w| w.pid).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| pid_alive(p)));
    drop(pool);
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(alive.is_empty(), "workers still running: {alive:?}");
    assert!(!dir.path().join("scratch/w0").exists());
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                v.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    v
}

/// `evald run` uses the pool; when evald itself is killed -9 in the middle of a case, its
/// workers die with it (PR_SET_PDEATHSIG, stdin EOF): no orphan keeps a GPU.
#[test]
fn killing_evald_kills_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = phantoms(root, 2, &[0]);
    let images = data.cases[0].input.parent().unwrap();
    let labels = data.cases[0].label.parent().unwrap();
    let sub = root.join("drop/thyroid-ca/v/s1");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(data_model("pool_hang.pt"), sub.join("model.pt")).unwrap();
    let cfg = root.join("evald.toml");
    std::fs::write(&cfg, evald::cli::demo_config(root, images, labels)).unwrap();
    let mut child = evald()
        .arg("run")
        .arg(&sub)
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let is_worker = |w: u32| {
        let cmd = std::fs::read(format!("/proc/{w}/cmdline")).unwrap_or_default();
        cmd.split(|&b| b == 0).any(|a| a == b"worker")
    };
    let mut workers = Vec::new();
    // Between fork and exec a child still shows evald's own command line: wait for both
    // to be workers.
    wait_until("evald's two workers", Duration::from_secs(60), || {
        workers = children_of(pid);
        workers.len() == 2 && workers.iter().all(|&w| is_worker(w))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        "the workers to die with evald",
        Duration::from_secs(10),
        || workers.iter().all(|&w| !pid_alive(w)),
    );
}

/// The fixture behaves as documented, and evald keeps the model's own words: the
/// interpreter's preamble is not a reason anyone can act on.
#[test]
fn a_torchscript_exception_is_reported_by_its_message() {
    let m = tch::CModule::load(data_model("pool_raise.pt")).unwrap();
    let x = tch::Tensor::ones([1, 1, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let e = m.forward_ts(&[x]).unwrap_err();
    assert_eq!(
        evald::infer::first_line(&e),
        "builtins.ValueError: fixture model refuses bright input: mean intensity above 0.9"
    );
}

/// `evald run` through the pool and `evald run --in-process` write the same numbers.
#[test]
fn the_pool_and_in_process_inference_give_the_same_summary() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = phantoms(root, 3, &[]);
    let images = data.cases[0].input.parent().unwrap();
    let labels = data.cases[0].label.parent().unwrap();
    let cfg = root.join("evald.toml");
    std::fs::write(&cfg, evald::cli::demo_config(root, images, labels)).unwrap();
    let mut summaries = Vec::new();
    for (name, extra) in [("pool", None), ("local", Some("--in-process"))] {
        let sub = root.join(format!("drop/thyroid-ca/v/{name}"));
        std::fs::create_dir_all(&sub).unwrap();
        evald::phantom::write_demo_model(&sub.join("model.pt")).unwrap();
        let mut cmd = evald();
        cmd.arg("run").arg(&sub).arg("--config").arg(&cfg);
        cmd.args(extra);
        run_ok(&mut cmd);
        let s = crate::util::read_json(&sub.join("summary.json"));
        assert_eq!(s["evald"]["cases_scored"], 3, "{name}");
        summaries.push(s);
    }
    for key in ["mean", "foreground_mean", "metric_per_case"] {
        assert_eq!(summaries[0][key], summaries[1][key], "{key}");
    }
    for key in ["confusion_matrix", "patient_level", "statistics"] {
        assert_eq!(
            summaries[0]["evald"][key], summaries[1]["evald"][key],
            "{key}"
        );
    }
}

/// `evald run --save-predictions DIR` keeps each case's label map on the case's grid: the
/// files it writes, scored again by `evald score`, give the run's own Dice per case.
#[test]
fn saved_predictions_are_the_label_maps_that_were_scored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = phantoms(root, 3, &[]);
    let images = data.cases[0].input.parent().unwrap();
    let labels = data.cases[0].label.parent().unwrap();
    let cfg = root.join("evald.toml");
    std::fs::write(&cfg, evald::cli::demo_config(root, images, labels)).unwrap();
    let sub = root.join("drop/thyroid-ca/v/saved");
    std::fs::create_dir_all(&sub).unwrap();
    evald::phantom::write_demo_model(&sub.join("model.pt")).unwrap();
    let preds = root.join("preds");
    run_ok(
        evald()
            .arg("run")
            .arg(&sub)
            .arg("--config")
            .arg(&cfg)
            .arg("--save-predictions")
            .arg(&preds),
    );
    for c in &data.cases {
        let saved = preds.join(format!("{}.nii.gz", c.id));
        assert_eq!(
            evald::volume::read_geometry(&saved).unwrap(),
            evald::volume::read_geometry(&c.input).unwrap(),
            "{}",
            c.id
        );
    }
    let out = root.join("rescored.json");
    run_ok(
        evald()
            .args(["score", "--classes", "1,2", "--no-surface", "--labels"])
            .arg(labels)
            .arg("--predictions")
            .arg(&preds)
            .arg("--out")
            .arg(&out),
    );
    let dice_by_case = |s: &serde_json::Value| {
        let mut v: Vec<(String, f64, f64)> = s["metric_per_case"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let r = c["reference_file"].as_str().unwrap().to_string();
                let d = |l: &str| c["metrics"][l]["Dice"].as_f64().unwrap();
                (r, d("1"), d("2"))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let run = dice_by_case(&crate::util::read_json(&sub.join("summary.json")));
    let again = dice_by_case(&crate::util::read_json(&out));
    assert_eq!(run.len(), 3);
    assert_eq!(run, again);
}
