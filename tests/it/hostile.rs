//! The service against a hostile vendor and a careless admin (the hardening issue): each
//! test reproduces one way the released daemon could be hung, crashed, or made to lie, on
//! the real `evald serve` with the helpers of `daemon.rs`. Nothing waits by sleeping.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use evald::store::State;

use crate::daemon::{
    demo_model, evaluation_in_flight, sha256, wait_state, wait_until, write_files, Daemon, Env,
    Opts, ONE_SLICE,
};
use crate::util::read_json;

/// A submission whose model never returns: the pool's hang fixture on input windowed so
/// that every voxel is 1.0 (the fixture's "bright" input, on which it loops forever).
pub(crate) fn write_hanging_submission(dir: &Path) {
    let hang = std::fs::read(crate::util::data("models/pool_hang.pt")).unwrap();
    write_files(
        dir,
        &[
            ("model.pt", &hang),
            (
                "submission.toml",
                b"input = \"slices2d\"\nwindow = { level = -2000, width = 10 }\n",
            ),
        ],
    );
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The service with umask 022, as systemd's `UMask=0022` would start it.
fn start_umask_022(env: &Env) -> Daemon {
    Daemon::start_cmd(env, |c| {
        // SAFETY: umask(2) is async-signal-safe; it only sets the child's mask.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
    })
}

/// A FIFO named `submission.toml` (or `model.pt`) used to freeze intake forever (a
/// blocking open waiting for a writer). Now: a rejection naming it, a later submission is
/// evaluated, SIGTERM stops the service at once. And (item 3) what vendors read is
/// readable by them: outputs follow the service's umask, not tempfile's 0600.
#[test]
fn a_fifo_in_a_submission_is_rejected_and_intake_goes_on() {
    let env = Env::new(Opts::default());
    let mut d = start_umask_022(&env);
    let model = demo_model();

    let manifest_fifo = env.sub("t/acme/fifo-manifest");
    write_files(&manifest_fifo, &[("model.pt", &model)]);
    mkfifo(&manifest_fifo.join("submission.toml"));
    let model_fifo = env.sub("t/acme/fifo-model");
    std::fs::create_dir_all(&model_fifo).unwrap();
    mkfifo(&model_fifo.join("model.pt"));

    for dir in [&manifest_fifo, &model_fifo] {
        wait_state(&env, &d, dir, &[State::Rejected]);
        let txt = std::fs::read_to_string(dir.join("REJECTED.txt")).unwrap();
        assert!(
            txt.contains("FIFO (named pipe), not a regular file"),
            "{txt}"
        );
        assert_eq!(mode(&dir.join("REJECTED.txt")), 0o644);
    }

    let good = env.sub("t/acme/good");
    write_files(&good, &[("model.pt", &model)]);
    wait_state(&env, &d, &good, &[State::Mailed]);
    for out in ["report.xlsx", "summary.json"] {
        assert_eq!(mode(&good.join(out)), 0o644, "{out}");
    }

    d.signal(libc::SIGTERM);
    let (st, _) = d.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st:?}\n{}", d.log());
}

