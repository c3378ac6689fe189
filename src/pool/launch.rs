//! Where a worker runs: the seam between the supervisor and whatever starts processes.
//!
//! The supervisor ([`super::supervisor`]) decides *when* a slot needs a worker, feeds it
//! cases and judges it; a [`Launcher`] decides *where and how* the worker runs and hands
//! back a [`Launched`]: the byte streams the frame protocol ([`super::protocol`]) runs
//! over and a [`WorkerHandle`] to kill and reap it. Everything the supervisor guarantees
//! (per-case timeout, heartbeat loss, retries on a fresh worker, the poison-case limit)
//! is built on those streams and that handle, so it holds for every launcher.
//!
//! - [`ForkLauncher`] (production): children of this binary forked by the long-lived
//!   [`Spawner`] thread (`PR_SET_PDEATHSIG`, own process group, protocol on fd 3, cleared
//!   environment) in their memory cgroup ([`super::cgroup`]).
//! - A batch-system step launcher (Slurm) is the next implementation; tests use an
//!   in-process fake worker speaking the real protocol.
//!
//! The pool takes its launcher at construction (`PoolPredictor::start_with_launcher`);
//! `start` / `start_exe` build a [`ForkLauncher`].

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use super::cgroup::MemoryCap;
use super::spawn::{self, SpawnSpec, Spawner};

/// What one worker start needs to know (the rest reaches the worker in its `Init`).
#[derive(Debug, Clone)]
pub(crate) struct LaunchSpec {
    /// Slot number.
    pub slot: usize,
    /// `cpu` or `cuda:N`: a launcher placing workers on other hosts chooses by it.
    pub device: String,
    /// The worker's own, freshly emptied scratch folder (HOME, TMPDIR, masks).
    pub scratch: PathBuf,
    /// Intra-op threads (OMP/MKL).
    pub threads: usize,
}

/// A started worker: its streams and its handle.
pub(crate) struct Launched {
    /// Kill and reap.
    pub handle: Box<dyn WorkerHandle>,
    /// Requests to the worker (frames); dropping it is the worker's signal to exit.
    pub requests: Box<dyn Write + Send>,
    /// Frames from the worker; end of stream when it exits.
    pub frames: Box<dyn Read + Send>,
    /// Its log lines (stderr); end of stream when it and everything it started exit.
    pub logs: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched")
            .field("pid", &self.handle.pid())
            .finish_non_exhaustive()
    }
}

/// Control over one running worker, owned by its slot thread.
pub(crate) trait WorkerHandle: Send {
    /// The local process id, when the worker is a local process (log lines, status).
    fn pid(&self) -> Option<u32>;

    /// Kill the worker and everything it started, now. Does nothing once it was reaped:
    /// its id may belong to someone else by then.
    fn kill(&mut self);

    /// Wait up to `grace` for the worker to exit by itself, then kill it; return how it
    /// ended. Callable more than once (later calls return the same status).
    fn reap(&mut self, grace: Duration) -> ExitStatus;
}

/// Starts workers for the pool's slots. Called from the slot threads, one start at a time
/// per slot, several slots at once.
pub(crate) trait Launcher: Send + Sync + std::fmt::Debug {
    /// Start one worker for `spec`.
    ///
    /// # Errors
    /// [`LaunchError`] when no worker could be started; the supervisor counts it as a
    /// failed start (and gives the slot up after several in a row).
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError>;

    /// Called once when the pool is dropped, after every slot thread has ended and
    /// every worker was reaped (the fork server's thread may only end then).
    fn shutdown(&self) {}
}

/// A worker could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LaunchError {
    /// The program could not be started (fork/exec, pipes, the spawner thread gone).
    #[error("spawn {program} (slot {slot} on {device}): {source}")]
    Spawn {
        /// What was to run.
        program: PathBuf,
        /// For which slot.
        slot: usize,
        /// On which device.
        device: String,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
}

/// Today's launcher: local child processes of this binary, forked by one [`Spawner`]
/// thread, each in its memory cgroup when `pool.memory_max_mb` is set and enforceable.
#[derive(Debug)]
pub(crate) struct ForkLauncher {
    spawner: Spawner,
    cap: Option<MemoryCap>,
}

impl ForkLauncher {
    /// Start the spawner thread for `exe` and prepare a `memory_max_bytes` cgroup cap for
    /// each of `slots` (none when 0, or with a warning when it cannot be enforced).
    ///
    /// # Errors
    /// When the spawner thread cannot be created.
    pub fn start(exe: PathBuf, memory_max_bytes: u64, slots: usize) -> std::io::Result<Self> {
        let cap = if memory_max_bytes > 0 {
            match MemoryCap::prepare(memory_max_bytes, slots) {
                Ok(c) => {
                    tracing::info!(
                        bytes = memory_max_bytes,
                        "worker memory cap: cgroup v2 memory.max per worker"
                    );
                    Some(c)
                }
                Err(why) => {
                    tracing::warn!("pool.memory_max_mb is set but cannot be enforced: {why}");
                    None
                }
            }
        } else {
            None
        };
        Ok(ForkLauncher {
            spawner: Spawner::start(exe)?,
            cap,
        })
    }
}

impl Launcher for ForkLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let spawned = self
            .spawner
            .spawn(SpawnSpec {
                slot: spec.slot,
                scratch: spec.scratch.clone(),
                threads: spec.threads,
                cgroup_procs: self.cap.as_ref().and_then(|c| c.procs_file(spec.slot)),
            })
            .map_err(|source| LaunchError::Spawn {
                program: self.spawner.exe().clone(),
                slot: spec.slot,
                device: spec.device.clone(),
                source,
            })?;
        Ok(Launched {
            handle: Box::new(ForkHandle {
                child: spawned.child,
                reaped: false,
            }),
            requests: Box::new(spawned.stdin),
            frames: Box::new(spawned.stdout),
            logs: Box::new(spawned.stderr),
        })
    }

    fn shutdown(&self) {
        // Only now: the spawner thread's exit would SIGKILL any worker still alive.
        self.spawner.stop();
    }
}

/// A forked worker: the leader of its own process group.
struct ForkHandle {
    child: Child,
    /// Set by the first [`WorkerHandle::reap`]: from then on the pid, and so the group
    /// id, may be another process's, and nothing is signalled any more.
    reaped: bool,
}

impl WorkerHandle for ForkHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn kill(&mut self) {
        if !self.reaped {
            spawn::kill_group(self.child.id());
        }
    }

    fn reap(&mut self, grace: Duration) -> ExitStatus {
        // `spawn::reap` signals the group only while the leader is unreaped (waitid
        // WNOWAIT), and returns std's kept status on a second call.
        let status = spawn::reap(&mut self.child, grace);
        self.reaped = true;
        status
    }
}
