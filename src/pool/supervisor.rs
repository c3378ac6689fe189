//! One thread per worker slot: start the worker, feed it cases, watch it, replace it.
//!
//! The slot thread starts its worker through the pool's [`super::launch::Launcher`] and
//! owns what comes back: the worker's frame streams and its
//! [`super::launch::WorkerHandle`] (kill, reap). It blocks on one channel that carries the
//! worker's frames (from a reader thread), its death (the reader hits EOF), a malformed
//! frame, and wake-ups (new work, shutdown); deadlines (case timeout, heartbeat loss,
//! start-up) are the channel's receive timeout, their lengths [`Timing`] and
//! `pool.case_timeout_secs`. See the module doc of [`super`] for the retry policy.
//!
//! # Locks
//! What a slot alone needs (its worker, the cases it holds, its backoff) is owned by its
//! thread; events reach it over its channel. The state shared with other slots and with
//! callers sits behind one mutex per thing that changes together, each taken through
//! [`super::lock`] (which recovers a poisoned lock: every critical section is one short
//! update) and held for that update only:
//! - `queue` (tasks waiting) and `aborted` (why the evaluation stopped): [`requeue`] and
//!   the predictor check `aborted` while holding `queue`, the only nesting (always queue,
//!   then aborted), so no task slips into a queue nobody serves any more;
//! - `slots[i].info`: a slot's [`super::WorkerInfo`], written by its thread, read by the
//!   others ([`other_idle`], [`give_up`]) and status displays;
//! - `start` with `start_cv`: start-up progress, waited on by the pool's constructor;
//! - `totals`, `broken`, `probe_req`: counters, the all-slots-gave-up reason, a pending
//!   self-check probe.

use std::io::BufReader;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::launch::{LaunchSpec, Launched, WorkerHandle};
use super::protocol::{
    self, CaseErrorKind, FatalKind, FromWorker, Init, ProbeReport, ToWorker, PROTO_VERSION,
};
use super::spawn::{self, Pid};
use super::{lock, Event, Outcome, PoolError, Shared, SlotEvent, SlotState, Task, WINDOW};
use crate::config::PoolSettings;
use crate::evaluation::{Failure, Stage};
use crate::infer::{InferSpec, InputKind, OutputKind, Window};

/// A worker must say hello this soon after exec.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat period asked of workers.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(1000);
/// Silence after which a worker counts as hung (stopped, wedged writer, frozen host).
const SILENCE: Duration = Duration::from_secs(15);
/// Restart backoff: first delay and ceiling.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Consecutive deaths before ready after which a slot gives up.
const START_FAILURES: u32 = 3;
/// How long a worker gets to exit after its stdin closes, before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long the supervisor waits for what: the constants above in production; the
/// supervisor's tests shorten them (with `pool.case_timeout_secs`, the other clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// A worker must say hello this soon after it was launched.
    pub hello: Duration,
    /// Heartbeat period asked of workers.
    pub heartbeat: Duration,
    /// Silence after which a worker counts as hung.
    pub silence: Duration,
    /// First restart delay (doubling, reset by a finished case).
    pub backoff_start: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// How long a worker gets to exit after its requests stream closes, before a kill.
    pub exit_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            hello: HELLO_TIMEOUT,
            heartbeat: HEARTBEAT,
            silence: SILENCE,
            backoff_start: BACKOFF_START,
            backoff_max: BACKOFF_MAX,
            exit_grace: EXIT_GRACE,
        }
    }
}

/// How long loading the model may take.
pub(crate) fn load_timeout(s: &PoolSettings) -> Duration {
    s.case_timeout.max(Duration::from_secs(60))
}

/// A spec for self-check workers (never used for inference).
pub(crate) fn probe_spec() -> InferSpec {
    InferSpec {
        input: InputKind::Slices2d,
        output: OutputKind::Logits,
        window: Window {
            level: 40.0,
            width: 400.0,
        },
        batch_size: 1,
        patch_size: [1, 1, 1],
        overlap: 0.0,
        pad_multiple: 1,
        num_classes: 2,
    }
}

/// A running worker.
struct Live {
    gen: u64,
    pid: Option<u32>,
    device: String,
    handle: Box<dyn WorkerHandle>,
    stdin: Option<Box<dyn std::io::Write + Send>>,
    tail: spawn::StderrTail,
    threads: Vec<std::thread::JoinHandle<()>>,
    sandbox: crate::sandbox::Report,
}

impl Live {
    fn send(&mut self, msg: &ToWorker) -> Result<(), String> {
        match self.stdin.as_mut() {
            Some(w) => protocol::write_frame(w, msg).map_err(|e| e.to_string()),
            None => Err("stdin closed".into()),
        }
    }

