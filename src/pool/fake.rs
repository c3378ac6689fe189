//! A scriptable fake worker for the supervisor's tests, and those tests.
//!
//! [`FakeLauncher`] is a [`Launcher`] whose "worker" is a thread of the test process
//! speaking the real frame protocol ([`protocol::read_frame`] / [`protocol::write_frame`])
//! over Unix socket pairs, one per stream. A [`Script`] says per launch how the start goes
//! and per case request what the worker does (answer, fail, hang, go silent, die, send
//! garbage); a [`Record`] says what happened (launches, kills). Killing a fake shuts its
//! sockets down, which is what a dead process's pipes look like to the supervisor.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::launch::{LaunchError, LaunchSpec, Launched, Launcher, WorkerHandle};
use super::lock;
use super::protocol::{self, CaseErrorKind, FatalKind, FromWorker, ToWorker, PROTO_VERSION};
use crate::infer::PredictStats;

/// How a launch goes.
#[derive(Debug, Clone)]
pub(crate) enum Start {
    /// Hello, Init, Ready.
    Ok,
    /// The launcher itself fails (no process), with this OS error text.
    LaunchFails(String),
    /// The worker writes this line to its log and exits with code 1 before its hello.
    DiesBeforeHello(String),
    /// The worker answers Init with a Fatal.
    Fatal(FatalKind, String),
}

/// What the worker does with one case request.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// Write the mask, answer Done.
    Done,
    /// Write the mask, answer Done, then exit with code 1 at once (the next worker of
    /// the slot starts by emptying the scratch folder the mask was written to).
    DoneThenDie,
    /// Answer Failed.
    Fail(CaseErrorKind, String),
    /// Never answer; heartbeats go on (a model that never returns).
    Hang,
    /// Never answer, stop heart-beating (a frozen process).
    Silent,
    /// Write this line to the log, exit with code 1 (a crash).
    Die(String),
    /// Write these bytes to the frame stream as they are, then carry on (answering
    /// nothing more: the supervisor has to act).
    Raw(Vec<u8>),
    /// Write these bytes, then exit with code 0.
    RawThenExit(Vec<u8>),
    /// Send this frame instead of an answer, then carry on answering nothing.
    Send(FromWorker),
}

/// A case request as the fake worker sees it.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// Which launch (0, 1, ... over the pool's life).
    pub worker: usize,
    /// The job id.
    pub id: u64,
    /// The case.
    pub case: String,
    /// How many times any worker got this case so far, this one included (1 = first).
    pub nth: usize,
}

type StartFn = dyn Fn(usize, usize) -> Start + Send + Sync;
type CaseFn = dyn Fn(&Request) -> Act + Send + Sync;

/// How the fake workers behave.
pub(crate) struct Script {
    /// By launch number and slot.
    pub start: Box<StartFn>,
    /// By request.
    pub case: Box<CaseFn>,
    /// Whether workers send heartbeats (at the period the Init asks).
    pub heartbeats: bool,
}

impl Script {
    /// Every start goes well; cases go as `case` says; no heartbeats.
    pub fn cases(case: impl Fn(&Request) -> Act + Send + Sync + 'static) -> Script {
        Script {
            start: Box::new(|_, _| Start::Ok),
            case: Box::new(case),
            heartbeats: false,
        }
    }
}

/// What the fake workers went through.
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// The slot of each launch, in order (failed launches included).
    pub launches: Vec<usize>,
    /// Launches killed by the supervisor (while still running).
    pub killed: Vec<usize>,
    /// Case requests received so far, by case.
    pub seen: HashMap<String, usize>,
}

/// The [`Launcher`] of fake workers.
#[derive(Clone)]
pub(crate) struct FakeLauncher {
    script: Arc<Script>,
    record: Arc<Mutex<Record>>,
}

impl std::fmt::Debug for FakeLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLauncher").finish_non_exhaustive()
    }
}

impl FakeLauncher {
    pub fn new(script: Script) -> Self {
        FakeLauncher {
            script: Arc::new(script),
            record: Arc::default(),
        }
    }

    /// What happened so far.
    pub fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        lock(&self.record)
    }
}

