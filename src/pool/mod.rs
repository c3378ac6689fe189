//! The supervised worker pool: inference in `evald worker` child processes that may crash,
//! hang, run out of memory or be hostile, without taking the evaluation down.
//!
//! - [`PoolPredictor`] is the local execution [`Backend`] (`backend.kind = "local"`, chosen
//!   in the `backend` module) that `evald run` and the daemon use: `pool.workers`
//!   children of this same binary, bound round-robin to `pool.devices`; each loads the
//!   model once, sandboxes itself ([`crate::sandbox`]) and takes cases.
//! - [`protocol`]: length-delimited JSON frames on stdin / a dedicated fd; image paths in,
//!   masks back as raw files in the worker's scratch folder.
//! - `launch` (private): the seam where a worker runs. The supervisor starts workers
//!   through a `Launcher` and controls each by its `WorkerHandle` (frame streams, pid if
//!   any, kill, reap); the production `ForkLauncher` uses [`spawn`], tests a fake worker.
//! - [`spawn`]: one long-lived spawner thread forks every worker (`PR_SET_PDEATHSIG` is
//!   tied to the forking *thread*), own process group, cleared environment.
//! - [`cgroup`]: the per-worker memory cap (cgroup v2, never `RLIMIT_AS`).
//! - `supervisor` (private): one thread per worker slot running the worker life cycle
//!   [`SlotState`] `Starting -> Ready <-> Busy -> Backoff -> Starting`, `Stopped` final;
//!   its transitions are the pure [`SlotState::on`].
//!
//! # What happens when things go wrong (the retry policy)
//! | what | counted against the case | attempts allowed | stage in the report |
//! |---|---|---|---|
//! | worker dies (signal, exit code, broken pipe), stops heart-beating, or breaks the protocol (a malformed frame, an answer out of order: killed at once) | yes | `max_attempts` | `worker` |
//! | case exceeds `case_timeout` (worker killed) | yes | `min(max_attempts, 2)`: a second timeout on a fresh worker is proof enough, and each costs `case_timeout` | `timeout` |
//! | the model raises or returns unusable output | yes | 1: the same model on the same input fails the same way | `inference` |
//! | CUDA out of memory at batch 1 (after `Model::predict` halved the batch in the same worker) | yes | `max_attempts`, each on a *fresh* worker: only a new process gives the caching allocator's memory back | `inference` |
//! | other libtorch error (device copy, conversion) | yes | `max_attempts`, same worker | `inference` |
//! | image unreadable | yes | 1 | `read` |
//! | a prefetched case whose worker died before starting it | no | requeued as is | - |
//! | the model cannot be loaded, the device is missing, or `pool.sandbox = "required"` cannot be met | - | the pool refuses to start ([`PoolError`]) | - |
//!
//! A retried case goes back to the front of the queue, so another worker (or the restarted
//! one) takes it next. Dead workers restart after a backoff (250 ms doubling to 30 s, reset
//! by a finished case); a slot whose worker dies three times in a row before becoming
//! ready gives up.
//!
//! # Throughput
//! [`Backend::concurrency`] is twice the worker count: each worker holds its current case
//! and the next one, which its decode thread reads while the model runs on the current one
//! (a second case goes to a worker only when no other worker is idle). Scoring happens on
//! the pipeline's threads meanwhile. [`PoolPredictor::totals`] sums forward and decode
//! seconds for the evaluation's log line.

pub mod cgroup;
mod cli;
#[cfg(test)]
mod fake;
mod launch;
pub mod protocol;
pub mod spawn;
mod supervisor;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::PoolSettings;
use crate::dataset::CaseFiles;
use crate::evaluation::{Failure, Stage};
use crate::exec::{Backend, Prediction};
use crate::exec::{Job, Totals};
use crate::infer::PredictStats;
use crate::volume::{self, Volume};

pub use cli::selfcheck_cli;
use protocol::FromWorker;

/// Cases a worker holds at once: the one running and the one being decoded.
const WINDOW: usize = 2;

