//! The service as an admin and a vendor meet it: the real `evald serve` on temp folders
//! with tiny phantom test sets, driven through the drop folder and signals, observed
//! through the store, the files it writes and its log. No sleep is used to wait for
//! anything: every wait polls a condition with a deadline. (Sleeps only pace a writer
//! that imitates a slow upload.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use evald::store::{State, Store, Submission, Transition};

use crate::util::{evald, read_json};

/// Generous: CI machines are slow and shared.
pub(crate) const DEADLINE: Duration = Duration::from_secs(120);

/// A temp installation: test set, drop/state/log folders, config.
pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) drop: PathBuf,
    pub(crate) state: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) cfg: PathBuf,
    pub(crate) images: PathBuf,
    pub(crate) labels: PathBuf,
}

#[derive(Clone, Copy)]
pub(crate) struct Opts {
    pub(crate) cases: usize,
    pub(crate) dims: [usize; 3],
    pub(crate) rescan_secs: u64,
    pub(crate) grace_secs: u64,
    pub(crate) log_format: &'static str,
    pub(crate) watch: &'static str,
    /// Extra lines for `[pool]`.
    pub(crate) pool_extra: &'static str,
    /// Extra lines for `[daemon]`.
    pub(crate) daemon_extra: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            cases: 2,
            dims: [32, 32, 8],
            rescan_secs: 3600,
            grace_secs: 20,
            log_format: "text",
            watch: "native",
            pool_extra: "",
            daemon_extra: "",
        }
    }
}

pub(crate) fn task_toml(name: &str, images: &Path, labels: &Path) -> String {
    format!(
        "[tasks.{name}]\nimages = \"{}\"\nlabels = \"{}\"\nclasses = {{ 1 = \"thyroid\", 2 = \"nodule\" }}\n\
         positive_class = 2\nlesion_classes = [2]\nsurface_metrics = false\nrecipients = [\"team@example.org\"]\n",
        images.display(),
        labels.display()
    )
}

impl Env {
    pub(crate) fn new(o: Opts) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let set = evald::phantom::generate(&root.join("data"), o.cases, o.dims, [0.8, 0.8, 2.5], 7)
            .unwrap();
        let env = Env {
            drop: root.join("drop"),
            state: root.join("state"),
            logs: root.join("logs"),
            cfg: root.join("evald.toml"),
            images: set.images,
            labels: set.labels,
            dir,
        };
        std::fs::create_dir_all(env.drop.join("t")).unwrap();
        env.write_config(o, &["t"]);
        env
    }

    pub(crate) fn config_text(&self, o: Opts, tasks: &[&str]) -> String {
        let mut s = format!(
            "[daemon]\ndrop_dir = \"{}\"\nstate_dir = \"{}\"\nlog_dir = \"{}\"\nsettle_secs = 1\n\
             rescan_secs = {}\nshutdown_grace_secs = {}\nlog_format = \"{}\"\nwatch = \"{}\"\n{}\n\n\
             [pool]\nworkers = 1\ndevices = [\"cpu\"]\nmax_attempts = 3\n{}\n\n\
             [mail]\ntransport = \"file\"\noutbox_dir = \"{}\"\n\n",
            self.drop.display(),
            self.state.display(),
            self.logs.display(),
            o.rescan_secs,
            o.grace_secs,
            o.log_format,
            o.watch,
            o.daemon_extra,
            o.pool_extra,
            self.dir.path().join("outbox").display(),
        );
        for t in tasks {
            s.push_str(&task_toml(t, &self.images, &self.labels));
        }
        s
    }

    pub(crate) fn write_config(&self, o: Opts, tasks: &[&str]) {
        std::fs::write(&self.cfg, self.config_text(o, tasks)).unwrap();
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub(crate) fn sub(&self, rel: &str) -> PathBuf {
        self.drop.join(rel)
    }

    pub(crate) fn submissions(&self) -> Vec<Submission> {
        match Store::open_existing(&self.state).unwrap() {
            Some(s) => s.all().unwrap(),
            None => Vec::new(),
        }
    }

    pub(crate) fn for_path(&self, dir: &Path) -> Vec<Submission> {
        self.submissions()
            .into_iter()
            .filter(|s| s.path == dir)
            .collect()
    }

    /// How many emails the file transport wrote for submission `t/acme/<name>`.
    pub(crate) fn emails_for(&self, name: &str) -> usize {
        let suffix = format!("_acme_{name}.eml");
        std::fs::read_dir(self.dir.path().join("outbox"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(&suffix))
                })
                .count()
            })
            .unwrap_or(0)
    }

    pub(crate) fn history(&self, id: i64) -> Vec<Transition> {
        Store::open_existing(&self.state)
            .unwrap()
            .unwrap()
            .history(id)
            .unwrap()
    }
}

/// The running service; killed (SIGKILL) if a test ends while it runs.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) stderr: PathBuf,
}

impl Daemon {
    pub(crate) fn start(env: &Env) -> Daemon {
        Daemon::start_with(env, &[])
    }

    pub(crate) fn start_with(env: &Env, vars: &[(&str, &str)]) -> Daemon {
        Daemon::start_cmd(env, |c| {
            c.envs(vars.iter().copied());
        })
    }