impl Launcher for FakeLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let n = {
            let mut r = lock(&self.record);
            r.launches.push(spec.slot);
            r.launches.len() - 1
        };
        let io_err = |source: std::io::Error| LaunchError::Spawn {
            program: PathBuf::from("fake-worker"),
            slot: spec.slot,
            device: spec.device.clone(),
            source,
        };
        let start = (self.script.start)(n, spec.slot);
        if let Start::LaunchFails(why) = &start {
            return Err(io_err(std::io::Error::other(why.clone())));
        }
        let (sup_req, req) = UnixStream::pair().map_err(io_err)?;
        let (out, sup_out) = UnixStream::pair().map_err(io_err)?;
        let (err, sup_err) = UnixStream::pair().map_err(io_err)?;
        let ends = Ends {
            req: req.try_clone().map_err(io_err)?,
            out: out.try_clone().map_err(io_err)?,
            err: err.try_clone().map_err(io_err)?,
        };
        let (exit_tx, exit_rx) = mpsc::channel();
        let worker = FakeWorker {
            n,
            start,
            script: Arc::clone(&self.script),
            record: Arc::clone(&self.record),
            req,
            out: Arc::new(Mutex::new(out)),
            err,
        };
        let thread = std::thread::Builder::new()
            .name(format!("fake-worker{n}"))
            .spawn(move || {
                let code = worker.run();
                let _ = exit_tx.send(code);
            })
            .map_err(io_err)?;
        Ok(Launched {
            handle: Box::new(FakeHandle {
                n,
                ends,
                exit: exit_rx,
                thread: Some(thread),
                status: None,
                killed: false,
                record: Arc::clone(&self.record),
            }),
            requests: Box::new(sup_req),
            frames: Box::new(sup_out),
            logs: Box::new(sup_err),
        })
    }
}

/// The worker's ends of its three streams, kept by the handle to "kill" it.
struct Ends {
    req: UnixStream,
    out: UnixStream,
    err: UnixStream,
}