/// The pool cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The scratch folder cannot be prepared.
    #[error("scratch folder {path}: {source}")]
    Scratch {
        /// The folder.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// This binary cannot be found or a thread cannot be started.
    #[error("cannot start worker processes: {0}")]
    Spawn(String),
    /// A worker refused to work: model not loadable, device missing, sandbox required
    /// but unavailable. Restarting would not help.
    #[error("worker {slot} on {device}: {message}")]
    Fatal {
        /// Slot.
        slot: usize,
        /// Device.
        device: String,
        /// What the worker reported (`None`: the supervisor's own side failed, e.g. the
        /// scratch folder or a worker binary of another version).
        kind: Option<protocol::FatalKind>,
        /// What and why (the model's loader error, the missing sandbox layers, ...).
        message: String,
    },
    /// No worker became ready (they kept dying while starting).
    #[error("no worker became ready: {0}")]
    Startup(String),
}

/// One worker slot, for status displays and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Slot number.
    pub slot: usize,
    /// Device.
    pub device: String,
    /// Current process, if one is running.
    pub pid: Option<u32>,
    /// Where the slot is in its life.
    pub state: SlotState,
    /// Cases it holds (running first).
    pub cases: Vec<String>,
    /// Times its worker was restarted.
    pub restarts: u32,
}

/// A worker slot's state. Its transitions are the pure function [`SlotState::on`], so
/// the whole life cycle is tested without processes; the slot thread only reports what
/// happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// A worker process is being started (spawned, saying hello, loading the model).
    Starting,
    /// Ready and holding no case.
    Ready,
    /// Holding one or two cases (the running one and the prefetched one).
    Busy,
    /// Its worker ended; waiting before the next start.
    Backoff,
    /// Gave up (repeated failed starts, a fatal error), or the pool stopped. Final.
    Stopped,
}

/// What happened to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotEvent {
    /// A new worker is being started.
    Spawn,
    /// The worker said it is ready.
    Ready,
    /// It holds at least one case now.
    Took,
    /// It holds no case any more.
    Idle,
    /// The worker ended (died, killed, failed to start); another start follows.
    Lost,
    /// No more workers for this slot (gave up, fatal, shutdown, evaluation stopped).
    Stop,
}

impl SlotState {
    /// The state after `e`. Events that make no sense in a state (a `Took` while
    /// starting) leave it unchanged; `Stopped` is final.
    pub fn on(self, e: SlotEvent) -> SlotState {
        use SlotEvent as E;
        use SlotState as S;
        match (self, e) {
            (S::Stopped, _) => S::Stopped,
            (_, E::Stop) => S::Stopped,
            (S::Starting | S::Backoff, E::Spawn) => S::Starting,
            (S::Starting, E::Ready) => S::Ready,
            (S::Ready | S::Busy, E::Took) => S::Busy,
            (S::Ready | S::Busy, E::Idle) => S::Ready,
            (S::Starting | S::Ready | S::Busy, E::Lost) => S::Backoff,
            (s, _) => s,
        }
    }

    /// The lower-case name (status displays).
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Busy => "busy",
            SlotState::Backoff => "backoff",
            SlotState::Stopped => "stopped",
        }
    }
}

/// A case waiting for, or held by, a worker.
#[derive(Debug)]
pub(crate) struct Task {
    pub id: u64,
    pub case: String,
    pub image: PathBuf,
    /// Attempts that ended badly so far.
    pub attempts: u32,
    /// What happened in them.
    pub history: Vec<String>,
    pub reply: mpsc::Sender<Outcome>,
}

/// What a slot answers for a task.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done {
        mask: PathBuf,
        stats: PredictStats,
        device: String,
        attempts: u32,
    },
    Failed(Failure),
}

/// Slot events: frames and deaths of its worker (tagged with the worker's generation, so
/// late events of a dead worker are ignored), and wake-ups for new work or shutdown.
#[derive(Debug)]
pub(crate) enum Event {
    Frame(u64, FromWorker),
    Closed(u64, String),
    /// The worker broke the framing or sent a message of no known kind (see
    /// [`protocol::FrameError::is_violation`]); its reader stopped reading.
    Malformed(u64, protocol::FrameError),
    Wake,
}