    /// Start with `adjust` applied to the command (environment, umask, ...).
    pub(crate) fn start_cmd(env: &Env, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let n = std::fs::read_dir(env.dir.path()).unwrap().count();
        let stderr = env.path(&format!("serve-{n}.stderr"));
        let mut cmd = evald();
        cmd.args(["serve", "--config"])
            .arg(&env.cfg)
            .env("EVALD_LOG", "info");
        adjust(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn evald serve");
        let d = Daemon { child, stderr };
        d.wait_log("evald ready");
        d
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub(crate) fn wait_log(&self, needle: &str) {
        wait_until(&format!("log line '{needle}'"), self, || {
            self.log().contains(needle).then_some(())
        });
    }

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    pub(crate) fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub(crate) fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, t0.elapsed());
            }
            assert!(
                t0.elapsed() < within,
                "evald did not exit within {within:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Poll `f` every 50 ms until it returns `Some`, or fail with the daemon's log.
pub(crate) fn wait_until<T>(what: &str, d: &Daemon, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "timed out waiting for {what}\n--- evald log ---\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the newest submission of `dir` is in one of `states`.
pub(crate) fn wait_state(env: &Env, d: &Daemon, dir: &Path, states: &[State]) -> Submission {
    wait_until(&format!("{} in {states:?}", dir.display()), d, || {
        env.for_path(dir)
            .pop()
            .filter(|s| states.contains(&s.state))
    })
}

/// Drop a submission whose model does `work` rounds of busywork per forward into
/// `sub`, and wait until its first case is scored: an evaluation in flight.
pub(crate) fn evaluation_in_flight(env: &Env, d: &Daemon, sub: &str, work: usize) -> PathBuf {
    let dir = env.sub(sub);
    write_files(
        &dir,
        &[
            ("submission.toml", ONE_SLICE),
            ("model.pt", &slow_model(work)),
        ],
    );
    wait_until("the first case of the evaluation", d, || {
        env.for_path(&dir)
            .pop()
            .filter(|s| s.state == State::Running && s.progress_done >= 1)
    });
    dir
}

pub(crate) fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A TorchScript model that segments the phantoms like the demo model, after `work`
/// rounds of a 256x256 matrix product per forward call (to make evaluations last; the
/// product is multiplied by zero, so the output is the demo model's). Different `work`
/// values give different model bytes.
pub(crate) fn slow_model(work: usize) -> Vec<u8> {
    use evald::phantom::hu;
    use tch::{Device, Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.pt");
    let window = |h: f32| f64::from((h - (40.0 - 200.0)) / 400.0);
    let m = Tensor::eye(256, (Kind::Float, Device::Cpu)) * 0.5;
    let example = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let mut f = |xs: &[Tensor]| -> Vec<Tensor> {
        let x = &xs[0];
        let s = x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>);
        // Depends on the input, so it cannot be folded into a constant when loaded.
        let mut acc = &m * (x.sum(Kind::Float) * 0.0 + 1.0);
        for _ in 0..work {
            acc = acc.matmul(&m);
        }
        let zero = acc.sum(Kind::Float) * 0.0;
        let score = |centre: f32, half: f32| -> Tensor {
            let d: Tensor = (&s - window(centre)) / f64::from(half / 400.0);
            1.0 - &d * &d
        };
        let thyroid = score(hu::THYROID, 45.0) + &zero;
        let nodule = score(hu::NODULE, 28.0);
        let background = s.zeros_like();
        vec![Tensor::cat(&[background, thyroid, nodule], 1)]
    };
    let module =
        tch::CModule::create_by_tracing("evald_slow", "forward", &[example], &mut f).unwrap();
    module.save(&path).unwrap();
    std::fs::read(&path).unwrap()
}

pub(crate) fn demo_model() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.pt");
    evald::phantom::write_demo_model(&p).unwrap();
    std::fs::read(&p).unwrap()
}

/// One forward per slice: evaluations take `work`-proportional time.
pub(crate) const ONE_SLICE: &[u8] = b"input = \"slices2d\"\noutput = \"logits\"\nbatch_size = 1\n";

pub(crate) fn states(h: &[Transition]) -> Vec<State> {
    h.iter().map(|t| t.to).collect()
}

pub(crate) fn count(h: &[Transition], s: State) -> usize {
    h.iter().filter(|t| t.to == s).count()
}

pub(crate) fn at(h: &[Transition], s: State) -> chrono::DateTime<chrono::Utc> {
    let t = h
        .iter()
        .find(|t| t.to == s)
        .unwrap_or_else(|| panic!("no {s} in {h:?}"));
    t.at.parse().unwrap()
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_slow_copy_is_evaluated_once_after_it_completes() {
    let env = Env::new(Opts::default());
    let dir = env.sub("t/acme/slow");
    // The folder exists (empty) before the service starts: an empty folder is nothing to do.
    std::fs::create_dir_all(&dir).unwrap();
    let d = Daemon::start(&env);
    let model = demo_model();
    {
        let mut f = std::fs::File::create(dir.join("model.pt")).unwrap();
        let chunks: Vec<&[u8]> = model.chunks(model.len() / 4 + 1).collect();
        for (i, c) in chunks.iter().enumerate() {
            f.write_all(c).unwrap();
            f.flush().unwrap();
            if i + 1 < chunks.len() {
                // Pacing a slow writer (not synchronisation): each pause is longer than
                // settle_secs, with the file still open for writing.
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
    }
    let closed = chrono::Utc::now();
    let s = wait_state(&env, &d, &dir, &[State::Mailed]);
    let rows = env.for_path(&dir);
    assert_eq!(rows.len(), 1, "one submission for one upload: {rows:#?}");
    let h = env.history(s.id);
    assert_eq!(
        states(&h),
        [
            State::Seen,
            State::Queued,
            State::Running,
            State::Reported,
            State::Mailed
        ]
    );
    assert!(
        at(&h, State::Seen) >= closed - chrono::Duration::milliseconds(50),
        "picked up before the copy completed: seen {} < closed {closed}",
        h[0].at
    );
    assert_eq!(s.model_sha256.as_deref(), Some(sha256(&model).as_str()));
    let summary = read_json(&dir.join("summary.json"));
    assert_eq!(summary["evald"]["run"]["model_sha256"], sha256(&model));
    assert_eq!(summary["evald"]["cases_scored"], 2);
    assert!(dir.join("report.xlsx").is_file());
    assert!(!dir.join("REJECTED.txt").exists());

    // Log files: today's file behind the evald.log link, one line per state change.
    let log = std::fs::read_to_string(env.logs.join("evald.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("submission reported"))
        .unwrap_or_else(|| panic!("no state line in\n{log}"));
    for field in [
        format!("id={}", s.id),
        "task=t".into(),
        "vendor=acme".into(),
    ] {
        assert!(line.contains(&field), "{field} missing: {line}");
    }
}

#[test]
fn a_nested_folder_copy_and_a_rename_into_the_drop_folder_are_both_picked_up() {
    // Rescans are hours apart: only events (and the look after a new folder) find these.
    let env = Env::new(Opts::default());
    let d = Daemon::start(&env);
    let model = demo_model();
    // A whole vendor tree appears at once (new nested folders: inotify misses some events).
    let nested = env.sub("t/newvendor/v1");
    write_files(
        &nested,
        &[("submission.toml", ONE_SLICE), ("model.pt", &model)],
    );
    // A folder prepared elsewhere on the same file system, renamed into place.
    let staged = env.path("staging/v2");
    write_files(&staged, &[("model.pt", &slow_model(1))]);
    std::fs::create_dir_all(env.sub("t/acme")).unwrap();
    let renamed = env.sub("t/acme/v2");
    std::fs::rename(&staged, &renamed).unwrap();
    for dir in [&nested, &renamed] {
        wait_state(&env, &d, dir, &[State::Mailed]);
        assert!(dir.join("summary.json").is_file());
        assert_eq!(env.for_path(dir).len(), 1);
    }
}

#[test]
fn poll_mode_picks_up_submissions_without_inotify() {
    let env = Env::new(Opts {
        watch: "poll",
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let dir = env.sub("t/nfs/v1");
    write_files(&dir, &[("model.pt", &demo_model())]);
    wait_state(&env, &d, &dir, &[State::Mailed]);
    assert_eq!(env.for_path(&dir).len(), 1);
}

#[test]
fn systemd_hears_ready_status_watchdog_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let env = Env::new(Opts::default());
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut d = Daemon::start_with(
        &env,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut heard = String::new();
    let listen_until = |d: &Daemon, what: &str, heard: &mut String| {
        wait_until(&format!("sd_notify {what} (heard: {heard})"), d, || {
            let mut buf = [0u8; 4096];
            if let Ok(n) = sock.recv(&mut buf) {
                heard.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            heard.contains(what).then_some(())
        })
    };
    listen_until(&d, "READY=1", &mut heard);
    assert!(heard.contains("STATUS="), "{heard}");
    // At half of WATCHDOG_USEC, while the store answers.
    heard.clear();
    listen_until(&d, "WATCHDOG=1", &mut heard);
    heard.clear();
    listen_until(&d, "WATCHDOG=1", &mut heard);
    d.signal(libc::SIGHUP);
    heard.clear();
    listen_until(&d, "RELOADING=1", &mut heard);
    listen_until(&d, "READY=1", &mut heard);
    assert!(heard.contains("MONOTONIC_USEC="), "{heard}");
    d.signal(libc::SIGTERM);
    heard.clear();
    listen_until(&d, "STOPPING=1", &mut heard);
    let (st, _) = d.wait_exit(Duration::from_secs(30));
    assert!(st.success());
}

#[test]
fn two_submissions_queue_in_order_and_requeue_runs_one_again() {
    let env = Env::new(Opts {
        cases: 3,
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let (a, b) = (env.sub("t/acme/a"), env.sub("t/acme/b"));
    write_files(
        &a,
        &[
            ("submission.toml", ONE_SLICE),
            ("model.pt", &slow_model(10)),
        ],
    );
    // B arrives while A is being evaluated.
    wait_state(
        &env,
        &d,
        &a,
        &[State::Running, State::Reported, State::Mailed],
    );
    write_files(
        &b,
        &[
            ("submission.toml", ONE_SLICE),
            ("model.pt", &slow_model(11)),
        ],
    );
    let sa = wait_state(&env, &d, &a, &[State::Mailed]);
    let sb = wait_state(&env, &d, &b, &[State::Mailed]);
    let (ha, hb) = (env.history(sa.id), env.history(sb.id));
    assert!(at(&ha, State::Queued) < at(&hb, State::Queued));
    assert!(
        at(&ha, State::Reported) <= at(&hb, State::Running),
        "one evaluation at a time, in order: A {ha:#?}\nB {hb:#?}"
    );

    let st = crate::util::run_ok(evald().args(["status", "--config"]).arg(&env.cfg));
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains(&format!("#{} t/acme/a", sa.id)) && text.contains("last results"),
        "{text}"
    );
    let js = crate::util::run_ok(evald().args(["status", "--json", "--config"]).arg(&env.cfg));
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
    assert_eq!(v["recent"].as_array().unwrap().len(), 2);

    // Same model, same task: only the admin gets it evaluated again.
    crate::util::run_ok(
        evald()
            .args(["requeue", &sa.id.to_string(), "--config"])
            .arg(&env.cfg),
    );
    assert_eq!((env.emails_for("a"), env.emails_for("b")), (1, 1));
    wait_until("the requeued evaluation", &d, || {
        let h = env.history(sa.id);
        (count(&h, State::Mailed) == 2).then_some(())
    });
    assert_eq!(
        (env.emails_for("a"), env.emails_for("b")),
        (2, 1),
        "a requeued evaluation is mailed again"
    );
    let again = evald()
        .args(["requeue", "999", "--config"])
        .arg(&env.cfg)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("#999 does not exist"));
}

#[test]
fn kill_9_during_an_evaluation_then_restart_gives_exactly_one_report() {
    let env = Env::new(Opts {
        cases: 6,
        ..Opts::default()
    });
    let mut d = Daemon::start(&env);
    let dir = evaluation_in_flight(&env, &d, "t/acme/k", 25);
    d.kill9();
    assert!(!dir.join("summary.json").exists());
    // The store still says running; status says no service runs it.
    let status = crate::util::run_ok(evald().args(["status", "--config"]).arg(&env.cfg));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("no evald serve is running on this state folder"),
        "{text}"
    );
    assert_eq!(
        env.for_path(&dir)[0].state,
        State::Running,
        "as the kill left it"
    );

    let d = Daemon::start(&env);
    let s = wait_state(&env, &d, &dir, &[State::Mailed]);
    assert_eq!(env.for_path(&dir).len(), 1);
    assert_eq!(s.attempts, 2);
    let h = env.history(s.id);
    assert_eq!(
        states(&h),
        [
            State::Seen,
            State::Queued,
            State::Running,
            State::Queued,
            State::Running,
            State::Reported,
            State::Mailed
        ]
    );
    let outputs: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "model.pt" && n != "submission.toml")
        .collect();
    let mut outputs = outputs;
    outputs.sort();
    assert_eq!(outputs, ["report.xlsx", "summary.json"]);
    assert_eq!(env.emails_for("k"), 1, "one email after the restart");
    assert_eq!(
        read_json(&dir.join("summary.json"))["evald"]["cases_scored"],
        6
    );
}

#[test]
fn sighup_keeps_the_old_config_when_the_new_one_is_broken_and_applies_a_good_one() {
    let o = Opts::default();
    let env = Env::new(o);
    let d = Daemon::start(&env);
    let model = demo_model();

    // Broken: an unknown key. The service keeps running on the old configuration.
    std::fs::write(
        &env.cfg,
        env.config_text(o, &["t"]) + "\n[pool]\nworkerz = 2\n",
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reload failed; keeping the previous configuration");
    let first = env.sub("t/acme/v1");
    write_files(&first, &[("model.pt", &model)]);
    wait_state(&env, &d, &first, &[State::Mailed]);

    // A task that does not exist yet: refused.
    let later = env.sub("t2/acme/v1");
    write_files(&later, &[("model.pt", &slow_model(2))]);
    let r = wait_state(&env, &d, &later, &[State::Rejected]);
    assert_eq!(r.reject_code.as_deref(), Some("unknown-task"));

    // Good: task t2 added. Applied, and the refused folder is looked at again.
    env.write_config(o, &["t", "t2"]);
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded");
    wait_state(&env, &d, &later, &[State::Mailed]);
    assert!(
        !later.join("REJECTED.txt").exists(),
        "stale rejection removed"
    );
}

#[test]
fn sigterm_exits_0_within_the_grace_period_and_leaves_the_store_consistent() {
    let env = Env::new(Opts {
        cases: 6,
        grace_secs: 20,
        ..Opts::default()
    });
    let mut d = Daemon::start(&env);
    let dir = evaluation_in_flight(&env, &d, "t/acme/s", 25);
    d.signal(libc::SIGTERM);
    // Bounded wait only: whether the stop stayed within the grace period is told by the
    // store's note below ("interrupted by shutdown", not "grace period ... ran out").
    let (st, _) = d.wait_exit(DEADLINE);
    assert!(st.success(), "exit status {st:?}\n{}", d.log());
    let log = d.log();
    assert!(log.contains("evald stopped"), "{log}");

    let store = Store::open_existing(&env.state).unwrap().unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(store.in_state(State::Running).unwrap().is_empty());
    let s = env.for_path(&dir).pop().unwrap();
    assert_eq!(s.state, State::Queued, "unfinished evaluation queued again");
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("interrupted by shutdown"),
        "{s:?}"
    );
    assert!(
        !s.error.as_deref().unwrap_or("").contains("grace period"),
        "the case in flight finished within the grace period: {s:?}"
    );
    assert!(!dir.join("summary.json").exists(), "no partial report");
    drop(store);

    // The next start finishes it.
    let d = Daemon::start(&env);
    wait_state(&env, &d, &dir, &[State::Mailed]);
    assert_eq!(env.for_path(&dir).len(), 1);
}

#[test]
fn a_case_longer_than_the_grace_period_is_abandoned_and_queued_again() {
    let env = Env::new(Opts {
        cases: 1,
        dims: [32, 32, 2],
        grace_secs: 1,
        ..Opts::default()
    });
    // A model that never returns (the pool's hang fixture; case_timeout is 600 s): a stop
    // that waited for the case would never end, so the bounded wait for the exit below
    // tells abandoning from waiting without timing the stop. The case is in flight once
    // the worker has spent 2 s of CPU (loading the model takes well under 0.1 s), a state
    // rather than a sleep.
    let mut d = Daemon::start(&env);
    let dir = env.sub("t/acme/long");
    crate::hostile::write_hanging_submission(&dir);
    let pid: u32 = wait_until("a worker", &d, || {
        let log = d.log();
        let line = log.lines().find(|l| l.contains("worker ready"))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.trim_matches('"').parse().ok())
    });
    wait_until("the worker to be inside the model", &d, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        (ticks >= 2 * hz).then_some(())
    });
    d.signal(libc::SIGTERM);
    let (st, _) = d.wait_exit(DEADLINE);
    assert!(st.success(), "exit status {st:?}\n{}", d.log());
    let s = env.for_path(&dir).pop().unwrap();
    assert_eq!(s.state, State::Queued, "{s:?}\n{}", d.log());
    assert!(
        s.error
            .as_deref()
            .unwrap_or_default()
            .contains("grace period"),
        "{s:?}\n{}",
        d.log()
    );
    assert!(d.log().contains("evald stopped"), "{}", d.log());
}

#[test]
fn every_rejection_writes_its_rejected_txt_and_the_service_keeps_serving() {
    let env = Env::new(Opts {
        log_format: "json",
        ..Opts::default()
    });
    let mut d = Daemon::start(&env);
    let model = demo_model();
    let good = env.sub("t/acme/good");
    write_files(&good, &[("model.pt", &model)]);
    wait_state(&env, &d, &good, &[State::Mailed]);

    let outside = env.path("outside.pt");
    std::fs::write(&outside, &model).unwrap();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "unknown-task",
            env.sub("nosuchtask/acme/v1"),
            "is not a task evaluated here",
        ),
        ("model", env.sub("t/acme/nomodel"), "missing"),
        ("model", env.sub("t/acme/empty"), "is empty"),
        ("model", env.sub("t/acme/dirmodel"), "not a regular file"),
        ("manifest", env.sub("t/acme/syntax"), "submission.toml"),
        ("manifest", env.sub("t/acme/unknownkey"), "inptu"),
        ("manifest", env.sub("t/acme/badvalue"), "volume2d"),
        ("symlink", env.sub("t/acme/link"), "outside the drop folder"),
        ("symlink", env.sub("t/acme/linkdir"), "is a symbolic link"),
        (
            "not-loadable",
            env.sub("t/acme/garbage"),
            "cannot load as TorchScript",
        ),
        (
            "duplicate",
            env.sub("t/other/copy"),
            "already submitted for this task",
        ),
        (
            "unsupported-format",
            env.sub("t/acme/exported"),
            "torch.export ExportedProgram",
        ),
        ("unsupported-format", env.sub("t/acme/aoti"), "AOTInductor"),
        (
            "unsupported-format",
            env.sub("t/acme/checkpoint"),
            "bare PyTorch checkpoint",
        ),
        (
            "unsupported-format",
            env.sub("t/acme/customtrainer"),
            "trainer \"MyTrainer\" is not supported",
        ),
        ("model", env.sub("t/acme/two"), "more than one model"),
    ];
    write_files(&cases[0].1, &[("model.pt", &model)]);
    write_files(&cases[1].1, &[("submission.toml", ONE_SLICE)]);
    write_files(&cases[2].1, &[("model.pt", b"")]);
    std::fs::create_dir_all(cases[3].1.join("model.pt")).unwrap();
    std::fs::write(cases[3].1.join("notes.txt"), b"x").unwrap();
    write_files(
        &cases[4].1,
        &[("model.pt", &model), ("submission.toml", b"input = [")],
    );
    write_files(
        &cases[5].1,
        &[
            ("model.pt", &model),
            ("submission.toml", b"inptu = \"slices2d\"\n"),
        ],
    );
    write_files(
        &cases[6].1,
        &[
            ("model.pt", &model),
            ("submission.toml", b"input = \"volume2d\"\n"),
        ],
    );
    std::fs::create_dir_all(&cases[7].1).unwrap();
    std::os::unix::fs::symlink(&outside, cases[7].1.join("model.pt")).unwrap();
    // The whole submission folder is a link out of the drop folder: the rejection goes
    // beside the link, never through it.
    let linked = env.path("linked-folder");
    write_files(&linked, &[("model.pt", &model)]);
    std::os::unix::fs::symlink(&linked, &cases[8].1).unwrap();
    write_files(
        &cases[9].1,
        &[("model.pt", b"this is not a TorchScript archive")],
    );
    write_files(&cases[10].1, &[("model.pt", &model)]);
    // A torch.export archive, and an AOTInductor package (its zip names aotinductor/ files).
    write_files(
        &cases[11].1,
        &[("model.pt2", b"PK\x03\x04model/archive_format pt2")],
    );
    write_files(
        &cases[12].1,
        &[("model.pt2", b"PK\x03\x04model/data/aotinductor/model/x.so")],
    );
    write_files(&cases[13].1, &[("best.pth", b"\x80\x02}q\x00.")]);
    let nnunet = |dir: &Path, trainer: &str| {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres");
        let to = dir.join(format!("{trainer}__nnUNetPlansTiny__3d_fullres"));
        std::fs::create_dir_all(to.join("fold_0")).unwrap();
        for f in ["plans.json", "dataset.json"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
        std::fs::write(to.join("fold_0/checkpoint_final.pth"), b"weights").unwrap();
    };
    nnunet(&cases[14].1, "MyTrainer");
    nnunet(&cases[15].1, "nnUNetTrainer");
    write_files(&cases[15].1, &[("model.pt", &slow_model(5))]);

    for (code, dir, says) in &cases {
        let s = wait_state(
            &env,
            &d,
            dir,
            &[State::Rejected, State::Mailed, State::Failed],
        );
        assert_eq!(s.state, State::Rejected, "{}: {s:?}", dir.display());
        assert_eq!(s.reject_code.as_deref(), Some(*code), "{}", dir.display());
        let file = if dir.is_symlink() {
            dir.with_file_name(format!(
                "{}.REJECTED.txt",
                dir.file_name().unwrap().to_string_lossy()
            ))
        } else {
            dir.join("REJECTED.txt")
        };
        let txt =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            txt.contains(says),
            "{}: expected '{says}' in\n{txt}",
            dir.display()
        );
        assert!(txt.contains("How to fix it:"), "{txt}");
        if *code == "duplicate" {
            // Vendor "other" copied vendor "acme"'s model: nothing of acme's is told.
            assert!(
                !txt.contains("acme") && !txt.contains("good"),
                "another vendor's submission leaked into\n{txt}"
            );
        }
    }
    assert!(d.alive(), "the service keeps running");
    assert!(
        !linked.join("REJECTED.txt").exists(),
        "nothing written outside the drop folder"
    );

    // Still serving: a good submission after all that.
    let after = env.sub("t/acme/after");
    write_files(&after, &[("model.pt", &slow_model(3))]);
    wait_state(&env, &d, &after, &[State::Mailed]);
    // Each refusal was recorded once (REJECTED.txt does not make the folder new).
    for (_, dir, _) in &cases {
        assert_eq!(env.for_path(dir).len(), 1, "{}", dir.display());
    }

    // JSON log lines carry the submission's identity.
    let log = std::fs::read_to_string(env.logs.join("evald.log")).unwrap();
    let rejected: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "submission rejected")
        .collect();
    assert_eq!(rejected.len(), cases.len(), "{log}");
    assert!(rejected
        .iter()
        .all(|v| v["id"].is_i64() && v["task"].is_string() && v["vendor"].is_string()));
}

#[test]
fn check_config_lists_every_problem_with_its_key_and_never_the_password() {
    // The documented example: only folders that do not exist on this machine.
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/evald.toml");
    let o = evald()
        .args(["check-config", "--config"])
        .arg(&ex)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    let keys: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().split(": ").next())
        .collect();
    assert!(!keys.is_empty(), "{out}");
    for k in &keys {
        assert!(
            [
                "daemon.drop_dir",
                "daemon.state_dir",
                "daemon.log_dir",
                "tasks.thyroid-ca.images",
                "tasks.thyroid-ca.labels"
            ]
            .contains(k),
            "unexpected problem {k} in\n{out}"
        );
    }

    // Several wrong values at once: all of them, each with its key.
    let env = Env::new(Opts::default());
    let bad = env.path("bad.toml");
    std::fs::write(&bad, "[daemon\n").unwrap();
    let o = evald()
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("(file):"));
    std::fs::write(
        &bad,
        env.config_text(Opts::default(), &["t"])
            .replace("workers = 1", "workers = 0")
            .replace("watch = \"native\"", "watch = \"inotify\"")
            .replace("[mail]", "[mail]\nsmtp_user = \"evald\"")
            .replace(&env.drop.display().to_string(), "/nonexistent/drop"),
    )
    .unwrap();
    let o = evald()
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    for key in [
        "pool.workers:",
        "daemon.watch:",
        "mail.smtp_user:",
        "daemon.drop_dir:",
    ] {
        assert!(out.contains(key), "{key} missing in\n{out}");
    }

    // Valid, with SMTP auth: OK, and the password is not printed.
    let pw = env.path("smtp-password");
    std::fs::write(&pw, "s3cr3t-pw\n").unwrap();
    let good = env.path("good.toml");
    std::fs::write(
        &good,
        env.config_text(Opts::default(), &["t"]).replace(
            "[mail]\ntransport = \"file\"",
            &format!(
                "[mail]\ntransport = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 2525\n\
                 smtp_security = \"none\"\nsmtp_user = \"evald\"\nsmtp_password_file = \"{}\"",
                pw.display()
            ),
        ),
    )
    .unwrap();
    let o = crate::util::run_ok(evald().args(["check-config", "--config"]).arg(&good));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("OK") && out.contains("password from"), "{out}");
    assert!(!out.contains("s3cr3t") && !String::from_utf8_lossy(&o.stderr).contains("s3cr3t"));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed; skipping (CI installs systemd)");
        return;
    }
    // verify needs ExecStart's binary to exist: point it at the one just built.
    let unit = std::fs::read_to_string(root.join("systemd/evald.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/evald serve"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evald.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/evald", env!("CARGO_BIN_EXE_evald")),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // verify exits 0 on unknown keys and bad values; they appear as lines naming the file.
    let about_ours: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("evald.service"))
        .collect();
    assert!(o.status.success() && about_ours.is_empty(), "{all}");

    // sysusers and tmpfiles entries parse and apply (into a scratch root, as root only).
    if unsafe { libc::geteuid() } == 0 {
        let r = dir.path().join("root");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        for f in ["passwd", "group"] {
            std::fs::copy(Path::new("/etc").join(f), r.join("etc").join(f)).unwrap();
        }
        for (tool, file, extra) in [
            ("systemd-sysusers", "systemd/evald.sysusers", None),
            (
                "systemd-tmpfiles",
                "systemd/evald.tmpfiles",
                Some("--create"),
            ),
        ] {
            let mut c = Command::new(tool);
            c.arg(format!("--root={}", r.display()));
            c.args(extra);
            let o = c.arg(root.join(file)).output().unwrap();
            assert!(
                o.status.success()
                    && !String::from_utf8_lossy(&o.stderr)
                        .contains(file.rsplit('/').next().unwrap()),
                "{tool}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(r.join("srv/evald/drop").is_dir());
    }
}

/// The outbox loop sends what the runner queued when the runner wakes it: with the loop's
/// poll set to an hour, an email that arrives within the test's deadline came through the
/// shared wake-up, not a poll. The submission is `mailed` only once its email went, and
/// the store keeps each evaluation's results, which the second email and `evald status`
/// compare against the vendor's previous submission.
#[test]
fn a_queued_email_goes_at_once_and_the_next_one_compares_with_the_stored_results() {
    let env = Env::new(Opts {
        daemon_extra: "outbox_poll_secs = 3600",
        ..Opts::default()
    });
    let d = Daemon::start(&env);
    let v1 = env.sub("t/acme/v1");
    write_files(
        &v1,
        &[("submission.toml", ONE_SLICE), ("model.pt", &slow_model(1))],
    );
    let s1 = wait_state(&env, &d, &v1, &[State::Mailed]);
    assert_eq!(env.emails_for("v1"), 1, "mailed means the email went");
    let h = env.history(s1.id);
    assert_eq!(count(&h, State::Reported), 1);
    let mailed = h.iter().find(|t| t.to == State::Mailed).unwrap();
    assert!(
        mailed
            .note
            .as_deref()
            .is_some_and(|n| n.ends_with("_acme_v1.eml")),
        "the note says where it went: {mailed:?}"
    );

    let store = || Store::open_existing(&env.state).unwrap().unwrap();
    let r1 = store()
        .results(s1.id)
        .unwrap()
        .expect("results with the reported state");
    let summary = read_json(&v1.join("summary.json"));
    let run = &summary["evald"]["run"];
    assert_eq!(
        r1.results.testset_hash,
        run["dataset_hash"].as_str().unwrap()
    );
    // The service hashed the test set through its digest cache in the state folder (the
    // next evaluation of an unchanged set reads no file to hash it).
    let cache = std::fs::read_to_string(env.state.join(evald::dataset::DIGEST_CACHE_FILE))
        .expect("the digest cache in the state folder");
    let name = env
        .labels
        .read_dir()
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .file_name();
    assert!(
        cache.contains(&*name.to_string_lossy()),
        "the cache lists the test set's files: {cache}"
    );
    assert_eq!(
        r1.results.model_sha256.as_deref(),
        s1.model_sha256.as_deref()
    );
    assert_eq!(r1.results.cases_scored, 2);
    assert!(r1.results.failures.is_empty());
    for label in ["1", "2"] {
        let want = summary["evald"]["statistics"][label]["Dice"]["median"].as_f64();
        let got = r1.results.statistics.per_class[&label.parse::<u8>().unwrap()]
            [&evald::metrics::aggregate::Metric::Dice]
            .median;
        assert_eq!(
            want,
            got.is_finite().then_some(got),
            "class {label} Dice median"
        );
    }
    assert_eq!(
        r1.results
            .statistics
            .patient
            .map(|p| (p.tp, p.fp, p.fn_, p.tn)),
        Some((
            summary["evald"]["patient_level"]["tp"].as_u64().unwrap() as u32,
            summary["evald"]["patient_level"]["fp"].as_u64().unwrap() as u32,
            summary["evald"]["patient_level"]["fn"].as_u64().unwrap() as u32,
            summary["evald"]["patient_level"]["tn"].as_u64().unwrap() as u32,
        ))
    );

    // The vendor's next submission: its email shows the change against v1, from the store
    // (v1's summary.json is gone: nothing is read from beside the folder).
    std::fs::remove_file(v1.join("summary.json")).unwrap();
    let v2 = env.sub("t/acme/v2");
    write_files(
        &v2,
        &[("submission.toml", ONE_SLICE), ("model.pt", &slow_model(2))],
    );
    let s2 = wait_state(&env, &d, &v2, &[State::Mailed]);
    let (prev, _) = store().previous_results(s2.id).unwrap().expect("v1");
    assert_eq!(prev.id, s1.id);
    let eml = std::fs::read_dir(env.path("outbox"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with("_acme_v2.eml"))
        .expect("v2's email");
    let msg = crate::mail::parse_eml(&eml.path(), &env.path("parsed"));
    assert!(
        msg.text
            .contains("Change against v1 (the vendor's previous submission):"),
        "{}",
        msg.text
    );

    let st = crate::util::run_ok(evald().args(["status", "--config"]).arg(&env.cfg));
    let text = String::from_utf8_lossy(&st.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("#{} t/acme/v2", s2.id)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(&format!("vs v1 (#{}): ", s1.id)) && line.contains("thyroid "),
        "{line}"
    );
    assert!(text.contains("outbox: 2 sent"), "{text}");
    let js = crate::util::run_ok(evald().args(["status", "--json", "--config"]).arg(&env.cfg));
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
    let r2 = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == s2.id)
        .expect("v2 in the results");
    assert_eq!(r2["previous"]["id"], s1.id);
    assert_eq!(r2["previous"]["comparable"], true);
    assert_eq!(v["outbox"], serde_json::json!([["sent", 2]]));
}

/// A state database written by the schema-1 release (tests/data/store, see its
/// PROVENANCE.md) opens with this build: every row and state is kept, the results tables
/// are added (version 2's, and version 3's per-case values), and `evald status` reads it.
#[test]
fn a_version_1_store_migrates_in_place() {
    let env = Env::new(Opts::default());
    std::fs::create_dir_all(&env.state).unwrap();
    let gz = std::fs::File::open(crate::util::data("store/v1.db.gz")).unwrap();
    let mut db = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut db).unwrap();
    std::fs::write(env.state.join("evald.db"), &db).unwrap();
    let raw = || rusqlite::Connection::open(env.state.join("evald.db")).unwrap();
    let events_before: i64 = raw()
        .query_row("SELECT COUNT(*) FROM submission_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        events_before, 13,
        "the fixture as PROVENANCE.md describes it"
    );

    // `evald status` first: it opens (and migrates) the file itself.
    let st = crate::util::run_ok(evald().args(["status", "--config"]).arg(&env.cfg));
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains(
            "submissions: 0 seen, 1 queued, 0 running, 0 reported, 1 mailed, 1 rejected, 0 failed"
        ),
        "{text}"
    );
    assert!(text.contains("1. #1 thyroid-ca/demo-vendor/v1"), "{text}");
    // Reported before results were kept: the stored headline.
    assert!(
        text.contains("#3 thyroid-b/demo-vendor/v1  mailed")
            && text.contains("Dice thyroid 0.977, nodule 0.828; 2/2 cases scored"),
        "{text}"
    );
    assert!(text.contains("outbox: 1 queued, 1 sent"), "{text}");

    let store = Store::open_existing(&env.state).unwrap().unwrap();
    let subs = store.all().unwrap();
    let got: Vec<(i64, &str, State)> = subs
        .iter()
        .map(|s| (s.id, s.name.as_str(), s.state))
        .collect();
    assert_eq!(
        got,
        [
            (1, "v1", State::Queued),
            (2, "v1-copy", State::Rejected),
            (3, "v1", State::Mailed)
        ]
    );
    assert_eq!(subs[1].reject_code.as_deref(), Some("duplicate"));
    assert_eq!(
        subs[0].queue_seq,
        Some(3),
        "requeued: a new place in the queue"
    );
    let events: usize = (1..=3).map(|id| store.history(id).unwrap().len()).sum();
    assert_eq!(events as i64, events_before, "every event kept");
    assert_eq!(
        states(&store.history(3).unwrap()),
        [
            State::Seen,
            State::Queued,
            State::Running,
            State::Reported,
            State::Mailed
        ]
    );
    for id in 1..=3 {
        assert!(
            store.results(id).unwrap().is_none(),
            "no results before version 2"
        );
    }
    let c = raw();
    let version = |component: &str| -> Option<i64> {
        c.query_row(
            "SELECT version FROM evald_schema WHERE component = ?1",
            [component],
            |r| r.get(0),
        )
        .ok()
    };
    assert_eq!(
        version(evald::store::COMPONENT),
        Some(evald::store::SCHEMA_VERSION)
    );
    for table in [
        "submission_results",
        "submission_failures",
        "submission_cases",
    ] {
        let n: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "{table}");
    }
    // The outbox keeps its rows, and records its own version when it opens the file.
    let outbox = evald::mail::Outbox::open(&env.state.join("evald.db")).unwrap();
    let rows: Vec<(Option<String>, evald::mail::State)> = outbox
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.state))
        .collect();
    assert_eq!(
        rows,
        [
            (Some("submission-1-1".into()), evald::mail::State::Sent),
            (Some("submission-3-2".into()), evald::mail::State::Queued)
        ]
    );
    assert_eq!(
        version(evald::mail::outbox::COMPONENT),
        Some(evald::mail::outbox::SCHEMA_VERSION)
    );
    assert_eq!(store.integrity_check().unwrap(), "ok");
}
