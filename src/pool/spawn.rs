//! Starting and killing worker processes.
//!
//! Every worker is forked by **one long-lived spawner thread**: `PR_SET_PDEATHSIG` fires
//! when the *thread* that forked the child exits, not the process, so forking from a
//! short-lived or pooled thread would kill workers at random (tokio's blocking threads
//! exit after 10 s idle). The spawner lives as long as the pool. Between fork and exec the
//! child: sets `PR_SET_PDEATHSIG = SIGKILL` and checks its parent is still the
//! supervisor (the race the man page warns about), moves its protocol output to fd
//! [`PROTO_FD`] and points fd 1 at stderr (so libtorch prints cannot corrupt frames),
//! disables core dumps, and joins its memory cgroup. It runs in its own process group, so
//! killing the group also kills anything it forked.
//!
//! The environment is cleared and rebuilt: a worker sees no secrets of the daemon's
//! environment, only what libtorch and CUDA need.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;
use super::protocol::PROTO_FD;

/// Environment variables passed through to workers when set.
const PASS_ENV: &[&str] = &[
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "PYTORCH_CUDA_ALLOC_CONF",
    "NVIDIA_DRIVER_CAPABILITIES",
    "EVALD_LOG",
    // The admin's choice of ONNX Runtime library (infer::onnx).
    "ORT_DYLIB_PATH",
];

/// Lines of a worker's stderr kept for failure messages.
const STDERR_KEEP: usize = 20;
/// Longest worker output line kept (the rest of the line is dropped unread into memory).
const LINE_MAX: usize = 2000;
/// Worker output lines logged per [`LOG_WINDOW`]; past that they are counted, and one line
/// says how many were left out. A model printing megabytes per forward cannot fill the log.
const LOG_BURST: u32 = 50;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The last lines a worker wrote to stderr (shared with its forwarding thread).
pub type StderrTail = Arc<Mutex<Vec<String>>>;

/// How to start one worker.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Slot number (argument and log field).
    pub slot: usize,
    /// Its scratch folder (HOME, TMPDIR, CUDA's cache).
    pub scratch: PathBuf,
    /// Threads (OMP/MKL env).
    pub threads: usize,
    /// `cgroup.procs` of its memory cgroup.
    pub cgroup_procs: Option<CString>,
}

/// A started worker process.
#[derive(Debug)]
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// Its stdin (requests).
    pub stdin: ChildStdin,
    /// Its protocol output.
    pub stdout: ChildStdout,
    /// Its stderr (logs).
    pub stderr: ChildStderr,
}

type Request = (SpawnSpec, mpsc::Sender<std::io::Result<Spawned>>);

/// The long-lived thread that forks every worker.
#[derive(Debug)]
pub struct Spawner {
    /// The request channel and the thread, `None` after [`Self::stop`]; one lock since
    /// they end together.
    thread: Mutex<Option<(mpsc::Sender<Request>, std::thread::JoinHandle<()>)>>,
    exe: PathBuf,
}

impl Spawner {
    /// Start the spawner thread for the binary `exe` (normally `current_exe()`).
    ///
    /// # Errors
    /// When the thread cannot be created.
    pub fn start(exe: PathBuf) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let exe2 = exe.clone();
        let thread = std::thread::Builder::new()
            .name("evald-spawner".into())
            .spawn(move || {
                for (spec, reply) in rx {
                    let _ = reply.send(spawn(&exe2, &spec));
                }
            })?;
        Ok(Spawner {
            thread: Mutex::new(Some((tx, thread))),
            exe,
        })
    }

    /// The binary workers run.
    pub fn exe(&self) -> &PathBuf {
        &self.exe
    }

    /// Fork a worker (on the spawner thread) and wait for the result.
    ///
    /// # Errors
    /// The spawn error, or `BrokenPipe` after [`Self::stop`].
    pub fn spawn(&self, spec: SpawnSpec) -> std::io::Result<Spawned> {
        let (rtx, rrx) = mpsc::channel();
        // Only the send happens under the lock; the fork is waited for outside it.
        let sent = lock(&self.thread)
            .as_ref()
            .is_some_and(|(tx, _)| tx.send((spec, rtx)).is_ok());
        if !sent {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the pool is shutting down",
            ));
        }
        rrx.recv().unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "spawner thread ended",
            ))
        })
    }

    /// Stop the spawner thread (after every worker is dead: its exit would SIGKILL them).
    pub fn stop(&self) {
        let taken = lock(&self.thread).take();
        if let Some((tx, thread)) = taken {
            drop(tx);
            let _ = thread.join();
        }
    }
}