/// Lock one of the pool's mutexes, recovering it if a thread panicked while holding it.
///
/// Sound here because every critical section in the pool is one short update that leaves
/// its data consistent at each step (a push or pop on the queue, a counter, an `Option`
/// set or taken, a [`WorkerInfo`] field): a panic inside one cannot leave half a change.
/// And a panic in one slot thread must not cascade into every other slot, the
/// [`Predictor`] callers and the pool's `Drop` (a panic there would abort the daemon).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Start-up progress over all slots, for [`PoolPredictor::wait_first_ready`] (with
/// [`Shared::start_cv`]).
#[derive(Debug, Default)]
pub(crate) struct StartState {
    ready: usize,
    gave_up: usize,
    fatal: Option<PoolError>,
    last_error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct SlotHandle {
    /// The slot thread's event channel (`Sender` is `Sync`: no lock needed to wake it).
    pub tx: mpsc::Sender<Event>,
    pub info: Mutex<WorkerInfo>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: PoolSettings,
    pub job: Job,
    /// Model (or none for self-check workers).
    pub model: Option<PathBuf>,
    pub read_only: Vec<PathBuf>,
    pub queue: Mutex<VecDeque<Task>>,
    pub slots: Vec<SlotHandle>,
    pub shutdown: AtomicBool,
    pub start: Mutex<StartState>,
    pub start_cv: Condvar,
    /// Where workers run (the fork server in production, a fake in the supervisor's tests).
    pub launcher: Box<dyn launch::Launcher>,
    /// How long the supervisor waits for what.
    pub timing: supervisor::Timing,
    pub totals: Mutex<Totals>,
    /// Set when the pool can no longer run cases (every slot gave up).
    pub broken: Mutex<Option<String>>,
    /// Set when the evaluation was stopped early (consecutive timeouts, budget): why.
    pub aborted: Mutex<Option<String>>,
    /// Timed-out attempts since the last finished case, over all slots.
    pub consecutive_timeouts: std::sync::atomic::AtomicU32,
    /// When the evaluation's budget runs out.
    pub budget_end: Option<Instant>,
    /// A pending sandbox probe (self-check pools only).
    pub probe_req: Mutex<Option<supervisor::ProbeRequest>>,
}

impl Shared {
    pub fn wake_all(&self) {
        for s in &self.slots {
            let _ = s.tx.send(Event::Wake);
        }
    }

    pub fn scratch(&self, slot: usize) -> PathBuf {
        self.job.scratch.join(format!("w{slot}"))
    }

    /// Where finished masks wait for the pipeline, out of every worker's reach.
    pub fn masks(&self) -> PathBuf {
        self.job.scratch.join("masks")
    }

    pub fn device(&self, slot: usize) -> String {
        let d = &self.settings.devices;
        d.get(slot % d.len().max(1))
            .cloned()
            .unwrap_or_else(|| "cpu".into())
    }
}

/// The supervised local worker pool as an execution [`Backend`]. Dropping it stops every worker (stdin closed, then
/// the process group killed) and removes their scratch folders.
#[derive(Debug)]
pub struct PoolPredictor {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl PoolPredictor {
    /// Start `settings.workers` workers for `job` and wait until one is ready (the others
    /// keep starting in the background).
    ///
    /// # Errors
    /// [`PoolError::Fatal`] when a worker cannot load the model, use its device or meet
    /// `pool.sandbox = "required"`; [`PoolError::Startup`] when workers keep dying while
    /// starting; [`PoolError::Scratch`] / [`PoolError::Spawn`] for local problems.
    pub fn start(settings: &PoolSettings, job: &Job) -> Result<Self, PoolError> {
        Self::start_with(settings, job, Some(job.model.clone()))
    }

    fn start_with(
        settings: &PoolSettings,
        job: &Job,
        model: Option<PathBuf>,
    ) -> Result<Self, PoolError> {
        let exe = std::env::current_exe().map_err(|e| PoolError::Spawn(e.to_string()))?;
        Self::start_exe(settings, job, model, exe)
    }

    /// [`Self::start`] with an explicit worker binary (tests of the library, where the
    /// current executable is the test harness, point this at the built `evald`).
    ///
    /// # Errors
    /// As [`Self::start`].
    pub fn start_exe(
        settings: &PoolSettings,
        job: &Job,
        model: Option<PathBuf>,
        exe: PathBuf,
    ) -> Result<Self, PoolError> {
        let launcher =
            launch::ForkLauncher::start(exe, settings.memory_max_bytes, settings.workers.max(1))
                .map_err(|e| PoolError::Spawn(e.to_string()))?;
        Self::start_with_launcher(
            settings,
            job,
            model,
            Box::new(launcher),
            supervisor::Timing::default(),
        )
    }