    fn last_words(&self) -> String {
        last_words(&self.tail)
    }

    /// Join the frame reader and the log forwarder; they end when the worker's streams
    /// close, i.e. once it (and its process group) is gone.
    fn join_helpers(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Why it is gone, after one of its streams ended (`what`): reaped first (up to
    /// `grace`) so the cause names the exit code or signal, and its last words taken only
    /// then, when its log thread has read them all.
    fn ended(&mut self, grace: Duration, what: &str) -> Cause {
        let status = self.handle.reap(grace);
        self.join_helpers();
        self.crash(&status, what)
    }

    fn crash(&self, status: &std::process::ExitStatus, what: &str) -> Cause {
        Cause::Crash(format!(
            "(pid {}) {} ({what}){}",
            Pid(self.pid),
            spawn::describe_exit(status),
            self.last_words()
        ))
    }

    /// Close its requests, give it `grace` to exit, kill it (its process group), reap,
    /// join the helper threads.
    fn stop(mut self, grace: Duration) -> String {
        self.stdin.take();
        let status = self.handle.reap(grace);
        self.join_helpers();
        spawn::describe_exit(&status)
    }

    fn kill(mut self) -> String {
        self.handle.kill();
        self.stop(Duration::ZERO)
    }
}

/// The most telling line a worker wrote (a panic, a fatal error, or simply the last
/// one), as a suffix for a failure message; empty when it wrote nothing.
/// Move a finished case's mask out of the worker's scratch folder into the pool's own
/// (same file system: a rename), before anything else can happen to that worker: the
/// next worker of the slot starts by emptying the folder, and a mask must outlive the
/// worker that wrote it. If the rename fails the reader reports the file it expected.
fn take_mask(sh: &Shared, slot: usize, id: u64) -> std::path::PathBuf {
    let from = protocol::mask_path(&sh.scratch(slot), id);
    let to = sh.masks().join(format!("{id}.mask"));
    match std::fs::rename(&from, &to) {
        Ok(()) => to,
        Err(_) => from,
    }
}

fn last_words(tail: &spawn::StderrTail) -> String {
    let t = lock(tail);
    let pick = t
        .iter()
        .rev()
        .find(|l| {
            l.contains("panicked")
                || l.contains("ERROR")
                || l.contains("terminate called")
                || l.contains("error")
        })
        .or_else(|| t.last());
    pick.map(|l| format!("; last output: {}", l.chars().take(300).collect::<String>()))
        .unwrap_or_default()
}

enum StartError {
    /// Deterministic: restarting will not help.
    Fatal(PoolError),
    /// Died or timed out while starting.
    Transient(String),
    Shutdown,
}

/// Why a worker's attempt at a case ended badly.
#[derive(Debug)]
enum Cause {
    Crash(String),
    Timeout(Duration),
    Silent(Duration),
    Case(CaseErrorKind, String),
}

impl Cause {
    fn limit(&self, max: u32) -> u32 {
        match self {
            Cause::Crash(_) | Cause::Silent(_) => max,
            Cause::Timeout(_) => max.min(2),
            Cause::Case(k, _) => match k {
                CaseErrorKind::OutOfMemory | CaseErrorKind::Torch => max,
                CaseErrorKind::Read
                | CaseErrorKind::Model
                | CaseErrorKind::BadOutput
                | CaseErrorKind::Write => 1,
            },
        }
    }

    fn stage(&self) -> Stage {
        match self {
            Cause::Crash(_) | Cause::Silent(_) | Cause::Case(CaseErrorKind::Write, _) => {
                Stage::Worker
            }
            Cause::Timeout(_) => Stage::Timeout,
            Cause::Case(CaseErrorKind::Read, _) => Stage::Read,
            Cause::Case(_, _) => Stage::Inference,
        }
    }

    fn describe(&self) -> String {
        match self {
            Cause::Crash(s) => format!("worker process {s}"),
            Cause::Timeout(d) => format!(
                "no result within pool.case_timeout_secs = {} s; worker killed",
                d.as_secs()
            ),
            Cause::Silent(d) => format!(
                "worker stopped responding (no heartbeat for {} s); killed",
                d.as_secs()
            ),
            Cause::Case(CaseErrorKind::OutOfMemory, m) => m.clone(),
            Cause::Case(_, m) => m.clone(),
        }
    }
}

fn set_info(sh: &Shared, slot: usize, f: impl FnOnce(&mut super::WorkerInfo)) {
    f(&mut lock(&sh.slots[slot].info));
}

fn shutting_down(sh: &Shared) -> bool {
    sh.shutdown.load(Ordering::SeqCst)
}

fn aborted(sh: &Shared) -> Option<String> {
    lock(&sh.aborted).clone()
}

/// Stop the evaluation early: no case starts any more, queued ones fail with `why`, every
/// slot kills its worker at its next look (they are woken). The first reason wins.
fn abort(sh: &Shared, why: String) {
    {
        let mut a = lock(&sh.aborted);
        if a.is_some() {
            return;
        }
        tracing::error!("stopping the evaluation: {why}");
        *a = Some(why.clone());
    }
    let tasks: Vec<Task> = lock(&sh.queue).drain(..).collect();
    for t in tasks {
        reply_failed(sh, t, Stage::Aborted, format!("not run: {why}"));
    }
    sh.wake_all();
}

/// Reply a failure to every queued task (pool stopping or broken).
pub(crate) fn fail_queued(sh: &Shared, why: &str) {
    let tasks: Vec<Task> = lock(&sh.queue).drain(..).collect();
    for t in tasks {
        let _ = t.reply.send(Outcome::Failed(Failure {
            case: t.case,
            stage: Stage::Worker,
            reason: why.to_string(),
            attempts: t.attempts,
        }));
    }
}

fn sleep_interruptible(rx: &mpsc::Receiver<Event>, sh: &Shared, d: Duration) {
    let deadline = Instant::now() + d;
    while !shutting_down(sh) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let _ = rx.recv_timeout(deadline - now);
    }
}

/// The slot thread's body.
pub(crate) fn run_slot(sh: &Arc<Shared>, slot: usize, rx: &mpsc::Receiver<Event>) {
    let mut gen = 0u64;
    let timing = sh.timing;
    let mut backoff = timing.backoff_start;
    let mut start_failures = 0u32;
    while !shutting_down(sh) && aborted(sh).is_none() {
        gen += 1;
        set_info(sh, slot, |i| {
            i.state = i.state.on(SlotEvent::Spawn);
            i.pid = None;
        });
        let mut live = match start_worker(sh, slot, gen, rx) {
            Ok(l) => l,
            Err(StartError::Shutdown) => break,
            Err(StartError::Fatal(e)) => {
                tracing::error!(worker = slot, "{e}");
                let msg = e.to_string();
                let mut st = lock(&sh.start);
                if st.fatal.is_none() && st.ready == 0 {
                    st.fatal = Some(e);
                }
                st.gave_up += 1;
                st.last_error = Some(msg.clone());
                drop(st);
                sh.start_cv.notify_all();
                give_up(sh, slot, &msg);
                break;
            }
            Err(StartError::Transient(why)) => {
                start_failures += 1;
                tracing::warn!(
                    worker = slot,
                    attempt = start_failures,
                    "worker failed to start: {why}"
                );
                let gives_up = start_failures >= START_FAILURES;
                {
                    // One critical section: `wait_first_ready` must never see the slot
                    // counted as given up without the reason, or the reverse.
                    let mut st = lock(&sh.start);
                    st.last_error = Some(why.clone());
                    st.gave_up += usize::from(gives_up);
                }
                if gives_up {
                    let msg = format!(
                        "worker {slot} failed to start {start_failures} times in a row; last: {why}"
                    );
                    sh.start_cv.notify_all();
                    give_up(sh, slot, &msg);
                    break;
                }
                set_info(sh, slot, |i| i.state = i.state.on(SlotEvent::Lost));
                sleep_interruptible(rx, sh, backoff);
                backoff = (backoff * 2).min(timing.backoff_max);
                continue;
            }
        };
        start_failures = 0;
        lock(&sh.start).ready += 1;
        sh.start_cv.notify_all();
        let (healthy, end) = serve(sh, slot, &mut live, rx);
        let pid = live.pid;
        let how = match end {
            End::Shutdown | End::Died => live.stop(timing.exit_grace),
            End::Killed => live.kill(),
        };
        if shutting_down(sh) || aborted(sh).is_some() {
            break;
        }
        lock(&sh.totals).worker_losses += 1;
        tracing::warn!(worker = slot, pid, "worker ended: {how}; restarting");
        if healthy {
            backoff = timing.backoff_start;
        }
        set_info(sh, slot, |i| {
            i.state = i.state.on(SlotEvent::Lost);
            i.pid = None;
            i.restarts += 1;
        });
        sleep_interruptible(rx, sh, backoff);
        backoff = (backoff * 2).min(timing.backoff_max);
    }
    set_info(sh, slot, |i| {
        i.state = i.state.on(SlotEvent::Stop);
        i.pid = None;
        i.cases.clear();
    });
}

/// A slot stops for good; when it was the last one, queued work fails.
fn give_up(sh: &Shared, slot: usize, why: &str) {
    set_info(sh, slot, |i| i.state = i.state.on(SlotEvent::Stop));
    let all_stopped = sh
        .slots
        .iter()
        .all(|s| lock(&s.info).state == SlotState::Stopped);
    if all_stopped {
        *lock(&sh.broken) = Some(format!("no worker can run: {why}"));
        fail_queued(sh, &format!("no worker can run: {why}"));
    }
}

fn start_worker(
    sh: &Arc<Shared>,
    slot: usize,
    gen: u64,
    rx: &mpsc::Receiver<Event>,
) -> Result<Live, StartError> {
    let scratch = sh.scratch(slot);
    let device = sh.device(slot);
    let fatal = |kind: Option<FatalKind>, message: String| {
        StartError::Fatal(PoolError::Fatal {
            slot,
            device: device.clone(),
            kind,
            message,
        })
    };
    // A fresh scratch folder per worker: leftovers of a dead one are not trusted.
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .map_err(|e| fatal(None, format!("scratch folder {}: {e}", scratch.display())))?;
    let spec = LaunchSpec {
        slot,
        device: device.clone(),
        scratch: scratch.clone(),
        threads: sh.settings.threads_per_worker.max(1),
    };
    let Launched {
        mut handle,
        requests,
        frames,
        logs,
    } = sh.launcher.launch(&spec).map_err(|e| {
        if shutting_down(sh) {
            StartError::Shutdown
        } else {
            StartError::Transient(e.to_string())
        }
    })?;
    let pid = handle.pid();
    set_info(sh, slot, |i| i.pid = pid);
    let (tail, err_thread) = match spawn::forward_stderr(slot, pid, logs) {
        Ok(x) => x,
        Err(e) => {
            handle.kill();
            let _ = handle.reap(Duration::ZERO);
            return Err(StartError::Transient(format!("log thread: {e}")));
        }
    };
    let tx = sh.slots[slot].tx.clone();
    let mut stdout = BufReader::new(frames);
    let reader = std::thread::Builder::new()
        .name(format!("evald-w{slot}-frames"))
        .spawn(move || loop {
            match protocol::read_frame::<_, FromWorker>(&mut stdout) {
                Ok(m) => {
                    if tx.send(Event::Frame(gen, m)).is_err() {
                        break;
                    }
                }
                // The stream cannot be trusted past a bad frame: stop reading either way.
                Err(e) if e.is_violation() => {
                    let _ = tx.send(Event::Malformed(gen, e));
                    break;
                }
                Err(e) => {
                    let _ = tx.send(Event::Closed(gen, e.to_string()));
                    break;
                }
            }
        });
    let reader = match reader {
        Ok(r) => r,
        Err(e) => {
            handle.kill();
            let _ = handle.reap(Duration::ZERO);
            return Err(StartError::Transient(format!("frame reader thread: {e}")));
        }
    };
    let mut live = Live {
        gen,
        pid,
        device: device.clone(),
        handle,
        stdin: Some(requests),
        tail,
        threads: vec![reader, err_thread],
        sandbox: crate::sandbox::Report::off(),
    };

    // Hello.
    let hello = wait_frame(sh, rx, gen, Instant::now() + sh.timing.hello);
    match hello {
        Ok(FromWorker::Hello { proto, .. }) if proto == PROTO_VERSION => {}
        Ok(FromWorker::Hello { proto, version, .. }) => {
            live.kill();
            return Err(fatal(None, format!(
                "worker binary speaks protocol {proto} (evald {version}), the supervisor {PROTO_VERSION}: install one evald"
            )));
        }
        Ok(other) => {
            live.kill();
            return Err(StartError::Transient(format!(
                "expected hello, got {other:?}"
            )));
        }
        Err(w) => return Err(w.into_start(live, sh.timing.exit_grace)),
    }
    let init = Init {
        proto: PROTO_VERSION,
        slot,
        format: sh.job.format,
        model: sh.model.clone(),
        model_sha256: sh.job.model_sha256.clone(),
        spec: sh.job.spec.clone(),
        device: device.clone(),
        threads: sh.settings.threads_per_worker.max(1),
        read_only: sh.read_only.clone(),
        scratch,
        sandbox: sh.settings.sandbox,
        heartbeat_ms: sh.timing.heartbeat.as_millis() as u64,
    };
    if let Err(e) = live.send(&ToWorker::Init(init)) {
        let how = live.stop(sh.timing.exit_grace);
        return Err(StartError::Transient(format!("sending init: {e}; {how}")));
    }
    // Ready, with heartbeats meanwhile.
    let deadline = Instant::now() + load_timeout(&sh.settings);
    loop {
        match wait_frame(sh, rx, gen, deadline) {
            Ok(FromWorker::Heartbeat) => continue,
            Ok(FromWorker::Ready {
                device: dev,
                load_secs,
                sandbox,
            }) => {
                let missing = sandbox.missing();
                if missing.is_empty() {
                    tracing::info!(
                        worker = slot,
                        pid,
                        device = dev,
                        load_secs = format!("{load_secs:.2}"),
                        "worker ready; sandbox: {sandbox}"
                    );
                } else {
                    tracing::warn!(
                        worker = slot,
                        pid,
                        device = dev,
                        "worker ready WITHOUT parts of its sandbox ({}); sandbox: {sandbox}",
                        missing.join("; ")
                    );
                }
                set_info(sh, slot, |i| i.state = i.state.on(SlotEvent::Ready));
                live.sandbox = sandbox;
                return Ok(live);
            }
            Ok(FromWorker::Fatal { kind, message }) => {
                let _ = live.stop(sh.timing.exit_grace);
                let what = match kind {
                    FatalKind::Sandbox => "sandbox",
                    FatalKind::Load => "model",
                    FatalKind::Device => "device",
                    FatalKind::Protocol => "protocol",
                    FatalKind::Integrity => "model snapshot",
                };
                return Err(fatal(Some(kind), format!("{what}: {message}")));
            }
            Ok(other) => {
                live.kill();
                return Err(StartError::Transient(format!(
                    "expected ready, got {other:?}"
                )));
            }
            Err(w) => return Err(w.into_start(live, sh.timing.exit_grace)),
        }
    }
}

enum WaitErr {
    Timeout,
    Closed(String),
    Malformed(protocol::FrameError),
    Shutdown,
}

impl WaitErr {
    fn into_start(self, live: Live, grace: Duration) -> StartError {
        match self {
            WaitErr::Shutdown => {
                let _ = live.kill();
                StartError::Shutdown
            }
            WaitErr::Timeout => {
                let how = live.kill();
                StartError::Transient(format!("did not start in time; {how}"))
            }
            WaitErr::Closed(e) => {
                // Its last words after it is gone: the log thread has read them all then.
                let tail = std::sync::Arc::clone(&live.tail);
                let how = live.stop(grace);
                let words = last_words(&tail);
                StartError::Transient(format!("{how} ({e}){words}"))
            }
            WaitErr::Malformed(e) => {
                let how = live.kill();
                StartError::Transient(format!("sent a malformed frame ({e}); killed: {how}"))
            }
        }
    }
}

/// Next frame of worker `gen`, skipping wake-ups and stale events.
fn wait_frame(
    sh: &Shared,
    rx: &mpsc::Receiver<Event>,
    gen: u64,
    deadline: Instant,
) -> Result<FromWorker, WaitErr> {
    loop {
        if shutting_down(sh) {
            return Err(WaitErr::Shutdown);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitErr::Timeout);
        }
        match rx.recv_timeout(deadline - now) {
            Ok(Event::Frame(g, m)) if g == gen => return Ok(m),
            Ok(Event::Closed(g, e)) if g == gen => return Err(WaitErr::Closed(e)),
            Ok(Event::Malformed(g, e)) if g == gen => return Err(WaitErr::Malformed(e)),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(WaitErr::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(WaitErr::Shutdown),
        }
    }
}

enum End {
    Shutdown,
    Killed,
    Died,
}

/// Whether another slot's worker is ready and holds nothing (then a second case should
/// go there rather than wait behind this worker's current one).
fn other_idle(sh: &Shared, slot: usize) -> bool {
    sh.slots.iter().enumerate().any(|(i, s)| {
        i != slot && {
            let info = lock(&s.info);
            info.state == SlotState::Ready && info.cases.is_empty()
        }
    })
}

/// Feed the worker cases until it dies, is killed, or the pool shuts down. Returns whether
/// it finished at least one case (healthy) and how it ended.
fn serve(sh: &Shared, slot: usize, live: &mut Live, rx: &mpsc::Receiver<Event>) -> (bool, End) {
    let timeout = sh.settings.case_timeout;
    let silence = sh.timing.silence;
    let mut held: std::collections::VecDeque<Task> = std::collections::VecDeque::new();
    let mut head_since: Option<Instant> = None;
    let mut last_heard = Instant::now();
    let mut healthy = false;
    let mut write_failed: Option<String> = None;
    let update = |held: &std::collections::VecDeque<Task>| {
        set_info(sh, slot, |i| {
            i.cases = held.iter().map(|t| t.case.clone()).collect();
            i.state = i.state.on(if held.is_empty() {
                SlotEvent::Idle
            } else {
                SlotEvent::Took
            });
        });
    };
    loop {
        if shutting_down(sh) {
            let n = held.len();
            for t in held.drain(..) {
                reply_failed(sh, t, Stage::Worker, "the worker pool stopped".into());
            }
            if n > 0 {
                // Do not wait for a case in flight: the model may never return.
                return (healthy, End::Killed);
            }
            return (healthy, End::Shutdown);
        }
        if let Some(why) = aborted(sh) {
            let n = held.len();
            for t in held.drain(..) {
                reply_failed(sh, t, Stage::Aborted, format!("not run to the end: {why}"));
            }
            update(&held);
            // The model may be stuck in the case it holds: never wait for it.
            return (healthy, if n > 0 { End::Killed } else { End::Shutdown });
        }
        if held.is_empty() {
            let req = lock(&sh.probe_req).take();
            if let Some((p, reply)) = req {
                let r = run_probe(sh, live, rx, p);
                let _ = reply.send(r);
                continue;
            }
        }
        // Take work.
        while live.stdin.is_some()
            && held.len() < WINDOW
            && (held.is_empty() || !other_idle(sh, slot))
        {
            let Some(task) = lock(&sh.queue).pop_front() else {
                break;
            };
            let msg = ToWorker::Case {
                id: task.id,
                case: task.case.clone(),
                image: task.image.clone(),
            };
            if held.is_empty() {
                head_since = Some(Instant::now());
            }
            held.push_back(task);
            update(&held);
            if let Err(e) = live.send(&msg) {
                // It stopped reading requests, most likely because it exited. What it
                // answered before is still in its frame stream: read on until that ends
                // (which also says how it ended). The case just sent never reached it.
                if let Some(t) = held.pop_back() {
                    requeue_unstarted(sh, &mut std::collections::VecDeque::from([t]));
                }
                update(&held);
                live.stdin = None;
                write_failed = Some(e);
            }
        }
        if let Some(e) = write_failed.as_ref().filter(|_| held.is_empty()) {
            // Nothing of ours is left in it: reap it (killed after the grace if it lives on
            // without reading) and start a fresh one.
            let what = format!("stopped reading requests: {e}");
            let cause = live.ended(sh.timing.exit_grace, &what);
            lose(sh, slot, live, &mut held, cause);
            return (healthy, End::Died);
        }
        // Wait for something to happen, or a deadline.
        let now = Instant::now();
        let mut deadline = last_heard + silence;
        if let Some(t) = head_since {
            deadline = deadline.min(t + timeout);
        }
        if let Some(end) = sh.budget_end {
            deadline = deadline.min(end);
        }
        let ev = rx.recv_timeout(deadline.saturating_duration_since(now));
        match ev {
            Ok(Event::Frame(g, msg)) if g == live.gen => {
                last_heard = Instant::now();
                match msg {
                    FromWorker::Heartbeat => {}
                    FromWorker::Done {
                        id,
                        stats,
                        decode_secs,
                        ..
                    } => {
                        let Some(task) = pop_head(&mut held, id) else {
                            let cause = Cause::Crash(format!("answered job {id} out of order"));
                            lose(sh, slot, live, &mut held, cause);
                            return (healthy, End::Killed);
                        };
                        healthy = true;
                        sh.consecutive_timeouts.store(0, Ordering::SeqCst);
                        head_since = (!held.is_empty()).then(Instant::now);
                        update(&held);
                        {
                            let mut t = lock(&sh.totals);
                            t.done += 1;
                            t.forward_secs += stats.forward_secs;
                            t.decode_secs += decode_secs;
                            t.predict_secs += stats.total_secs;
                        }
                        let _ = task.reply.send(Outcome::Done {
                            mask: take_mask(sh, slot, task.id),
                            stats,
                            device: live.device.clone(),
                            attempts: task.attempts + 1,
                        });
                    }
                    FromWorker::Failed { id, kind, message } => {
                        let Some(task) = pop_head(&mut held, id) else {
                            let cause = Cause::Crash(format!("answered job {id} out of order"));
                            lose(sh, slot, live, &mut held, cause);
                            return (healthy, End::Killed);
                        };
                        head_since = (!held.is_empty()).then(Instant::now);
                        update(&held);
                        let recycle = kind == CaseErrorKind::OutOfMemory;
                        settle(sh, task, Cause::Case(kind, message), live.pid);
                        if recycle {
                            // Only a new process returns the CUDA caching allocator's memory.
                            requeue_unstarted(sh, &mut held);
                            update(&held);
                            return (healthy, End::Killed);
                        }
                    }
                    other => {
                        let cause = Cause::Crash(format!("sent an unexpected {other:?}"));
                        lose(sh, slot, live, &mut held, cause);
                        return (healthy, End::Killed);
                    }
                }
            }
            Ok(Event::Closed(g, e)) if g == live.gen => {
                let cause = live.ended(sh.timing.exit_grace, &e);
                lose(sh, slot, live, &mut held, cause);
                return (healthy, End::Died);
            }
            Ok(Event::Malformed(g, e)) if g == live.gen => {
                // No grace: a worker that garbles its channel is not trusted to stop.
                let cause = Cause::Crash(format!("sent a malformed frame ({e})"));
                live.handle.kill();
                lose(sh, slot, live, &mut held, cause);
                return (healthy, End::Killed);
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if let Some(end) = sh.budget_end.filter(|&e| now >= e) {
                    let budget = sh.settings.submission_budget.unwrap_or_default();
                    let spent = now.saturating_duration_since(end) + budget;
                    abort(
                        sh,
                        format!(
                            "the evaluation used up its budget of {} s (pool.submission_budget_secs) after {:.0} s",
                            budget.as_secs(),
                            spent.as_secs_f64()
                        ),
                    );
                    // The serve loop's next turn fails what this worker holds and ends it.
                    continue;
                }
                if head_since.is_some_and(|t| now >= t + timeout) {
                    lock(&sh.totals).timeouts += 1;
                    let n = sh.consecutive_timeouts.fetch_add(1, Ordering::SeqCst) + 1;
                    let max = sh.settings.max_consecutive_timeouts;
                    if max > 0 && n >= max {
                        // Before the timed-out case is settled: it is then failed with its
                        // own cause instead of being retried.
                        abort(
                            sh,
                            format!(
                                "{n} case attempts in a row timed out (pool.case_timeout_secs = {} s, \
                                 pool.max_consecutive_timeouts = {max}): the model does not return",
                                timeout.as_secs()
                            ),
                        );
                    }
                    // Stop the model now; the slot reaps it after settling the case.
                    live.handle.kill();
                    lose(sh, slot, live, &mut held, Cause::Timeout(timeout));
                    return (healthy, End::Killed);
                }
                if now >= last_heard + silence {
                    live.handle.kill();
                    lose(sh, slot, live, &mut held, Cause::Silent(silence));
                    return (healthy, End::Killed);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return (healthy, End::Killed);
            }
        }
    }
}

fn run_probe(
    sh: &Shared,
    live: &mut Live,
    rx: &mpsc::Receiver<Event>,
    p: protocol::Probe,
) -> Result<(crate::sandbox::Report, ProbeReport), PoolError> {
    let err = |m: String| PoolError::Startup(format!("self-check worker: {m}"));
    live.send(&ToWorker::Probe(p)).map_err(err)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match wait_frame(sh, rx, live.gen, deadline) {
            Ok(FromWorker::Heartbeat) => {}
            Ok(FromWorker::ProbeResult(r)) => return Ok((live.sandbox.clone(), r)),
            Ok(other) => return Err(err(format!("unexpected {other:?}"))),
            Err(_) => return Err(err("no answer".into())),
        }
    }
}

fn pop_head(held: &mut std::collections::VecDeque<Task>, id: u64) -> Option<Task> {
    if held.front().is_some_and(|t| t.id == id) {
        held.pop_front()
    } else {
        None
    }
}

fn reply_failed(sh: &Shared, t: Task, stage: Stage, reason: String) {
    lock(&sh.totals).failed += 1;
    let _ = t.reply.send(Outcome::Failed(Failure {
        case: t.case,
        stage,
        reason,
        attempts: t.attempts,
    }));
}

/// Count a bad attempt against a task: retry it (front of the queue) or fail it.
fn settle(sh: &Shared, mut task: Task, cause: Cause, pid: Option<u32>) {
    task.attempts += 1;
    let limit = cause.limit(sh.settings.max_attempts);
    let what = cause.describe();
    task.history.push(format!(
        "attempt {} (pid {}): {what}",
        task.attempts,
        Pid(pid)
    ));
    if task.attempts < limit && !shutting_down(sh) && aborted(sh).is_none() {
        tracing::warn!(
            case = task.case,
            attempt = task.attempts,
            limit,
            "{what}; retrying"
        );
        lock(&sh.totals).retries += 1;
        requeue(sh, task);
        sh.wake_all();
    } else {
        let reason = if task.history.len() > 1 {
            format!(
                "{what} (after {} attempts: {})",
                task.attempts,
                task.history.join(" | ")
            )
        } else {
            what
        };
        let stage = cause.stage();
        reply_failed(sh, task, stage, reason);
    }
}

/// Put a task back at the front of the queue, or fail it when the evaluation was stopped
/// (checked under the queue lock, which [`abort`] takes after setting its reason, so no
/// task can slip into a queue nobody serves any more).
pub(crate) fn requeue(sh: &Shared, t: Task) {
    let mut q = lock(&sh.queue);
    match aborted(sh) {
        None => q.push_front(t),
        Some(why) => {
            drop(q);
            reply_failed(sh, t, Stage::Aborted, format!("not run: {why}"));
        }
    }
}

/// Put cases a worker held but had not started back at the front of the queue.
fn requeue_unstarted(sh: &Shared, held: &mut std::collections::VecDeque<Task>) {
    while let Some(t) = held.pop_back() {
        requeue(sh, t);
    }
    sh.wake_all();
}

/// The worker is gone or being killed: the running case takes the blame, the prefetched
/// one goes back untouched.
fn lose(
    sh: &Shared,
    slot: usize,
    live: &Live,
    held: &mut std::collections::VecDeque<Task>,
    cause: Cause,
) {
    tracing::warn!(
        worker = slot,
        pid = live.pid,
        cases = ?held.iter().map(|t| t.case.as_str()).collect::<Vec<_>>(),
        "worker lost: {}",
        cause.describe()
    );
    let head = held.pop_front();
    requeue_unstarted(sh, held);
    if let Some(t) = head {
        settle(sh, t, cause, live.pid);
    }
    set_info(sh, slot, |i| i.cases.clear());
}

/// Send a probe to slot `slot`'s worker (self-check pools only) and wait for the answer.
pub(crate) fn probe(
    sh: &Arc<Shared>,
    slot: usize,
    probe: protocol::Probe,
) -> Result<(crate::sandbox::Report, ProbeReport), PoolError> {
    // The slot thread owns the worker; it sends the probe when it holds no case.
    let (tx, rx) = mpsc::channel();
    *lock(&sh.probe_req) = Some((probe, tx));
    let _ = sh.slots[slot].tx.send(Event::Wake);
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| PoolError::Startup("the self-check worker did not answer".into()))?
}