fn spawn(exe: &PathBuf, spec: &SpawnSpec) -> std::io::Result<Spawned> {
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--slot")
        .arg(spec.slot.to_string())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &spec.scratch)
        .env("TMPDIR", &spec.scratch)
        .env("CUDA_CACHE_PATH", spec.scratch.join(".nv"))
        .env("OMP_NUM_THREADS", spec.threads.to_string())
        .env("MKL_NUM_THREADS", spec.threads.to_string())
        .env("NO_COLOR", "1")
        .current_dir(&spec.scratch)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for k in PASS_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let procs = spec.cgroup_procs.clone();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid, dup2, setrlimit, open/write/close).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The supervisor died between fork and prctl.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::dup2(1, PROTO_FD) < 0 || libc::dup2(2, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            if let Some(p) = &procs {
                super::cgroup::join_in_child(p)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other("worker pipes missing"));
    };
    Ok(Spawned {
        child,
        stdin,
        stdout,
        stderr,
    })
}

/// Forward a worker's stderr to the log line by line, keeping the last lines for failure
/// messages. Ends when the worker (and everything it forked) has closed stderr.
///
/// # Errors
/// When the thread cannot be created.
pub fn forward_stderr(
    slot: usize,
    pid: Option<u32>,
    stderr: impl Read + Send + 'static,
) -> std::io::Result<(StderrTail, std::thread::JoinHandle<()>)> {
    let tail = Arc::new(Mutex::new(Vec::new()));
    let t = Arc::clone(&tail);
    let h = std::thread::Builder::new()
        .name(format!("evald-w{slot}-stderr"))
        .spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut limiter = RateLimit::new(LOG_BURST, LOG_WINDOW);
            while let Some(line) = read_line_capped(&mut r, LINE_MAX) {
                if line.is_empty() {
                    continue;
                }
                let rec = crate::logging::WorkerRecord::parse(&line);
                match limiter.admit(Instant::now()) {
                    Admit::Yes { suppressed } => {
                        if suppressed > 0 {
                            tracing::warn!(
                                target: "evald::worker",
                                worker = slot,
                                pid,
                                "{suppressed} lines of worker output not logged (more than {LOG_BURST} in {} s)",
                                LOG_WINDOW.as_secs()
                            );
                        }
                        let t = &rec.text;
                        match rec.level {
                            tracing::Level::ERROR => {
                                tracing::error!(target: "evald::worker", worker = slot, pid, "{t}")
                            }
                            tracing::Level::WARN => {
                                tracing::warn!(target: "evald::worker", worker = slot, pid, "{t}")
                            }
                            tracing::Level::INFO => {
                                tracing::info!(target: "evald::worker", worker = slot, pid, "{t}")
                            }
                            _ => tracing::debug!(target: "evald::worker", worker = slot, pid, "{t}"),
                        }
                    }
                    Admit::No => {}
                }
                let mut t = lock(&t);
                if t.len() == STDERR_KEEP {
                    t.remove(0);
                }
                t.push(format!("{} {}", rec.level, rec.text));
            }
        })?;
    Ok((tail, h))
}

/// A worker's pid in log lines and messages: the number, or `-` for a worker that is not
/// a local process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid(pub Option<u32>);

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{p}"),
            None => f.write_str("-"),
        }
    }
}

/// The next line of `r` (lossy UTF-8, trailing whitespace trimmed), at most `max` bytes
/// of it: the rest of a longer line is skipped through the reader's buffer, never
/// collected. `None` at end of stream or on a read error.
fn read_line_capped(r: &mut impl BufRead, max: usize) -> Option<String> {
    let mut buf = Vec::new();
    let mut got_any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        if avail.is_empty() {
            if buf.is_empty() && !got_any {
                return None;
            }
            break;
        }
        got_any = true;
        let (take, newline) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&avail[..take.min(room)]);
        r.consume(take + usize::from(newline));
        if newline {
            break;
        }
    }
    Some(String::from_utf8_lossy(&buf).trim_end().to_string())
}

/// Whether a line may be logged now.
#[derive(Debug, PartialEq)]
enum Admit {
    /// Yes; `suppressed` lines were left out since the last one logged.
    Yes {
        suppressed: u64,
    },
    No,
}

/// At most `burst` lines per `window` (a fixed window; simple and enough for logs).
#[derive(Debug)]
struct RateLimit {
    burst: u32,
    window: Duration,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        if self
            .start
            .is_none_or(|s| now.duration_since(s) >= self.window)
        {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Admit::Yes {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Admit::No
        }
    }
}