    /// [`Self::start_exe`] with the workers started by `launcher` (the seam where a worker
    /// runs: the fork server, a batch system's steps, a test's fake) and the supervisor's
    /// waits set by `timing`.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub(crate) fn start_with_launcher(
        settings: &PoolSettings,
        job: &Job,
        model: Option<PathBuf>,
        launcher: Box<dyn launch::Launcher>,
        timing: supervisor::Timing,
    ) -> Result<Self, PoolError> {
        let n = settings.workers.max(1);
        let masks = job.scratch.join("masks");
        std::fs::create_dir_all(&masks).map_err(|source| PoolError::Scratch {
            path: masks,
            source,
        })?;
        let mut read_only = Vec::new();
        if let Some(m) = &model {
            read_only.push(std::fs::canonicalize(m).unwrap_or_else(|_| m.clone()));
        }
        read_only.extend(crate::sandbox::image_grants(
            &job.images,
            job.labels.as_deref(),
        ));
        let budget_end = settings.submission_budget.map(|b| Instant::now() + b);
        let mut settings = settings.clone();
        if settings.devices.is_empty() {
            settings.devices = vec!["cpu".into()];
        }
        let mut receivers = Vec::new();
        let mut slots = Vec::new();
        for slot in 0..n {
            let (tx, rx) = mpsc::channel();
            receivers.push(rx);
            let device = settings.devices[slot % settings.devices.len()].clone();
            slots.push(SlotHandle {
                tx,
                info: Mutex::new(WorkerInfo {
                    slot,
                    device,
                    pid: None,
                    state: SlotState::Starting,
                    cases: Vec::new(),
                    restarts: 0,
                }),
            });
        }
        let shared = Arc::new(Shared {
            settings,
            job: job.clone(),
            model,
            read_only,
            queue: Mutex::new(VecDeque::new()),
            slots,
            shutdown: AtomicBool::new(false),
            start: Mutex::new(StartState::default()),
            start_cv: Condvar::new(),
            launcher,
            timing,
            totals: Mutex::new(Totals::default()),
            broken: Mutex::new(None),
            aborted: Mutex::new(None),
            consecutive_timeouts: std::sync::atomic::AtomicU32::new(0),
            budget_end,
            probe_req: Mutex::new(None),
        });
        let mut pool = PoolPredictor {
            shared,
            threads: Vec::new(),
        };
        for (slot, rx) in receivers.into_iter().enumerate() {
            let sh = Arc::clone(&pool.shared);
            let t = std::thread::Builder::new()
                .name(format!("evald-slot{slot}"))
                .spawn(move || supervisor::run_slot(&sh, slot, &rx))
                .map_err(|e| PoolError::Spawn(e.to_string()))?;
            pool.threads.push(t);
        }
        pool.wait_first_ready(n)?;
        Ok(pool)
    }