/// Pending probe request (self-check only): the probe and where to answer.
pub(crate) type ProbeRequest = (
    protocol::Probe,
    mpsc::Sender<Result<(crate::sandbox::Report, ProbeReport), PoolError>>,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_limits_follow_the_documented_policy() {
        assert_eq!(Cause::Crash("x".into()).limit(3), 3);
        assert_eq!(Cause::Silent(SILENCE).limit(3), 3);
        assert_eq!(Cause::Timeout(SILENCE).limit(3), 2);
        assert_eq!(Cause::Timeout(SILENCE).limit(1), 1);
        assert_eq!(Cause::Case(CaseErrorKind::Model, "m".into()).limit(3), 1);
        assert_eq!(
            Cause::Case(CaseErrorKind::BadOutput, "m".into()).limit(3),
            1
        );
        assert_eq!(Cause::Case(CaseErrorKind::Read, "m".into()).limit(3), 1);
        assert_eq!(
            Cause::Case(CaseErrorKind::OutOfMemory, "m".into()).limit(3),
            3
        );
        assert_eq!(Cause::Case(CaseErrorKind::Torch, "m".into()).limit(3), 3);
        assert_eq!(Cause::Timeout(SILENCE).stage(), Stage::Timeout);
        assert_eq!(Cause::Crash("x".into()).stage(), Stage::Worker);
        assert_eq!(
            Cause::Case(CaseErrorKind::Model, "m".into()).stage(),
            Stage::Inference
        );
    }

    #[test]
    fn a_slot_lives_through_its_states_and_stopped_is_final() {
        use SlotEvent as E;
        use SlotState as S;
        let run = |events: &[E]| events.iter().fold(S::Starting, |s, &e| s.on(e));
        assert_eq!(run(&[E::Spawn, E::Ready]), S::Ready);
        assert_eq!(run(&[E::Spawn, E::Ready, E::Took]), S::Busy);
        assert_eq!(run(&[E::Spawn, E::Ready, E::Took, E::Idle]), S::Ready);
        // A worker lost while busy backs off, then starts again.
        assert_eq!(run(&[E::Spawn, E::Ready, E::Took, E::Lost]), S::Backoff);
        assert_eq!(
            run(&[E::Spawn, E::Ready, E::Took, E::Lost, E::Spawn]),
            S::Starting
        );
        // A failed start backs off too.
        assert_eq!(run(&[E::Spawn, E::Lost]), S::Backoff);
        // Nonsense leaves the state alone.
        assert_eq!(run(&[E::Spawn, E::Took]), S::Starting);
        assert_eq!(run(&[E::Spawn, E::Ready, E::Spawn]), S::Ready);
        // Stopped is final, from anywhere.
        for before in [S::Starting, S::Ready, S::Busy, S::Backoff] {
            let s = before.on(E::Stop);
            assert_eq!(s, S::Stopped);
            for e in [E::Spawn, E::Ready, E::Took, E::Idle, E::Lost, E::Stop] {
                assert_eq!(s.on(e), S::Stopped);
            }
        }
    }
}
