//! The service, `evald serve`: watch the drop folder, queue complete submissions in the
//! store, evaluate them one at a time, write reports, hand results to mail; reload the
//! configuration on SIGHUP, stop cleanly on SIGTERM/SIGINT, talk to systemd.
//!
//! Tasks and threads, each with one owner and one way to stop:
//! - **store thread** ([`crate::store::spawn`]): every SQLite call, off the runtime;
//! - **watch task** (`watch_loop`): events from `notify` into a [`Tracker`]; scans and
//!   ingestion ([`ingest`]) on blocking threads; wakes the runner when something is queued;
//! - **runner task** ([`runner`]): FIFO, one evaluation at a time on its own thread, with
//!   a cancel flag for shutdown;
//! - **signal task** (serve only): SIGHUP reloads, SIGTERM/SIGINT cancel the shutdown token;
//! - **watchdog task** (under systemd with `WatchdogSec=`): pings while the store answers.
//!
//! All tasks live in one [`TaskTracker`] and watch one [`CancellationToken`]. The settings
//! are an `Arc<Settings>` in a `tokio::sync::watch` channel, swapped on a valid reload.

mod admin;
mod demo;
mod ingest;
mod runner;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{broadcast, watch as tokio_watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Settings};
use crate::evaluation::Evaluation;
use crate::store::{self, State, StoreError, StoreHandle};
use crate::watch::{self as dropwatch, Tracker, WatchError};

pub use admin::{
    check_config, config_problems, requeue, status, ConfigCheck, RequeueArgs, StatusArgs,
};
pub use demo::{run_demo, DemoOutcome};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Folders the daemon needs are missing.
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Paths {
        /// The config file.
        path: PathBuf,
        /// Each problem with its key.
        problems: Vec<config::Problem>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The watcher failed to start.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// Logging could not start.
    #[error(transparent)]
    Logging(#[from] crate::logging::LoggingError),
    /// An OS resource (thread, runtime, signal handler) could not be set up.
    #[error("{what}: {source}")]
    Os {
        /// What was being set up.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What happened to a submission, for in-process observers (`evald demo`, tests).
#[derive(Debug, Clone)]
pub enum DaemonEvent {
    /// Started: the first scan is under way and the runner is waiting for work.
    Ready,
    /// A submission reached `reported`/`mailed`, `rejected` or `failed`.
    Finished(Finished),
    /// The outbox loop delivered a submission's report email; the submission is `mailed`.
    /// (May come before or after its [`DaemonEvent::Finished`].)
    Mailed {
        /// Submission id.
        id: i64,
        /// The `.eml` file, with the file transport.
        email: Option<PathBuf>,
    },
}

/// A submission that reached a final state.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Submission id.
    pub id: i64,
    /// The folder.
    pub dir: PathBuf,
    /// Its state now.
    pub state: State,
    /// The evaluation, when there was one.
    pub evaluation: Option<Arc<Evaluation>>,
    /// `summary.json`, when reported.
    pub summary: Option<PathBuf>,
    /// `report.xlsx`, when reported.
    pub report: Option<PathBuf>,
    /// Why it was rejected or failed.
    pub error: Option<String>,
}

/// How the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Config file re-read on SIGHUP (`None`: no reload).
    pub config_path: Option<PathBuf>,
    /// Handle SIGHUP/SIGTERM/SIGINT.
    pub signals: bool,
    /// Send sd_notify messages (READY, STOPPING, STATUS, WATCHDOG).
    pub systemd: bool,
}

/// How the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// An evaluation thread outlived the grace period (its submission is queued again);
    /// the process should exit without running library destructors.
    pub abandoned_evaluation: bool,
}

/// Send an sd_notify message when under systemd (no-op otherwise).
fn sd(systemd: bool, states: &[sd_notify::NotifyState<'_>]) {
    if systemd {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("sd_notify: {e}");
        }
    }
}

/// Everything the tasks share.
#[derive(Clone)]
struct Shared {
    store: StoreHandle,
    settings: tokio_watch::Receiver<Arc<Settings>>,
    work: Arc<Notify>,
    /// Held by every producer of email and by the outbox loop: a queued message is sent
    /// at once, not at the next poll.
    mail_wake: Arc<Notify>,
    cancel: CancellationToken,
    events: broadcast::Sender<DaemonEvent>,
    systemd: bool,
}

/// The lock file in the state folder that `evald serve` holds while it runs.
pub const LOCK_FILE: &str = "evald.lock";