    fn wait_first_ready(&self, n: usize) -> Result<(), PoolError> {
        let limit = supervisor::load_timeout(&self.shared.settings) + self.shared.timing.hello;
        let deadline = Instant::now() + limit;
        let mut st = lock(&self.shared.start);
        loop {
            if let Some(e) = st.fatal.take() {
                return Err(e);
            }
            if st.ready > 0 {
                return Ok(());
            }
            if st.gave_up >= n {
                return Err(PoolError::Startup(
                    st.last_error.clone().unwrap_or_else(|| "unknown".into()),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PoolError::Startup(format!(
                    "none ready after {:.0} s{}",
                    limit.as_secs_f64(),
                    st.last_error
                        .as_ref()
                        .map(|e| format!(" (last problem: {e})"))
                        .unwrap_or_default()
                )));
            }
            st = self
                .shared
                .start_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The worker slots as they are now.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared
            .slots
            .iter()
            .map(|s| lock(&s.info).clone())
            .collect()
    }

    /// Why the pool stopped the evaluation early (a model that keeps timing out, the
    /// evaluation's budget), if it did; the cases not done then failed with stage
    /// `aborted`.
    pub fn stopped_early(&self) -> Option<String> {
        lock(&self.shared.aborted).clone()
    }

    /// Counters so far.
    pub fn totals(&self) -> Totals {
        lock(&self.shared.totals).clone()
    }

    /// Devices in use (for the report's Run sheet).
    pub fn devices(&self) -> Vec<String> {
        let mut d: Vec<String> = Vec::new();
        for s in 0..self.shared.slots.len() {
            let dev = self.shared.device(s);
            if !d.contains(&dev) {
                d.push(dev);
            }
        }
        d
    }

    fn read_mask(
        &self,
        case: &CaseFiles,
        geom: volume::Geometry,
        mask: &Path,
        attempts: u32,
    ) -> Result<Vec<u8>, Failure> {
        let want = geom.dims.iter().product::<usize>();
        // Written by an untrusted worker: no link is followed, and no more than the image's
        // voxel count (plus one, to tell "too long") is read.
        let res = crate::files::read_bounded_untrusted(mask, want as u64 + 1);
        let _ = std::fs::remove_file(mask);
        let fail = |reason: String| Failure {
            case: case.id.clone(),
            stage: Stage::Worker,
            reason,
            attempts,
        };
        let data = res.map_err(|e| {
            fail(format!(
                "the worker's mask {} cannot be read: {e}",
                mask.display()
            ))
        })?;
        if data.len() != want {
            return Err(fail(format!(
                "the worker's mask has {} voxels, the image {want}",
                data.len()
            )));
        }
        Ok(data)
    }
}

impl Backend for PoolPredictor {
    fn concurrency(&self) -> usize {
        self.shared.slots.len() * WINDOW
    }

    fn stopped_early(&self) -> Option<String> {
        PoolPredictor::stopped_early(self)
    }

    fn devices(&self) -> Vec<String> {
        PoolPredictor::devices(self)
    }

    fn totals(&self) -> Totals {
        PoolPredictor::totals(self)
    }

    fn workers(&self) -> usize {
        self.shared.slots.len()
    }

    fn predict(&self, case: &CaseFiles) -> Result<Prediction, Failure> {
        let fail = |stage: Stage, reason: String| Failure {
            case: case.id.clone(),
            stage,
            reason,
            attempts: 1,
        };
        if let Some(why) = self.shared.aborted.lock().expect("aborted lock").clone() {
            return Err(fail(Stage::Aborted, format!("not run: {why}")));
        }
        if let Some(b) = self.shared.broken.lock().expect("broken lock").clone() {
            return Err(fail(Stage::Worker, b));
        }
        // The supervisor takes the grid from the image itself, never from the worker.
        let geom =
            volume::read_geometry(&case.input).map_err(|e| fail(Stage::Read, e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        let task = Task {
            id: NEXT_ID.fetch_add(1, Ordering::SeqCst),
            case: case.id.clone(),
            image: std::fs::canonicalize(&case.input).unwrap_or_else(|_| case.input.clone()),
            attempts: 0,
            history: Vec::new(),
            reply: tx,
        };
        {
            let mut q = self.shared.queue.lock().expect("queue lock");
            // Under the queue lock: see `supervisor::requeue`.
            if let Some(why) = self.shared.aborted.lock().expect("aborted lock").clone() {
                return Err(fail(Stage::Aborted, format!("not run: {why}")));
            }
            q.push_back(task);
        }
        self.shared.wake_all();
        match rx.recv() {
            Ok(Outcome::Done {
                mask,
                stats,
                device,
                attempts,
            }) => {
                let data = self.read_mask(case, geom.clone(), &mask, attempts)?;
                Ok(Prediction {
                    labels: Volume { geom, data },
                    file: None,
                    stats,
                    device,
                    attempts,
                })
            }
            Ok(Outcome::Failed(f)) => Err(f),
            Err(_) => Err(fail(Stage::Worker, "the worker pool stopped".into())),
        }
    }
}

impl Drop for PoolPredictor {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        supervisor::fail_queued(&self.shared, "the worker pool stopped");
        // Only now that every worker was reaped (the fork server's exit would kill them).
        self.shared.launcher.shutdown();
        for s in 0..self.shared.slots.len() {
            let _ = std::fs::remove_dir_all(self.shared.scratch(s));
        }
        let _ = std::fs::remove_dir_all(self.shared.masks());
    }
}

/// Result of [`selfcheck`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfCheck {
    /// The sandbox the worker reported.
    pub sandbox: crate::sandbox::Report,
    /// What the probes found.
    pub probe: protocol::ProbeReport,
    /// Whether the worker was confined as it must be: no TCP, no labels, images
    /// readable, scratch writable, images not writable.
    pub confined: bool,
    /// Each expectation that failed, in words.
    pub problems: Vec<String>,
}

/// Start one real worker (same spawn path and sandbox as a pool worker, no model) and
/// probe its sandbox from inside: open a TCP socket and connect to a listener of ours,
/// read and list the labels, read an image, write to scratch and to the images folder.
///
/// # Errors
/// [`PoolError`] when the worker cannot be started.
pub fn selfcheck(
    settings: &PoolSettings,
    images: &Path,
    labels: &Path,
    scratch: &Path,
) -> Result<SelfCheck, PoolError> {
    let exe = std::env::current_exe().map_err(|e| PoolError::Spawn(e.to_string()))?;
    selfcheck_exe(settings, images, labels, scratch, exe)
}

/// [`selfcheck`] with an explicit worker binary.
///
/// # Errors
/// As [`selfcheck`].
pub fn selfcheck_exe(
    settings: &PoolSettings,
    images: &Path,
    labels: &Path,
    scratch: &Path,
    exe: PathBuf,
) -> Result<SelfCheck, PoolError> {
    let first = |dir: &Path| -> Option<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v.into_iter().next()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| PoolError::Spawn(format!("cannot open the probe listener: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| PoolError::Spawn(e.to_string()))?;
    let mut one = settings.clone();
    one.workers = 1;
    let job = Job {
        format: crate::infer::ModelFormat::TorchScript,
        model: PathBuf::new(),
        model_sha256: None,
        spec: supervisor::probe_spec(),
        images: images.to_path_buf(),
        labels: Some(labels.to_path_buf()),
        scratch: scratch.to_path_buf(),
    };
    let pool = PoolPredictor::start_exe(&one, &job, None, exe)?;
    let label_file = first(labels);
    let image_file = first(images);
    let probe = protocol::Probe {
        tcp_connect: addr.to_string(),
        read_files: label_file
            .iter()
            .chain(image_file.iter())
            .cloned()
            .collect(),
        list_dirs: vec![labels.to_path_buf(), images.to_path_buf()],
        write_dirs: vec![pool.shared.scratch(0), images.to_path_buf()],
    };
    let (sandbox, report) = supervisor::probe(&pool.shared, 0, probe)?;
    drop(pool);
    let mut problems = Vec::new();
    if report.tcp_socket.allowed && report.tcp_connect.allowed {
        problems.push(format!(
            "TCP connect to {addr} worked ({})",
            report.tcp_connect.detail
        ));
    }
    let by = |v: &[protocol::ProbeOutcome], i: usize| v.get(i).cloned();
    match (label_file.is_some(), by(&report.reads, 0)) {
        (true, Some(o)) if o.allowed => problems.push(format!("could read {}", o.what)),
        _ => {}
    }
    if let Some(o) = by(&report.lists, 0).filter(|o| o.allowed) {
        problems.push(format!("could list {}", o.what));
    }
    let img_idx = usize::from(label_file.is_some());
    if let Some(o) = by(&report.reads, img_idx).filter(|o| !o.allowed && image_file.is_some()) {
        problems.push(format!(
            "could not read the image {} ({})",
            o.what, o.detail
        ));
    }
    if let Some(o) = by(&report.writes, 0).filter(|o| !o.allowed) {
        problems.push(format!("could not write scratch {} ({})", o.what, o.detail));
    }
    if let Some(o) = by(&report.writes, 1).filter(|o| o.allowed) {
        problems.push(format!("could write into {}", o.what));
    }
    Ok(SelfCheck {
        sandbox,
        probe: report,
        confined: problems.is_empty(),
        problems,
    })
}

/// Used by the supervisor's timeout maths and tests.
pub fn heartbeat_period() -> Duration {
    supervisor::HEARTBEAT
}