/// Kill a worker's process group (the worker and anything it forked).
pub fn kill_group(pid: u32) {
    // SAFETY: killpg with a pgid we created (the worker is its group leader).
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Wait for a child up to `grace`, then kill its group and reap it.
pub fn reap(child: &mut Child, grace: Duration) -> ExitStatus {
    let deadline = Instant::now() + grace;
    loop {
        match exited_unreaped(child.id()) {
            Ok(true) => {
                // Anything the worker forked dies with its group. Signalled while the
                // leader is a zombie, not yet reaped: until then its pid, and so the
                // group id, cannot be given to another process.
                kill_group(child.id());
                if let Ok(s) = child.wait() {
                    return s;
                }
                return std::os::unix::process::ExitStatusExt::from_raw(9);
            }
            // Reaped already (an earlier `reap`): its group was signalled then; the pid
            // may be someone else's now, so nothing is sent. std keeps the status.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                return child
                    .wait()
                    .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9));
            }
            Ok(false) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                kill_group(child.id());
                let _ = child.kill();
                if let Ok(s) = child.wait() {
                    return s;
                }
                return std::os::unix::process::ExitStatusExt::from_raw(9);
            }
        }
    }
}

/// Whether the child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`).
fn exited_unreaped(pid: u32) -> std::io::Result<bool> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pid, with a valid out-pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: si_pid is set by waitid (0 when no child changed state, with WNOHANG).
    Ok(unsafe { info.si_pid() } != 0)
}

/// An exit status in words: `exit code 3`, `signal 9 (SIGKILL)`.
pub fn describe_exit(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = s.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL: killed, e.g. by the kernel's OOM killer or kill -9)",
            libc::SIGSEGV => " (SIGSEGV: segmentation fault)",
            libc::SIGABRT => " (SIGABRT: abort, e.g. a C++ exception nobody caught)",
            libc::SIGBUS => " (SIGBUS)",
            libc::SIGILL => " (SIGILL)",
            libc::SIGFPE => " (SIGFPE)",
            libc::SIGSYS => " (SIGSYS: forbidden system call)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        format!("exited with code {}", s.code().unwrap_or(-1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_without_end_is_capped_not_collected() {
        // 3 MB without a newline, then a short line: the reader keeps `max` bytes of the
        // first and still finds the second.
        let mut data = vec![b'x'; 3 << 20];
        data.extend_from_slice(b"\nnext line\n");
        let mut r = BufReader::with_capacity(8192, &data[..]);
        let first = read_line_capped(&mut r, 100).unwrap();
        assert_eq!(first.len(), 100);
        assert_eq!(read_line_capped(&mut r, 100).as_deref(), Some("next line"));
        assert_eq!(read_line_capped(&mut r, 100), None);
        let mut last = BufReader::new(&b"no newline at the end"[..]);
        assert_eq!(
            read_line_capped(&mut last, 100).as_deref(),
            Some("no newline at the end")
        );
        assert_eq!(read_line_capped(&mut last, 100), None);
    }

    #[test]
    fn the_log_rate_limit_counts_what_it_leaves_out() {
        let mut l = RateLimit::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.admit(t0), Admit::Yes { suppressed: 0 });
        assert_eq!(l.admit(t0), Admit::Yes { suppressed: 0 });
        assert_eq!(l.admit(t0), Admit::No);
        assert_eq!(l.admit(t0 + Duration::from_secs(1)), Admit::No);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.admit(later), Admit::Yes { suppressed: 2 });
        assert_eq!(l.admit(later), Admit::Yes { suppressed: 0 });
    }

    #[test]
    fn reap_signals_the_group_before_the_leader_is_reaped_and_only_once() {
        use std::os::unix::process::CommandExt;
        // A leader that forks a grandchild into its own group, then exits.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 600 & echo $! ; exit 3")
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let status = reap(&mut child, Duration::from_secs(20));
        assert_eq!(status.code(), Some(3), "the leader's own status");
        // The grandchild got the group's SIGKILL (it is our grandchild, so it ends as a
        // zombie of init or a dead pid: either way not running).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next()))
                .flatten();
            if st.is_none() || st == Some('Z') {
                break;
            }
            assert!(Instant::now() < deadline, "the group was not killed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A second reap of the same child signals nothing and keeps the status.
        assert_eq!(reap(&mut child, Duration::ZERO).code(), Some(3));
    }
}