/// A TorchScript model whose every voxel is background (to tell its predictions apart
/// from the demo-like model's).
fn background_model() -> Vec<u8> {
    use tch::{Device, Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bg.pt");
    let example = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let mut f = |xs: &[Tensor]| -> Vec<Tensor> {
        let z = xs[0].zeros_like();
        vec![Tensor::cat(&[&z + 1.0, z.shallow_clone(), z], 1)]
    };
    let module =
        tch::CModule::create_by_tracing("evald_bg", "forward", &[example], &mut f).unwrap();
    module.save(&path).unwrap();
    std::fs::read(&path).unwrap()
}

fn worker_pids(daemon_pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{daemon_pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            v.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    v.retain(|w| {
        std::fs::read(format!("/proc/{w}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|a| a == b"worker")
    });
    v
}

/// The vendor replaces `model.pt` (and breaks `submission.toml`) while the first model is
/// being evaluated, and a worker dies. The restarted worker used to load the new file:
/// one report, two models, under the first model's sha256; and the first evaluation's
/// end deleted the newer submission's REJECTED.txt. Now every case is scored with the
/// snapshot of the first model, and the newer rejection stays.
#[test]
fn replacing_the_model_mid_evaluation_cannot_mix_two_models_in_one_report() {
    let env = Env::new(Opts {
        cases: 6,
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    // About 3 s a case here: the folder changes and the worker dies well within it.
    let dir = evaluation_in_flight(&env, &d, "t/acme/mix", 400);
    let first = std::fs::read(dir.join("model.pt")).unwrap();
    let first_row = env.for_path(&dir)[0].clone();
    assert_eq!(
        first_row.model_sha256.as_deref(),
        Some(sha256(&first).as_str())
    );

    write_files(
        &dir,
        &[
            ("model.pt", &background_model()),
            ("submission.toml", b"batch_size = 0\n"),
        ],
    );
    let newer = wait_until("the replaced folder's rejection", &d, || {
        env.for_path(&dir)
            .into_iter()
            .find(|s| s.id != first_row.id && s.state == State::Rejected)
    });
    assert!(dir.join("REJECTED.txt").is_file());
    // The worker dies mid-evaluation; its replacement must load the first model again.
    let pid = d.child.id();
    let workers = wait_until("a worker process", &d, || {
        Some(worker_pids(pid)).filter(|w| !w.is_empty())
    });
    assert_eq!(
        env.for_path(&dir)[0].state,
        State::Running,
        "the kill must land during the first evaluation"
    );
    for w in workers {
        // SAFETY: kill(2) on a worker of our daemon.
        unsafe { libc::kill(w as i32, libc::SIGKILL) };
    }
    d.wait_log("worker ended");

    wait_until("the first evaluation mailed", &d, || {
        env.for_path(&dir)
            .into_iter()
            .find(|s| s.id == first_row.id && s.state == State::Mailed)
    });
    let summary = read_json(&dir.join("summary.json"));
    assert_eq!(summary["evald"]["run"]["model_sha256"], sha256(&first));
    assert_eq!(summary["evald"]["cases_scored"], 6, "{}", d.log());
    // The replacement predicts background everywhere; the first model finds thyroid in
    // every phantom.
    for c in summary["metric_per_case"].as_array().unwrap() {
        let found = c["metrics"]["1"]["n_pred"].as_u64().unwrap_or(0);
        assert!(
            found > 0,
            "a case scored with another model than the first (no thyroid voxel): {c}"
        );
    }
    let txt = std::fs::read_to_string(dir.join("REJECTED.txt"))
        .expect("the newer submission's REJECTED.txt is kept");
    assert!(txt.contains(&format!("(#{})", newer.id)), "{txt}");
    assert!(txt.contains("batch_size"), "{txt}");
}

/// A model that never returns used to hold the queue for a day (every case timed out
/// and was retried). Now the evaluation stops after `max_consecutive_timeouts`, the
/// report and the email say why, and the next submission is evaluated.
#[test]
fn a_model_that_always_hangs_ends_with_a_report_and_an_email_that_say_why() {
    let env = Env::new(Opts {
        cases: 3,
        pool_extra: "case_timeout_secs = 2\nmax_consecutive_timeouts = 1\n",
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let dir = env.sub("t/acme/hang");
    write_hanging_submission(&dir);
    let s = wait_state(&env, &d, &dir, &[State::Mailed]);
    let summary = read_json(&dir.join("summary.json"));
    let why = summary["evald"]["run"]["stopped_early"]
        .as_str()
        .unwrap_or_else(|| panic!("no stopped_early in {}", summary["evald"]["run"]));
    assert!(why.contains("1 case attempts in a row timed out"), "{why}");
    assert_eq!(summary["evald"]["cases_scored"], 0);
    assert!(dir.join("report.xlsx").is_file());
    // Nothing scored: the store's headline says n/a, never NaN.
    let headline = s.headline.clone().unwrap_or_default();
    assert!(
        headline.contains("thyroid n/a") && !headline.contains("NaN"),
        "{headline}"
    );
    assert_eq!(s.state, State::Mailed);
    assert_eq!(env.emails_for("hang"), 1);
    let eml = std::fs::read_dir(env.dir.path().join("outbox"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with("_acme_hang.eml"))
        .expect("an email for the stopped evaluation");
    let msg = crate::mail::parse_eml(&eml.path(), &env.path("parsed"));
    assert!(
        msg.text.contains("STOPPED EARLY: 1 case attempts"),
        "{}",
        msg.text
    );
    assert!(
        msg.html.contains("Stopped early: 1 case attempts"),
        "{}",
        msg.html
    );

    // The queue is free again.
    let next = env.sub("t/acme/next");
    write_files(
        &next,
        &[("model.pt", &demo_model()), ("submission.toml", ONE_SLICE)],
    );
    wait_state(&env, &d, &next, &[State::Mailed]);
}

/// A folder name carrying a newline and a fake log line used to forge exactly that line
/// in the text log and in `evald status`. Now every event is one line and names print
/// escaped; `evald status` into a closed pipe (`| head`) ends quietly, not with a panic.
#[test]
fn a_folder_name_cannot_forge_log_or_status_lines() {
    let env = Env::new(Opts::default());
    let d = Daemon::start(&env);
    let forged = "v1\n2026-12-01T00:00:00.000000Z  INFO evald::store: submission mailed id=999";
    let dir = env.sub("t/acme").join(forged);
    write_files(&dir, &[("model.pt", &demo_model())]);
    wait_state(&env, &d, &dir, &[State::Mailed]);

    let log = std::fs::read_to_string(env.logs.join("evald.log")).unwrap();
    assert!(
        log.contains("v1\\n2026-12-01"),
        "the name is logged, escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-12-01T00:00:00"),
            "a forged line in the log: {line}"
        );
    }
    let out = crate::util::run_ok(
        crate::util::evald()
            .args(["status", "--config"])
            .arg(&env.cfg),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("v1\\n2026-12-01"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("2026-12-01T00:00:00")),
        "a forged line in status:\n{text}"
    );

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = crate::util::evald()
        .args(["status", "--config"])
        .arg(&env.cfg)
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
}

/// A 20 MB submission.toml used to become a 40 MB REJECTED.txt, a 40 MB log line and
/// ~175 MB of database; a manifest with one huge bad line was quoted back whole. Now the
/// manifest is refused by its size and every quoted message is bounded.
#[test]
fn vendor_bytes_are_not_amplified_into_rejections_logs_or_the_store() {
    let env = Env::new(Opts::default());
    let d = Daemon::start(&env);
    let model = demo_model();
    let huge = env.sub("t/acme/huge");
    let mut big = b"description = \"".to_vec();
    big.resize(20 << 20, b'x');
    big.extend_from_slice(b"\"\n");
    write_files(&huge, &[("model.pt", &model), ("submission.toml", &big)]);
    // Under the size bound, but one line of garbage that toml's error quotes.
    let long_line = env.sub("t/acme/longline");
    let mut bad = b"input = ".to_vec();
    bad.resize(60 << 10, b'@');
    write_files(
        &long_line,
        &[("model.pt", &model), ("submission.toml", &bad)],
    );

    for dir in [&huge, &long_line] {
        wait_state(&env, &d, dir, &[State::Rejected]);
        let n = std::fs::metadata(dir.join("REJECTED.txt")).unwrap().len();
        assert!(n < 8 << 10, "{}: REJECTED.txt of {n} bytes", dir.display());
    }
    let txt = std::fs::read_to_string(huge.join("REJECTED.txt")).unwrap();
    assert!(txt.contains("more than the 65536 bytes accepted"), "{txt}");
    let log = std::fs::read_to_string(env.logs.join("evald.log")).unwrap();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 8 << 10, "a log line of {longest} bytes");
    let rows = env.submissions();
    assert!(
        rows.iter()
            .all(|s| s.error.as_deref().unwrap_or("").len() < 8 << 10),
        "{rows:?}"
    );
}

/// A failure on evald's side (here: the configured GPU does not exist) used to end the
/// submission `failed` at once, with nothing for the vendor and no email. Now it is
/// queued again after a backoff, and only after `pool.max_attempts` tries is it failed:
/// the vendor reads FAILED.txt (not their fault), the team gets an email, and the store
/// keeps the reason.
#[test]
fn a_failure_on_evalds_side_is_retried_then_told_to_the_vendor_and_the_team() {
    let o = Opts::default();
    let env = Env::new(o);
    let text = env
        .config_text(o, &["t"])
        .replace("devices = [\"cpu\"]", "devices = [\"cuda:0\"]")
        .replace("max_attempts = 3", "max_attempts = 2")
        .replace(
            "settle_secs = 1\n",
            "settle_secs = 1\nretry_backoff_secs = 1\n",
        );
    std::fs::write(&env.cfg, text).unwrap();
    let d = Daemon::start(&env);
    let dir = env.sub("t/acme/nogpu");
    write_files(&dir, &[("model.pt", &demo_model())]);
    let s = wait_state(&env, &d, &dir, &[State::Failed]);
    let h = env.history(s.id);
    assert_eq!(
        crate::daemon::states(&h),
        [
            State::Seen,
            State::Queued,
            State::Running,
            State::Queued,
            State::Running,
            State::Queued,
            State::Failed
        ],
        "{h:?}"
    );
    let reason = s.error.clone().unwrap_or_default();
    assert!(reason.contains("cannot start inference"), "{reason}");
    assert!(reason.contains("tried 2 times"), "{reason}");
    let txt = std::fs::read_to_string(dir.join("FAILED.txt")).expect("FAILED.txt");
    assert!(txt.contains("not with your submission"), "{txt}");
    assert!(txt.contains("cuda"), "{txt}");
    assert!(!dir.join("REJECTED.txt").exists());
    wait_until("the team's email about the failure", &d, || {
        (env.emails_for("nogpu") == 1).then_some(())
    });
    assert!(d.log().contains("the admin must fix this"), "{}", d.log());
}

/// A daemon on a read-only state folder used to say "evald ready" and fail every
/// submission; it now refuses to start and says what to fix. (Needs a read-only bind
/// mount: root, as CI runs.)
#[test]
fn a_read_only_state_folder_is_refused_at_start() {
    let env = Env::new(Opts::default());
    std::fs::create_dir_all(&env.state).unwrap();
    // A store first, so only writing fails.
    {
        let d = Daemon::start(&env);
        drop(d);
    }
    let st = std::process::Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&env.state)
        .arg(&env.state)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("skipped: a read-only bind mount needs root");
        return;
    }
    let remount = std::process::Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&env.state)
        .status()
        .unwrap();
    let out = crate::util::evald()
        .args(["serve", "--config"])
        .arg(&env.cfg)
        .output()
        .unwrap();
    let _ = std::process::Command::new("umount")
        .arg(&env.state)
        .status();
    assert!(remount.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a read-only store:\n{err}"
    );
    assert!(!err.contains("evald ready"), "{err}");
    assert!(err.contains("state folder"), "{err}");
}

/// Folders that used to get no answer at all: more than 10,000 entries, a model buried
/// deeper than evald looks, a linked folder whose `<name>.REJECTED.txt` would be too long
/// a name; and manifests refused with the wrong words: a model named like evald's own
/// report, a NaN window level.
#[test]
fn every_folder_evald_looked_at_gets_an_answer() {
    let env = Env::new(Opts::default());
    let d = Daemon::start(&env);
    let model = demo_model();

    let crowded = env.sub("t/acme/crowded");
    write_files(&crowded, &[("model.pt", &model)]);
    for i in 0..10_001 {
        std::fs::write(crowded.join(format!("f{i:05}")), b"").unwrap();
    }
    let deep = env.sub("t/acme/deep");
    let mut buried = deep.clone();
    for l in 0..9 {
        buried.push(format!("l{l}"));
    }
    write_files(&buried, &[("model.pt", &model)]);
    let own_name = env.sub("t/acme/ownname");
    write_files(
        &own_name,
        &[
            ("report.xlsx", &model),
            ("submission.toml", b"model = \"report.xlsx\"\n"),
        ],
    );
    let nan = env.sub("t/acme/nan");
    write_files(
        &nan,
        &[
            ("model.pt", &model),
            (
                "submission.toml",
                b"window = { level = nan, width = 400 }\n",
            ),
        ],
    );
    let cases = [
        (&crowded, "too-many-files", "more than 10000 files"),
        (&deep, "model", "missing"),
        (&own_name, "manifest", "names a file evald writes itself"),
        (&nan, "manifest", "level must be a finite number"),
    ];
    for (dir, code, says) in cases {
        let s = wait_state(&env, &d, dir, &[State::Rejected]);
        assert_eq!(s.reject_code.as_deref(), Some(code), "{}", dir.display());
        let txt = std::fs::read_to_string(dir.join("REJECTED.txt")).unwrap();
        assert!(
            txt.contains(says),
            "{}: expected '{says}' in\n{txt}",
            dir.display()
        );
    }

    // A linked folder (refused) whose name leaves no room for ".REJECTED.txt".
    let outside = env.path("elsewhere");
    write_files(&outside, &[("model.pt", &model)]);
    let long = env.sub("t/acme").join("n".repeat(250));
    std::os::unix::fs::symlink(&outside, &long).unwrap();
    let s = wait_state(&env, &d, &long, &[State::Rejected]);
    let answer = env.sub(&format!("t/acme/#{}.REJECTED.txt", s.id));
    let txt = std::fs::read_to_string(&answer)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", answer.display(), d.log()));
    assert!(txt.contains("symbolic link"), "{txt}");
}

/// An upload held open by its writer (here in poll mode, where no file event says so,
/// as on a network mount) used to be evaluated half-written after the settle time. Now
/// the folder waits while a process has one of its files open for writing.
#[test]
fn a_file_still_open_for_writing_is_not_evaluated() {
    use std::io::Write;
    let env = Env::new(Opts {
        watch: "poll",
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let model = demo_model();
    let dir = env.sub("t/acme/held");
    std::fs::create_dir_all(&dir).unwrap();
    let mut writer = std::process::Command::new("sh")
        .arg("-c")
        .arg("cat > \"$0\"")
        .arg(dir.join("model.pt"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let half = model.len() / 2;
    stdin.write_all(&model[..half]).unwrap();
    stdin.flush().unwrap();
    d.wait_log("waiting: a file of this folder is still open for writing");
    assert!(env.for_path(&dir).is_empty(), "{:?}", env.for_path(&dir));
    stdin.write_all(&model[half..]).unwrap();
    drop(stdin);
    writer.wait().unwrap();
    let s = wait_state(&env, &d, &dir, &[State::Mailed]);
    assert_eq!(env.for_path(&dir).len(), 1);
    assert_eq!(s.model_sha256.as_deref(), Some(sha256(&model).as_str()));
}

/// A vendor deletes the folder while it is evaluated: nothing is written back (the
/// folder used to be recreated and mailed about). A hard link to a file elsewhere is
/// refused like a symbolic link. A second service on the same state folder refuses to
/// start.
#[test]
fn a_withdrawn_folder_stays_gone_and_hard_links_and_second_services_are_refused() {
    // Three cases: the evaluation is still in flight when the folder goes (after the
    // first), and the rest of it stays well inside the deadline when the suite's other
    // tests load the machine (each case of the slow model took ~25 s then; six did not fit).
    let env = Env::new(Opts {
        cases: 3,
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let second = crate::util::evald()
        .args(["serve", "--config"])
        .arg(&env.cfg)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another evald serve runs on this state folder"),
        "{err}"
    );

    let dir = evaluation_in_flight(&env, &d, "t/acme/gone", 400);
    std::fs::remove_dir_all(&dir).unwrap();
    let s = wait_state(&env, &d, &dir, &[State::Failed, State::Mailed]);
    assert_eq!(s.state, State::Failed);
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("deleted during its evaluation"),
        "{s:?}"
    );
    assert!(!dir.exists(), "the folder was recreated");
    assert_eq!(env.emails_for("gone"), 0);

    let elsewhere = env.path("elsewhere.pt");
    std::fs::write(&elsewhere, demo_model()).unwrap();
    let linked = env.sub("t/acme/hardlink");
    std::fs::create_dir_all(&linked).unwrap();
    std::fs::hard_link(&elsewhere, linked.join("model.pt")).unwrap();
    wait_state(&env, &d, &linked, &[State::Rejected]);
    let txt = std::fs::read_to_string(linked.join("REJECTED.txt")).unwrap();
    assert!(txt.contains("is a hard link"), "{txt}");
}

/// A broken reference label in the test set used to fail the case as the model's fault,
/// with the test set's absolute path in the vendor's report. Now the case fails as a
/// `reference` problem without folders, the admin's log has the whole error, and
/// `check-config` finds the broken file before any vendor does.
#[test]
fn a_broken_reference_is_the_test_sets_problem_and_check_config_finds_it() {
    let env = Env::new(Opts::default());
    let broken = env.labels.join("case_001.nii.gz");
    std::fs::write(&broken, b"not a NIfTI file").unwrap();
    let check = crate::util::evald()
        .args(["check-config", "--config"])
        .arg(&env.cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(2), "{text}");
    assert!(
        text.contains("tasks.t.labels") && text.contains("case_001.nii.gz"),
        "{text}"
    );

    let d = Daemon::start(&env);
    let dir = env.sub("t/acme/v1");
    write_files(&dir, &[("model.pt", &demo_model())]);
    wait_state(&env, &d, &dir, &[State::Mailed]);
    let summary = read_json(&dir.join("summary.json"));
    let failures = summary["evald"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["stage"], "reference");
    let reason = failures[0]["reason"].as_str().unwrap();
    assert!(reason.contains("case_001.nii.gz"), "{reason}");
    let labels_dir = env.labels.display().to_string();
    assert!(
        !reason.contains(&labels_dir),
        "test-set folder in the report: {reason}"
    );
    assert!(
        d.log().contains("test-set problem, not the model's"),
        "{}",
        d.log()
    );
}

/// A full disk used to throw a finished evaluation away (a lone summary.json, no report,
/// no email). Now the computed results wait in memory and the outputs are written again
/// once there is room. (A full file system needs a small tmpfs: root, as CI runs.)
#[test]
fn a_full_disk_keeps_the_results_until_they_can_be_written() {
    let o = Opts::default();
    let env = Env::new(o);
    let text = env.config_text(o, &["t"]).replace(
        "settle_secs = 1\n",
        "settle_secs = 1\nretry_backoff_secs = 1\n",
    );
    std::fs::write(&env.cfg, text).unwrap();
    let dir = env.sub("t/acme/full");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let model = demo_model();
    std::fs::write(dir.join("model.pt"), &model).unwrap();
    // Fill the rest: not even summary.json fits.
    let filler = dir.join(".filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    }
    let d = Daemon::start(&env);
    d.wait_log("cannot write the outputs (retrying in");
    assert!(!dir.join("report.xlsx").exists());
    std::fs::remove_file(&filler).unwrap();
    let s = wait_state(&env, &d, &dir, &[State::Mailed, State::Failed]);
    assert_eq!(s.state, State::Mailed, "{}", d.log());
    assert!(dir.join("report.xlsx").is_file());
    assert_eq!(
        read_json(&dir.join("summary.json"))["evald"]["cases_scored"],
        2
    );
    assert_eq!(env.emails_for("full"), 1);
    assert_eq!(env.for_path(&dir).len(), 1, "evaluated once");
}

/// An upload that reopens its file for every chunk, pausing longer than the settle time
/// while another evaluation holds the queue, used to leave one "failed (superseded)" row
/// per chunk. Now the waiting submission takes each new content in its place: one row,
/// with the complete model.
#[test]
fn an_upload_in_chunks_while_the_queue_is_busy_is_one_submission() {
    use std::io::Write;
    let env = Env::new(Opts {
        cases: 3,
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    // Hold the queue: a model that never returns (case timeout 600 s).
    let busy = env.sub("t/acme/busy");
    write_hanging_submission(&busy);
    wait_state(&env, &d, &busy, &[State::Running]);

    let model = demo_model();
    let dir = env.sub("t/acme/chunked");
    std::fs::create_dir_all(&dir).unwrap();
    let chunks: Vec<&[u8]> = model.chunks(model.len() / 3 + 1).collect();
    for (i, c) in chunks.iter().enumerate() {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("model.pt"))
            .unwrap();
        f.write_all(c).unwrap();
        drop(f);
        if i + 1 < chunks.len() {
            let before = sha256(&std::fs::read(dir.join("model.pt")).unwrap());
            // Each partial file is queued (the queue is busy, so it waits there).
            wait_until("the partial upload queued", &d, || {
                env.for_path(&dir)
                    .pop()
                    .filter(|s| s.model_sha256.as_deref() == Some(before.as_str()))
            });
        }
    }
    let s = wait_until("the complete model queued", &d, || {
        env.for_path(&dir).pop().filter(|s| {
            s.state == State::Queued && s.model_sha256.as_deref() == Some(sha256(&model).as_str())
        })
    });
    let rows = env.for_path(&dir);
    assert_eq!(rows.len(), 1, "one submission for one upload: {rows:#?}");
    assert_eq!(rows[0].id, s.id);
}