impl Ends {
    /// Like a dead process's pipes: the worker reads and writes nothing any more, the
    /// supervisor's readers see end of stream.
    fn close(&self) {
        for s in [&self.req, &self.out, &self.err] {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct FakeHandle {
    n: usize,
    ends: Ends,
    exit: mpsc::Receiver<i32>,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
    /// Killed once already (the supervisor may kill, then reap with a kill).
    killed: bool,
    record: Arc<Mutex<Record>>,
}

impl WorkerHandle for FakeHandle {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn kill(&mut self) {
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        if self.killed || self.status.is_some() || !running {
            return;
        }
        self.killed = true;
        lock(&self.record).killed.push(self.n);
        self.ends.close();
    }

    fn reap(&mut self, grace: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status = match self.exit.recv_timeout(grace) {
            Ok(code) => ExitStatus::from_raw(code << 8),
            Err(_) => {
                self.kill();
                let _ = self.exit.recv();
                ExitStatus::from_raw(libc::SIGKILL)
            }
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.status = Some(status);
        status
    }
}

struct FakeWorker {
    n: usize,
    start: Start,
    script: Arc<Script>,
    record: Arc<Mutex<Record>>,
    req: UnixStream,
    out: Arc<Mutex<UnixStream>>,
    err: UnixStream,
}

impl FakeWorker {
    /// The worker's life; returns its exit code. Its streams are closed on the way out
    /// (the handle's copies would keep them open otherwise).
    fn run(mut self) -> i32 {
        let code = self.life();
        for s in [&self.req, &self.err] {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = lock(&self.out).shutdown(std::net::Shutdown::Both);
        code
    }

    fn send(&self, msg: &FromWorker) -> bool {
        protocol::write_frame(&mut *lock(&self.out), msg).is_ok()
    }

    fn say(&mut self, line: &str) {
        let _ = writeln!(self.err, "{line}");
    }

    fn life(&mut self) -> i32 {
        if let Start::DiesBeforeHello(words) = self.start.clone() {
            self.say(&words);
            return 1;
        }
        self.send(&FromWorker::Hello {
            proto: PROTO_VERSION,
            pid: 0,
            version: "fake".into(),
        });
        let init = match protocol::read_frame::<_, ToWorker>(&mut self.req) {
            Ok(ToWorker::Init(i)) => i,
            _ => return 2,
        };
        if let Start::Fatal(kind, message) = self.start.clone() {
            self.send(&FromWorker::Fatal { kind, message });
            return 1;
        }
        self.send(&FromWorker::Ready {
            device: init.device.clone(),
            load_secs: 0.0,
            sandbox: crate::sandbox::Report::off(),
        });
        // Heartbeats from their own thread, as a real worker's: they go on whatever the
        // "model" does, until the worker goes silent or its stream is gone.
        let silent = Arc::new(AtomicBool::new(false));
        let (stop_beats, beats_stopped) = mpsc::channel::<()>();
        if self.script.heartbeats {
            let out = Arc::clone(&self.out);
            let silent = Arc::clone(&silent);
            let period = Duration::from_millis(init.heartbeat_ms.max(1));
            std::thread::spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = beats_stopped.recv_timeout(period)
                {
                    if !silent.load(Ordering::SeqCst)
                        && protocol::write_frame(&mut *lock(&out), &FromWorker::Heartbeat).is_err()
                    {
                        return;
                    }
                }
            });
        }
        // Once a worker hangs, goes silent or breaks the protocol it answers nothing more.
        let mut answering = true;
        let code = loop {
            let msg = match protocol::read_frame::<_, ToWorker>(&mut self.req) {
                Ok(m) => m,
                Err(_) => break 0,
            };
            let (id, case) = match msg {
                ToWorker::Case { id, case, .. } => (id, case),
                ToWorker::Shutdown => break 0,
                _ => continue,
            };
            let nth = {
                let mut r = lock(&self.record);
                let c = r.seen.entry(case.clone()).or_default();
                *c += 1;
                *c
            };
            if !answering {
                continue;
            }
            let request = Request {
                worker: self.n,
                id,
                case,
                nth,
            };
            match (self.script.case)(&request) {
                act @ (Act::Done | Act::DoneThenDie) => {
                    let _ = std::fs::write(protocol::mask_path(&init.scratch, id), [0u8]);
                    self.send(&FromWorker::Done {
                        id,
                        voxels: 1,
                        stats: PredictStats::default(),
                        decode_secs: 0.0,
                    });
                    if matches!(act, Act::DoneThenDie) {
                        self.say("exiting after a finished case");
                        break 1;
                    }
                }
                Act::Fail(kind, message) => {
                    self.send(&FromWorker::Failed { id, kind, message });
                }
                Act::Hang => answering = false,
                Act::Silent => {
                    silent.store(true, Ordering::SeqCst);
                    answering = false;
                }
                Act::Die(words) => {
                    self.say(&words);
                    break 1;
                }
                Act::Raw(bytes) => {
                    let _ = lock(&self.out).write_all(&bytes);
                    answering = false;
                }
                Act::RawThenExit(bytes) => {
                    let _ = lock(&self.out).write_all(&bytes);
                    break 0;
                }
                Act::Send(frame) => {
                    self.send(&frame);
                    answering = false;
                }
            }
        };
        drop(stop_beats);
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PoolSettings, SandboxPolicy};
    use crate::evaluation::Stage;
    use crate::exec::Job;
    use crate::pool::supervisor::{probe_spec, Timing};
    use crate::pool::{Outcome, PoolError, PoolPredictor, Task, NEXT_ID};

    /// Bound on any wait in these tests: generous, never reached when things work.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn settings(workers: usize, max_attempts: u32, case_timeout: Duration) -> PoolSettings {
        PoolSettings {
            workers,
            devices: vec!["cpu".into()],
            case_timeout,
            max_attempts,
            max_consecutive_timeouts: 0,
            submission_budget: None,
            threads_per_worker: 1,
            memory_max_bytes: 0,
            sandbox: SandboxPolicy::Off,
        }
    }

    /// Short backoff; no heartbeat deadline unless a test sets one.
    fn timing() -> Timing {
        Timing {
            hello: Duration::from_secs(30),
            heartbeat: Duration::from_millis(25),
            silence: Duration::from_secs(600),
            backoff_start: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            exit_grace: Duration::from_secs(10),
        }
    }

    struct Pool {
        pool: PoolPredictor,
        fake: FakeLauncher,
        _dir: tempfile::TempDir,
    }

    fn job(dir: &std::path::Path) -> Job {
        Job {
            format: crate::infer::ModelFormat::TorchScript,
            model: dir.join("model.pt"),
            model_sha256: None,
            spec: probe_spec(),
            images: dir.join("images"),
            labels: None,
            scratch: dir.join("scratch"),
        }
    }

    fn try_start(
        s: &PoolSettings,
        t: Timing,
        script: Script,
    ) -> (Result<Pool, PoolError>, FakeLauncher) {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeLauncher::new(script);
        let j = job(dir.path());
        let r = PoolPredictor::start_with_launcher(
            s,
            &j,
            Some(j.model.clone()),
            Box::new(fake.clone()),
            t,
        )
        .map(|pool| Pool {
            pool,
            fake: fake.clone(),
            _dir: dir,
        });
        (r, fake)
    }

    fn start(s: &PoolSettings, t: Timing, script: Script) -> Pool {
        try_start(s, t, script).0.expect("the pool starts")
    }

    /// How a case ended: `Ok(attempts)` or the failure's stage, attempts and reason.
    type End = Result<u32, (Stage, u32, String)>;

    impl Pool {
        /// Queue the cases as the predictor does, and wait for every answer.
        fn run(&self, cases: &[&str]) -> HashMap<String, End> {
            let mut waiting = Vec::new();
            for case in cases {
                let (tx, rx) = mpsc::channel();
                let task = Task {
                    id: NEXT_ID.fetch_add(1, Ordering::SeqCst),
                    case: case.to_string(),
                    image: PathBuf::from(format!("/nowhere/{case}.nii.gz")),
                    attempts: 0,
                    history: Vec::new(),
                    reply: tx,
                };
                lock(&self.pool.shared.queue).push_back(task);
                waiting.push((case.to_string(), rx));
            }
            self.pool.shared.wake_all();
            let mut masks = Vec::new();
            let ends = waiting
                .into_iter()
                .map(|(case, rx)| {
                    let end = match rx.recv_timeout(PATIENCE) {
                        Ok(Outcome::Done { attempts, mask, .. }) => {
                            masks.push((case.clone(), mask));
                            Ok(attempts)
                        }
                        Ok(Outcome::Failed(f)) => {
                            assert_eq!(f.case, case);
                            Err((f.stage, f.attempts, f.reason))
                        }
                        Err(e) => panic!("{case}: no answer from the pool ({e})"),
                    };
                    (case, end)
                })
                .collect();
            // Only now, after every answer (so after the workers that wrote the early
            // masks were replaced, and their scratch folders emptied): each mask the
            // pool handed out must still be there.
            for (case, mask) in masks {
                let got = crate::files::read_bounded_untrusted(&mask, 2);
                assert_eq!(got.ok(), Some(vec![0u8]), "{case}: mask {mask:?}");
            }
            ends
        }

        /// No slot thread ended other than by giving up (a panic would end it in
        /// another state).
        fn assert_slots_alive(&self) {
            let infos = self.pool.workers();
            let ok = self
                .pool
                .threads
                .iter()
                .zip(&infos)
                .all(|(t, i)| !t.is_finished() || i.state == crate::pool::SlotState::Stopped);
            assert!(ok, "a slot thread ended: {infos:?}");
        }

        /// Stop the pool (joining its slot threads) and return what it counted.
        fn stop(
            self,
        ) -> (
            crate::exec::Totals,
            Vec<crate::pool::WorkerInfo>,
            FakeLauncher,
        ) {
            self.assert_slots_alive();
            let sh = Arc::clone(&self.pool.shared);
            drop(self.pool);
            let infos = sh.slots.iter().map(|s| lock(&s.info).clone()).collect();
            let totals = lock(&sh.totals).clone();
            (totals, infos, self.fake)
        }
    }

    fn failed(end: &End) -> &(Stage, u32, String) {
        match end {
            Err(f) => f,
            Ok(a) => panic!("expected a failure, got done after {a} attempts"),
        }
    }

    #[test]
    fn a_mask_outlives_the_worker_that_wrote_it() {
        // Every worker dies right after answering: its successor empties the scratch
        // folder at once (1 ms backoff), and every case's mask must still be read.
        let p = start(
            &settings(1, 3, PATIENCE),
            timing(),
            Script::cases(|_| Act::DoneThenDie),
        );
        let ends = p.run(&["a", "b", "c", "d"]);
        for c in ["a", "b", "c", "d"] {
            assert!(ends[c].is_ok(), "{c}: {:?}", ends[c]);
        }
        let (totals, _, _) = p.stop();
        assert_eq!((totals.done, totals.failed), (4, 0));
    }

    #[test]
    fn cuda_out_of_memory_recycles_the_worker_and_the_case_succeeds_on_a_fresh_one() {
        let p = start(
            &settings(1, 3, PATIENCE),
            timing(),
            // Out of memory in the first worker only: done on the fresh one.
            Script::cases(|r| match r.case.as_str() {
                "big" if r.worker == 0 => Act::Fail(
                    CaseErrorKind::OutOfMemory,
                    "CUDA out of memory at batch size 1: tried to allocate 2.00 GiB".into(),
                ),
                _ => Act::Done,
            }),
        );
        let ends = p.run(&["a", "big", "c"]);
        assert_eq!(ends["big"], Ok(2), "retried once, on a fresh worker");
        assert_eq!(ends["a"], Ok(1));
        // Prefetched by the recycled worker, never started there: not counted.
        assert_eq!(ends["c"], Ok(1));
        let (totals, infos, fake) = p.stop();
        let rec = fake.record();
        assert_eq!(
            rec.killed,
            vec![0],
            "the worker that ran out of memory was killed"
        );
        assert_eq!(rec.launches, vec![0, 0], "one fresh worker replaced it");
        assert_eq!(infos[0].restarts, 1);
        assert_eq!((totals.done, totals.failed, totals.retries), (3, 0, 1));
        assert_eq!(totals.worker_losses, 1);
    }

    #[test]
    fn a_case_failing_out_of_memory_on_every_worker_fails_after_max_attempts() {
        let p = start(
            &settings(1, 2, PATIENCE),
            timing(),
            Script::cases(|r| match r.case.as_str() {
                "huge" => Act::Fail(CaseErrorKind::OutOfMemory, "CUDA out of memory".into()),
                _ => Act::Done,
            }),
        );
        let ends = p.run(&["huge", "a"]);
        let (stage, attempts, reason) = failed(&ends["huge"]);
        assert_eq!((*stage, *attempts), (Stage::Inference, 2));
        assert!(reason.contains("CUDA out of memory"), "{reason}");
        assert_eq!(ends["a"], Ok(1));
        let (_, _, fake) = p.stop();
        assert_eq!(
            fake.record().killed,
            vec![0, 1],
            "each attempt's worker recycled"
        );
    }

    #[test]
    fn heartbeat_loss_kills_the_worker_and_the_case_is_retried_on_a_fresh_one() {
        let mut script = Script::cases(|r| match (r.case.as_str(), r.nth) {
            ("quiet", 1) | ("mute", _) => Act::Silent,
            _ => Act::Done,
        });
        script.heartbeats = true;
        let t = Timing {
            // Long against the 25 ms heartbeats of a healthy worker on a loaded machine.
            silence: Duration::from_millis(1500),
            ..timing()
        };
        // The case timeout is far away: only the silence can end these attempts.
        let p = start(&settings(1, 2, PATIENCE), t, script);
        let ends = p.run(&["quiet", "x", "mute"]);
        // A case after them all: a fresh worker took over after the last silence.
        assert_eq!(p.run(&["after"])["after"], Ok(1));
        assert_eq!(ends["quiet"], Ok(2));
        assert_eq!(ends["x"], Ok(1));
        let (stage, attempts, reason) = failed(&ends["mute"]);
        assert_eq!((*stage, *attempts), (Stage::Worker, 2));
        assert!(
            reason.contains("stopped responding (no heartbeat for 1 s); killed"),
            "{reason}"
        );
        let (totals, infos, fake) = p.stop();
        assert_eq!(totals.timeouts, 0, "silence is not a case timeout");
        assert_eq!(totals.retries, 2);
        let rec = fake.record();
        assert_eq!(
            rec.killed.len(),
            3,
            "each silent worker killed: {:?}",
            rec.killed
        );
        assert_eq!(infos[0].restarts, 3);
    }

    #[test]
    fn a_slot_gives_up_after_repeated_failed_starts_and_the_pool_says_why() {
        let words = "error: CUDA driver version is insufficient for CUDA runtime version";
        let script = Script {
            start: Box::new(move |_, _| Start::DiesBeforeHello(words.into())),
            ..Script::cases(|_| Act::Done)
        };
        let (r, fake) = try_start(&settings(1, 3, PATIENCE), timing(), script);
        let Err(PoolError::Startup(why)) = r.map(|_| ()) else {
            panic!("the pool must not start");
        };
        assert!(why.contains(words), "the worker's last words: {why}");
        assert!(why.contains("exited with code 1"), "how it ended: {why}");
        assert_eq!(
            fake.record().launches.len(),
            3,
            "gives up after three starts"
        );

        let script = Script {
            start: Box::new(|_, _| Start::LaunchFails("no node has a free GPU".into())),
            ..Script::cases(|_| Act::Done)
        };
        let (r, fake) = try_start(&settings(2, 3, PATIENCE), timing(), script);
        let Err(PoolError::Startup(why)) = r.map(|_| ()) else {
            panic!("the pool must not start");
        };
        assert!(
            why.contains("spawn fake-worker (slot ") && why.contains("no node has a free GPU"),
            "{why}"
        );
        assert_eq!(fake.record().launches.len(), 6, "three per slot");
    }

    #[test]
    fn a_fatal_start_stops_the_pool_at_once() {
        let script = Script {
            start: Box::new(|_, _| Start::Fatal(FatalKind::Load, "not TorchScript".into())),
            ..Script::cases(|_| Act::Done)
        };
        let (r, fake) = try_start(&settings(1, 3, PATIENCE), timing(), script);
        match r.map(|_| ()) {
            Err(PoolError::Fatal {
                slot: 0,
                kind: Some(FatalKind::Load),
                message,
                ..
            }) => assert!(message.contains("model: not TorchScript"), "{message}"),
            other => panic!("expected a fatal error, got {other:?}"),
        }
        assert_eq!(fake.record().launches.len(), 1, "restarting would not help");
    }

    #[test]
    fn a_slot_that_cannot_start_leaves_the_work_to_the_others() {
        let script = Script {
            start: Box::new(|_, slot| {
                if slot == 1 {
                    Start::DiesBeforeHello("error: no such device".into())
                } else {
                    Start::Ok
                }
            }),
            ..Script::cases(|_| Act::Done)
        };
        let p = start(&settings(2, 3, PATIENCE), timing(), script);
        {
            let st = lock(&p.pool.shared.start);
            let (st, _) = p
                .pool
                .shared
                .start_cv
                .wait_timeout_while(st, PATIENCE, |s| s.gave_up == 0)
                .unwrap();
            assert_eq!((st.ready, st.gave_up), (1, 1));
        }
        let ends = p.run(&["a", "b", "c"]);
        assert!(ends.values().all(|e| *e == Ok(1)), "{ends:?}");
        let (totals, infos, fake) = p.stop();
        assert_eq!(totals.done, 3);
        assert_eq!(infos[1].state, crate::pool::SlotState::Stopped);
        let slot1 = fake.record().launches.iter().filter(|&&s| s == 1).count();
        assert_eq!(slot1, 3);
    }

    /// One misbehaviour: the first attempt of `once` and every attempt of `always` do
    /// `act`; every other request is answered.
    fn misbehaving(act: impl Fn(&Request) -> Act + Send + Sync + 'static) -> Script {
        Script::cases(move |r| match (r.case.as_str(), r.nth) {
            ("once", 1) | ("always", _) => act(r),
            _ => Act::Done,
        })
    }

    /// Run `once`, `always`, `fine` against `script` (two attempts per case) and check
    /// the misbehaving worker was dealt with: `once` done on its retry, `always` failed
    /// with a reason containing `reason`, `fine` untouched; the workers `killed`.
    fn check_violation(script: Script, reason: &str, killed: bool) {
        let p = start(&settings(1, 2, PATIENCE), timing(), script);
        let ends = p.run(&["once", "always", "fine"]);
        assert_eq!(ends["once"], Ok(2), "{reason}: retried on a fresh worker");
        assert_eq!(ends["fine"], Ok(1), "{reason}");
        let (stage, attempts, why) = failed(&ends["always"]);
        assert_eq!((*stage, *attempts), (Stage::Worker, 2), "{why}");
        assert!(why.contains(reason), "expected {reason:?} in: {why}");
        // A case after them all: a fresh worker took over after the last misbehaviour.
        assert_eq!(p.run(&["after"])["after"], Ok(1));
        let (totals, infos, fake) = p.stop();
        assert_eq!((totals.done, totals.failed, totals.retries), (3, 1, 2));
        assert_eq!(totals.worker_losses, 3);
        assert_eq!(infos[0].restarts, 3);
        let rec = fake.record();
        let want: Vec<usize> = if killed { vec![0, 1, 2] } else { vec![] };
        assert_eq!(rec.killed, want, "{reason}");
    }

    #[test]
    fn a_result_for_a_case_not_asked_kills_the_worker() {
        check_violation(
            misbehaving(|r| {
                Act::Send(FromWorker::Done {
                    id: r.id + 1_000_000,
                    voxels: 1,
                    stats: PredictStats::default(),
                    decode_secs: 0.0,
                })
            }),
            "out of order",
            true,
        );
    }

    #[test]
    fn a_second_hello_kills_the_worker() {
        check_violation(
            misbehaving(|_| {
                Act::Send(FromWorker::Hello {
                    proto: PROTO_VERSION,
                    pid: 0,
                    version: "fake".into(),
                })
            }),
            "sent an unexpected Hello",
            true,
        );
    }

    #[test]
    fn garbage_on_the_frame_stream_kills_the_worker() {
        let mut garbage = 9u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\x00garbage!");
        check_violation(
            misbehaving(move |_| Act::Raw(garbage.clone())),
            "sent a malformed frame (bad message",
            true,
        );
    }

    #[test]
    fn an_oversized_length_prefix_kills_the_worker() {
        check_violation(
            misbehaving(|_| Act::Raw(u32::MAX.to_be_bytes().to_vec())),
            "sent a malformed frame (frame of 4294967295 bytes exceeds",
            true,
        );
    }

    #[test]
    fn a_truncated_frame_is_an_ending_and_the_case_is_retried() {
        // A frame that announces 100 bytes, brings 5, and the worker exits: it is gone,
        // not killed; the reason says how the stream ended.
        let mut cut = 100u32.to_be_bytes().to_vec();
        cut.extend_from_slice(b"{\"typ");
        check_violation(
            misbehaving(move |_| Act::RawThenExit(cut.clone())),
            "frame cut short: the stream ended after 9 of its 104 bytes",
            false,
        );
    }

    #[test]
    fn a_case_past_its_timeout_is_retried_then_failed_and_the_others_are_scored() {
        let p = start(
            // Long against a healthy fake's instant answer on a loaded machine.
            &settings(1, 3, Duration::from_secs(1)),
            timing(),
            Script::cases(|r| match (r.case.as_str(), r.nth) {
                ("slow", 1) | ("stuck", _) => Act::Hang,
                _ => Act::Done,
            }),
        );
        let ends = p.run(&["a", "slow", "stuck", "b"]);
        assert_eq!(ends["a"], Ok(1));
        assert_eq!(ends["b"], Ok(1));
        assert_eq!(ends["slow"], Ok(2));
        let (stage, attempts, reason) = failed(&ends["stuck"]);
        // min(max_attempts, 2): a second timeout on a fresh worker is proof enough.
        assert_eq!((*stage, *attempts), (Stage::Timeout, 2));
        assert!(
            reason.contains("no result within pool.case_timeout_secs"),
            "{reason}"
        );
        assert!(reason.contains("after 2 attempts"), "{reason}");
        let (totals, _, fake) = p.stop();
        assert_eq!(totals.timeouts, 3);
        assert_eq!((totals.done, totals.failed, totals.retries), (3, 1, 2));
        assert_eq!(
            fake.record().killed,
            vec![0, 1, 2],
            "each hung worker killed"
        );
    }

    #[test]
    fn a_poison_case_fails_after_max_attempts_and_the_others_are_scored() {
        let p = start(
            &settings(1, 3, PATIENCE),
            timing(),
            Script::cases(|r| match r.case.as_str() {
                "poison" => Act::Die("error: Segmentation fault in the model".into()),
                _ => Act::Done,
            }),
        );
        let ends = p.run(&["a", "poison", "b", "c"]);
        for c in ["a", "b", "c"] {
            assert_eq!(ends[c], Ok(1), "{c}");
        }
        let (stage, attempts, reason) = failed(&ends["poison"]);
        assert_eq!((*stage, *attempts), (Stage::Worker, 3));
        assert!(reason.contains("after 3 attempts"), "{reason}");
        assert!(reason.contains("exited with code 1"), "{reason}");
        assert!(
            reason.contains("Segmentation fault in the model"),
            "{reason}"
        );
        // A fresh worker serves after the third crash.
        assert_eq!(p.run(&["d"])["d"], Ok(1));
        let (totals, infos, fake) = p.stop();
        assert_eq!((totals.done, totals.failed, totals.retries), (4, 1, 2));
        assert_eq!(infos[0].restarts, 3);
        assert!(fake.record().killed.is_empty(), "they died by themselves");
    }
}