/// Take the state folder's lock (released when the file is closed, also by a crash).
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::io::AsRawFd;
    std::fs::create_dir_all(state_dir).map_err(|source| DaemonError::Os {
        what: "creating the state folder",
        source,
    })?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join(LOCK_FILE))
        .map_err(|source| DaemonError::Os {
            what: "opening the state folder's lock file",
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DaemonError::Os {
            what: "another evald serve runs on this state folder (its lock is held)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

/// Whether an `evald serve` holds the lock of `state_dir` now.
pub fn service_running(state_dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::File::open(state_dir.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a shared lock we get is released on close.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// Problems with the folders the daemon itself needs: the drop folder must exist (a
/// missing one usually means an unmounted share); state and log folders must exist or be
/// creatable.
pub fn path_problems(d: &config::RawDaemon) -> Vec<config::Problem> {
    let mut out = Vec::new();
    if !d.drop_dir.is_dir() {
        out.push(config::Problem {
            key: "daemon.drop_dir".into(),
            message: format!(
                "{} is not a folder (create it, or mount the share; vendors copy into it)",
                d.drop_dir.display()
            ),
        });
    }
    for (key, dir) in [
        ("daemon.state_dir", &d.state_dir),
        ("daemon.log_dir", &d.log_dir),
    ] {
        let creatable = dir.parent().is_some_and(Path::is_dir);
        if !dir.is_dir() && !creatable {
            out.push(config::Problem {
                key: key.into(),
                message: format!(
                    "{} does not exist and neither does its parent folder",
                    dir.display()
                ),
            });
        }
    }
    out
}

/// `evald serve`: the service's main, on the process's only runtime.
///
/// # Errors
/// An invalid configuration, missing folders, or a store/watch/logging failure at start.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let settings = config::load(config_path)?;
    let raw = config::load_raw(config_path)?;
    let problems = path_problems(&raw.daemon);
    if !problems.is_empty() {
        return Err(DaemonError::Paths {
            path: config_path.to_path_buf(),
            problems,
        }
        .into());
    }
    let mut guard = crate::logging::init_daemon(&settings.daemon)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        drop_dir = %settings.daemon.drop_dir.display(),
        state_dir = %settings.daemon.state_dir.display(),
        log_dir = %settings.daemon.log_dir.display(),
        tasks = settings.task_names(","),
        "evald starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("evald-rt")
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Os {
            what: "starting the async runtime",
            source,
        })?;
    let (events, _) = broadcast::channel(64);
    let opts = Options {
        config_path: Some(config_path.to_path_buf()),
        signals: true,
        systemd: true,
    };
    let res = rt.block_on(run(settings, opts, CancellationToken::new(), events));
    match res {
        Ok(stopped) => {
            rt.shutdown_timeout(Duration::from_secs(2));
            tracing::info!("evald stopped");
            guard.flush();
            if stopped.abandoned_evaluation {
                // The evaluation thread may be inside libtorch; running C++ static
                // destructors under it could crash. Store and logs are already flushed.
                // SAFETY: _exit ends the process immediately; nothing is used afterwards.
                unsafe { libc::_exit(0) }
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!("{e}");
            guard.flush();
            Err(e.into())
        }
    }
}

/// Run the daemon until `shutdown` is cancelled (or a termination signal arrives when
/// `opts.signals`). Sends [`DaemonEvent`]s to `events`.
///
/// # Errors
/// [`DaemonError`] when the store or the watcher cannot start.
pub async fn run(
    settings: Settings,
    opts: Options,
    shutdown: CancellationToken,
    events: broadcast::Sender<DaemonEvent>,
) -> Result<Stopped, DaemonError> {
    let state_dir = settings.daemon.state_dir.clone();
    let snapshots = runner::snapshot_dir(&settings);
    let (lock, store, store_thread) = tokio::task::spawn_blocking(move || {
        // One service per state folder; `evald status` reads the lock to tell a running
        // service from a store left behind by a crash.
        let lock = lock_state_dir(&state_dir)?;
        let mut s = store::Store::open(&state_dir)?;
        // A read-only state folder used to start "ready" and then fail every submission:
        // refuse to start instead, saying what to fix (systemd retries the start).
        tempfile::tempfile_in(&state_dir).map_err(|source| DaemonError::Os {
            what: "writing into the state folder (it must be writable by evald: check its \
                   owner and that its file system is not mounted read-only)",
            source,
        })?;
        // Model snapshots of evaluations a crash interrupted: none runs yet, and a requeued
        // evaluation makes a fresh one.
        match std::fs::remove_dir_all(&snapshots) {
            Ok(()) => tracing::debug!(dir = %snapshots.display(), "removed leftover model snapshots"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %snapshots.display(), "cannot remove leftover model snapshots: {e}"),
        }
        let recovered = s.recover()?;
        if !recovered.is_empty() {
            tracing::warn!(
                count = recovered.len(),
                "evaluations interrupted by the last stop are queued again"
            );
        }
        let counts = s.counts()?;
        tracing::info!(
            db = %s.path().display(),
            "store open: {}",
            counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(st, n)| format!("{n} {st}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (store, thread) = store::spawn(s).map_err(|source| DaemonError::Os {
            what: "starting the store thread",
            source,
        })?;
        Ok::<_, DaemonError>((lock, store, thread))
    })
    .await
    .map_err(|e| DaemonError::Os {
        what: "opening the store",
        source: std::io::Error::other(e.to_string()),
    })??;

    let (settings_tx, settings_rx) = tokio_watch::channel(Arc::new(settings));
    let shared = Shared {
        store,
        settings: settings_rx,
        work: Arc::new(Notify::new()),
        mail_wake: Arc::new(Notify::new()),
        cancel: shutdown.clone(),
        events,
        systemd: opts.systemd,
    };
    let started = start_tasks(&shared, &opts, settings_tx);
    let (tasks, watcher, runner) = match started {
        Ok(x) => x,
        Err(e) => {
            shutdown.cancel();
            drop(shared);
            let _ = tokio::task::spawn_blocking(move || store_thread.close()).await;
            return Err(e);
        }
    };
    sd(
        opts.systemd,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("watching the drop folder"),
        ],
    );
    tracing::info!("evald ready");
    let _ = shared.events.send(DaemonEvent::Ready);

    shutdown.cancelled().await;
    sd(
        opts.systemd,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ],
    );
    tracing::info!("stopping: no new work is taken");
    drop(watcher);
    tasks.close();
    let abandoned_evaluation = runner.await.unwrap_or(false);
    tasks.wait().await;
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || store_thread.close()).await;
    drop(lock);
    Ok(Stopped {
        abandoned_evaluation,
    })
}

type Started = (
    TaskTracker,
    dropwatch::Watcher,
    tokio::task::JoinHandle<bool>,
);

fn start_tasks(
    shared: &Shared,
    opts: &Options,
    settings_tx: tokio_watch::Sender<Arc<Settings>>,
) -> Result<Started, DaemonError> {
    let tasks = TaskTracker::new();
    let s = shared.settings.borrow().clone();
    let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let poll_every = s
        .daemon
        .settle
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    let watcher = dropwatch::start(&s.daemon.drop_dir, s.daemon.watch, poll_every, ev_tx)?;
    if opts.signals {
        // Register before anything else can take a while: a SIGTERM from here on is ours.
        let signals = signal_hook_tokio::Signals::new([
            signal_hook::consts::SIGHUP,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(|source| DaemonError::Os {
            what: "installing signal handlers",
            source,
        })?;
        // Not in the task tracker: it keeps listening during shutdown (a second
        // SIGTERM/SIGINT stops at once) and ends with the runtime.
        tokio::spawn(signal_loop(
            shared.clone(),
            signals,
            opts.config_path.clone(),
            settings_tx,
        ));
    } else {
        // Keep the sender alive for the daemon's lifetime so receivers never see it closed.
        let cancel = shared.cancel.clone();
        tasks.spawn(async move {
            cancel.cancelled().await;
            drop(settings_tx);
        });
    }
    let tracker = Tracker::new(
        &s.daemon.drop_dir,
        s.daemon.settle,
        s.daemon.rescan,
        s.daemon.watch,
    );
    tasks.spawn(watch_loop(shared.clone(), tracker, ev_rx));
    tasks.spawn(mail_loop(shared.clone()));
    let runner = tasks.spawn(runner::run(shared.clone()));
    if opts.systemd {
        if let Some(period) = sd_notify::watchdog_enabled() {
            tasks.spawn(watchdog(shared.clone(), period));
        }
    }
    Ok((tasks, watcher, runner))
}

/// The mail outbox: the daemon's only deliverer. Sends what `runner::notify_team` queued as
/// soon as it is woken, retries (across restarts), marks a submission mailed when its
/// report email went, follows `[mail]` through SIGHUP reloads, until shutdown.
async fn mail_loop(shared: Shared) {
    let first = shared.settings.borrow().clone();
    let db = crate::mail::db_path(&first);
    let outbox = match tokio::task::spawn_blocking(move || crate::mail::Outbox::open(&db)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            tracing::error!("mail outbox unavailable, emails stay queued until restart: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("mail outbox task failed: {e}");
            return;
        }
    };
    let (mail_tx, mail_rx) = tokio_watch::channel(first.mail.clone());
    let mut settings = shared.settings.clone();
    let cancel = shared.cancel.clone();
    let follow = async move {
        while settings.changed().await.is_ok() {
            let m = settings.borrow_and_update().mail.clone();
            if mail_tx.send(m).is_err() {
                break;
            }
        }
    };
    let (store, events) = (shared.store.clone(), shared.events.clone());
    let on_delivery = move |d: &crate::mail::Delivery| {
        let (crate::mail::Outcome::Sent(to), Some(key)) = (&d.outcome, &d.key) else {
            return;
        };
        let (to, key, events) = (to.clone(), key.clone(), events.clone());
        store.send(move |s| runner::delivered(s, &key, &to, &events));
    };
    let deliver = crate::mail::run_outbox(
        outbox,
        mail_rx,
        Arc::clone(&shared.mail_wake),
        cancel.clone(),
        first.daemon.outbox_poll,
        on_delivery,
    );
    tokio::select! {
        r = deliver => if let Err(e) = r { tracing::error!("mail outbox stopped: {e}") },
        () = follow => {}
        () = cancel.cancelled() => {}
    }
}

/// How long to gather a burst of events (a large copy) before looking.
const DEBOUNCE: Duration = Duration::from_millis(200);

async fn watch_loop(
    shared: Shared,
    tracker: Tracker,
    mut ev_rx: tokio::sync::mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
) {
    let tracker = Arc::new(Mutex::new(tracker));
    let mut settings_rx = shared.settings.clone();
    let mut events_open = true;
    loop {
        let wake = tracker
            .lock()
            .expect("tracker lock")
            .next_wake(Instant::now());
        let wake = tokio::time::Instant::from_std(wake);
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            ev = ev_rx.recv(), if events_open => {
                let mut batch = Vec::new();
                match ev {
                    Some(e) => batch.push(e),
                    None => events_open = false,
                }
                // Gather the rest of a burst before looking at the disk.
                let until = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(Some(e)) = tokio::time::timeout_at(until, ev_rx.recv()).await {
                    batch.push(e);
                }
                let now = Instant::now();
                let mut t = tracker.lock().expect("tracker lock");
                for e in batch {
                    match e {
                        Ok(e) => t.on_event(&e, now),
                        Err(e) => {
                            tracing::warn!("file watcher: {e}; rescanning");
                            t.rescan_now();
                        }
                    }
                }
                continue;
            }
            changed = settings_rx.changed() => {
                if changed.is_err() {
                    // Sender gone: only at shutdown.
                    shared.cancel.cancelled().await;
                    break;
                }
                let s = settings_rx.borrow_and_update().clone();
                let mut t = tracker.lock().expect("tracker lock");
                t.set_timing(s.daemon.settle, s.daemon.rescan);
                t.reconsider_all();
                continue;
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        let settings = shared.settings.borrow().clone();
        let (t, store, work) = (
            Arc::clone(&tracker),
            shared.store.clone(),
            Arc::clone(&shared.work),
        );
        let events = shared.events.clone();
        let res = tokio::task::spawn_blocking(move || {
            let ready = t.lock().expect("tracker lock").poll(Instant::now(), &|task: &str| {
                settings
                    .tasks
                    .get(task)
                    .is_some_and(|t| t.require_ready_marker)
            });
            for r in ready {
                match ingest::ingest(&r, &settings, &store) {
                    Ok(ingest::Ingested::Queued) => work.notify_one(),
                    Ok(ingest::Ingested::Rejected(f)) => {
                        let _ = events.send(DaemonEvent::Finished(f));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(dir = %r.sub.dir.display(), "cannot record the submission: {e}"),
                }
            }
        })
        .await;
        if let Err(e) = res {
            tracing::error!("scanning the drop folder failed: {e}");
            // Do not spin on a repeating panic.
            tokio::select! {
                _ = shared.cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}

async fn signal_loop(
    shared: Shared,
    mut signals: signal_hook_tokio::Signals,
    config_path: Option<PathBuf>,
    settings_tx: tokio_watch::Sender<Arc<Settings>>,
) {
    while let Some(sig) = signals.next().await {
        match sig {
            signal_hook::consts::SIGHUP if !shared.cancel.is_cancelled() => match &config_path {
                Some(p) => reload(&shared, p, &settings_tx).await,
                None => tracing::info!("SIGHUP: no configuration file to re-read"),
            },
            signal_hook::consts::SIGHUP => {}
            sig => {
                let name = if sig == signal_hook::consts::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if shared.cancel.is_cancelled() {
                    tracing::error!("{name} again: stopping at once; the evaluation in flight is queued again at the next start");
                    // Bypass destructors: a thread may be inside libtorch. The store is
                    // consistent at every commit; `running` rows are re-queued at start.
                    // SAFETY: _exit ends the process; nothing runs afterwards.
                    unsafe { libc::_exit(1) }
                }
                tracing::info!(
                    "{name}: shutting down (cases in flight may finish within {} s; send it again to stop at once)",
                    shared.settings.borrow().daemon.shutdown_grace.as_secs()
                );
                shared.cancel.cancel();
            }
        }
    }
}

/// Fields that only take effect at the next start.
fn restart_only(old: &Settings, new: &mut Settings) -> Vec<&'static str> {
    let mut kept = Vec::new();
    let (o, n) = (&old.daemon, &mut new.daemon);
    if o.drop_dir != n.drop_dir {
        kept.push("daemon.drop_dir");
        n.drop_dir = o.drop_dir.clone();
    }
    if o.state_dir != n.state_dir {
        kept.push("daemon.state_dir");
        n.state_dir = o.state_dir.clone();
    }
    if o.log_dir != n.log_dir {
        kept.push("daemon.log_dir");
        n.log_dir = o.log_dir.clone();
    }
    if o.watch != n.watch {
        kept.push("daemon.watch");
        n.watch = o.watch;
    }
    if o.log_format != n.log_format {
        kept.push("daemon.log_format");
        n.log_format = o.log_format;
    }
    if o.outbox_poll != n.outbox_poll {
        kept.push("daemon.outbox_poll_secs");
        n.outbox_poll = o.outbox_poll;
    }
    if o.log_keep_days != n.log_keep_days {
        kept.push("daemon.log_keep_days");
        n.log_keep_days = o.log_keep_days;
    }
    kept
}

/// SIGHUP: re-read and validate; swap in a valid configuration, keep the old one otherwise.
async fn reload(shared: &Shared, path: &Path, tx: &tokio_watch::Sender<Arc<Settings>>) {
    let mono = sd_notify::NotifyState::monotonic_usec_now().ok();
    let mut msg = vec![sd_notify::NotifyState::Reloading];
    msg.extend(mono);
    sd(shared.systemd, &msg);
    tracing::info!(config = %path.display(), "SIGHUP: re-reading the configuration");
    let p = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || config::load(&p)).await;
    match loaded {
        Ok(Ok(mut new)) => {
            let old = tx.borrow().clone();
            let kept = restart_only(&old, &mut new);
            if !kept.is_empty() {
                tracing::warn!(
                    "configuration reload: {} changed but only take(s) effect after a restart (systemctl restart evald)",
                    kept.join(", ")
                );
            }
            if *old == new {
                tracing::info!("configuration reloaded: nothing changed");
            } else {
                tracing::info!(
                    tasks = new.tasks.keys().cloned().collect::<Vec<_>>().join(","),
                    "configuration reloaded"
                );
                tx.send_replace(Arc::new(new));
            }
        }
        Ok(Err(e)) => {
            tracing::error!("configuration reload failed; keeping the previous configuration: {e}")
        }
        Err(e) => {
            tracing::error!("configuration reload failed; keeping the previous configuration: {e}")
        }
    }
    sd(
        shared.systemd,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("watching the drop folder"),
        ],
    );
}

/// Ping systemd's watchdog at half its period while the store answers (a wedged store
/// thread stops the pings and systemd restarts the service).
async fn watchdog(shared: Shared, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = tick.tick() => {
                let alive = tokio::time::timeout(period / 4, shared.store.call(|s| s.ping())).await;
                match alive {
                    Ok(Ok(())) => sd(true, &[sd_notify::NotifyState::Watchdog]),
                    Ok(Err(e)) => tracing::error!("watchdog: the store does not answer: {e}"),
                    Err(_) => tracing::error!("watchdog: the store did not answer within {:?}", period / 4),
                }
            }
        }
    }
}
