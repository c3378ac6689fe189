//! The drop folder: which submission folders exist (`<drop_dir>/<task>/<vendor>/<name>/`)
//! and when each one is complete.
//!
//! Events from `notify` (inotify, or polling for network file systems) are only hints:
//! they say *where* to look soon. The truth is a listing: every folder's
//! [`Fingerprint`] (names, sizes, mtimes and ctimes of its files). A folder is
//! [`Ready`] when its fingerprint stayed the same for `settle` and no writer has a file
//! of it open (inotify reports writes and `close(write)`), or, for tasks that require it,
//! as soon as a `READY` marker is present. A full rescan runs at start and every
//! `rescan` period because events get lost (files in brand-new nested folders, queue
//! overflow, changes made on the server of a network mount).
//!
//! evald's own outputs (`summary.json`, `report*.xlsx`, `REJECTED.txt`, `FAILED.txt`,
//! temp files; named in [`crate::layout`]) and office lock files are not part of a fingerprint, so writing or opening a report never
//! makes a folder new again. Hidden folders (`.staging/`) are ignored: vendors can upload
//! there and rename into place. [`Tracker`] is synchronous and owns no thread: the daemon
//! feeds it events and calls [`Tracker::poll`] from a blocking thread.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind};
use sha2::Digest;

use crate::config::WatchMode;
use crate::layout::{
    is_evald_output, is_partial_upload, locate, Located, SubmissionDir, READY_MARKER,
};

/// At most this many entries in one submission folder (a mistaken copy of a whole disk
/// must not stall the daemon).
pub const MAX_ENTRIES: usize = 10_000;
/// At most this deep below a submission folder.
const MAX_DEPTH: usize = 8;

/// Problems with the drop folder or the watcher.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A folder cannot be listed or a file's metadata read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file-system watcher could not start.
    #[error("cannot watch {path}: {message}")]
    Watcher {
        /// The drop folder.
        path: PathBuf,
        /// notify's message, with a hint.
        message: String,
    },
}

/// What a folder looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// sha256 over the sorted entry list, hex.
    pub digest: String,
    /// Non-hidden files and links (anything to look at, at all?).
    pub files: usize,
    /// Files whose names say an upload is in progress.
    pub partial: Vec<String>,
    /// Symbolic links (path, target as written).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// A `READY` marker is present.
    pub marker: bool,
    /// More than [`MAX_ENTRIES`] entries: listing stopped there (the folder gets a
    /// rejection that says so, not silence).
    pub overflow: bool,
    /// Folders deeper than evald looks into (they count as content, so a model buried
    /// there gets a "missing model" answer).
    pub too_deep: bool,
}

/// List a submission folder recursively (without following links) into a [`Fingerprint`].
///
/// # Errors
/// [`WatchError::Io`] when it cannot be listed. A folder with too many entries is
/// [`Fingerprint::overflow`], not an error.
pub fn fingerprint(dir: &Path) -> Result<Fingerprint, WatchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WatchError::Io { path, source }
    };
    let mut lines = Vec::new();
    let mut fp = Fingerprint {
        digest: String::new(),
        files: 0,
        partial: Vec::new(),
        symlinks: Vec::new(),
        marker: false,
        overflow: false,
        too_deep: false,
    };
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_evald_output(&name) {
                continue;
            }
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Deleted between listing and stat: the next look will see it gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            let ft = meta.file_type();
            let line = if ft.is_symlink() {
                if !name.starts_with('.') {
                    fp.files += 1;
                }
                let target = std::fs::read_link(&path).map_err(io(&path))?;
                let l = format!("l\0{}\0{}", rel.display(), target.display());
                fp.symlinks.push((path.clone(), target));
                l
            } else if ft.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    stack.push((path.clone(), depth + 1));
                } else if !fp.too_deep {
                    fp.too_deep = true;
                    fp.files += 1;
                }
                // A folder's own mtime changes when evald writes its outputs: not part of it.
                format!("d\0{}", rel.display())
            } else {
                // A FIFO or device counts too: it gets a rejection that says what it is,
                // instead of the folder being taken as empty and left without an outcome.
                if !name.starts_with('.') {
                    fp.files += 1;
                }
                if depth == 0 && name == READY_MARKER {
                    fp.marker = true;
                }
                if is_partial_upload(&name) {
                    fp.partial.push(rel.display().to_string());
                }
                format!(
                    "f\0{}\0{}\0{}.{}\0{}.{}",
                    rel.display(),
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ctime(),
                    meta.ctime_nsec()
                )
            };
            lines.push(line);
            if lines.len() > MAX_ENTRIES {
                // A fixed digest: the folder settles and is answered once; a change that
                // brings it under the limit gives a real digest and a new look.
                fp.overflow = true;
                fp.files = fp.files.max(1);
                fp.digest = format!("overflow:{MAX_ENTRIES}");
                return Ok(fp);
            }
        }
    }
    lines.sort();
    let mut h = sha2::Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    fp.digest = hex::encode(h.finalize());
    Ok(fp)
}

/// A complete submission folder, handed to ingestion once per distinct content.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The folder.
    pub sub: SubmissionDir,
    /// Its content when it was found complete.
    pub fingerprint: Fingerprint,
    /// The submission folder itself is a symbolic link (to this target).
    pub symlinked_to: Option<PathBuf>,
}

#[derive(Debug)]
struct Observation {
    sub: SubmissionDir,
    digest: String,
    since: Instant,
    /// Handed out (or found not to need anything) for this digest; only a change or a
    /// [`Tracker::reconsider_all`] looks again.
    settled: bool,
}

/// Follows the drop tree from events and scans; decides when folders are complete.
#[derive(Debug)]
pub struct Tracker {
    drop_dir: PathBuf,
    settle: Duration,
    rescan: Duration,
    track_writers: bool,
    observed: HashMap<PathBuf, Observation>,
    /// Files written to (inotify IN_MODIFY) and not yet closed, with the last write time.
    writers: HashMap<PathBuf, Instant>,
    dirty: BTreeMap<PathBuf, SubmissionDir>,
    upper: Vec<(PathBuf, Instant)>,
    next_full: Instant,
    warned: HashSet<PathBuf>,
    /// Folders held back because a process has one of their files open for writing.
    waiting_for: HashSet<PathBuf>,
}

impl Tracker {
    /// Track `drop_dir`; the first [`Tracker::poll`] does a full scan.
    pub fn new(drop_dir: &Path, settle: Duration, rescan: Duration, mode: WatchMode) -> Self {
        Tracker {
            drop_dir: drop_dir.to_path_buf(),
            settle,
            rescan,
            // Polling cannot see open writers; only inotify reports close(write).
            track_writers: mode == WatchMode::Native,
            observed: HashMap::new(),
            writers: HashMap::new(),
            dirty: BTreeMap::new(),
            upper: Vec::new(),
            next_full: Instant::now(),
            warned: HashSet::new(),
            waiting_for: HashSet::new(),
        }
    }

    /// Apply reloaded timings.
    pub fn set_timing(&mut self, settle: Duration, rescan: Duration) {
        self.settle = settle;
        if rescan != self.rescan {
            self.rescan = rescan;
            self.next_full = self.next_full.min(Instant::now() + rescan);
        }
    }

    /// Hand every complete folder out again at the next poll (after a config reload, so
    /// that folders refused for an unknown task are looked at again), and rescan now.
    pub fn reconsider_all(&mut self) {
        for o in self.observed.values_mut() {
            o.settled = false;
        }
        self.next_full = Instant::now();
    }

    /// Ask for a full rescan at the next poll.
    pub fn rescan_now(&mut self) {
        self.next_full = Instant::now();
    }

    /// A writer mark older than this no longer blocks (a lost close event must not block
    /// a folder forever).
    fn writer_grace(&self) -> Duration {
        (self.settle * 3).max(Duration::from_secs(30))
    }

    /// Take a watcher event into account (no I/O).
    pub fn on_event(&mut self, ev: &Event, now: Instant) {
        if ev.need_rescan() {
            // The kernel's queue overflowed: what we know about writers may be stale.
            tracing::warn!("file events were lost (queue overflow); rescanning the drop folder");
            self.writers.clear();
            self.next_full = now;
            return;
        }
        match ev.kind {
            // Reads change nothing, and our own scans (opening folders to list them), hashing
            // and model loading cause them: reacting would make scans feed themselves.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            _ => {}
        }
        for path in &ev.paths {
            match locate(&self.drop_dir, path) {
                Located::Ignored => {}
                Located::Root => self.next_full = now,
                Located::Upper(d) => {
                    // A new task/vendor folder: events for folders created inside it right
                    // away can be missed (notify #727), so look now and after the settle time.
                    self.upper.push((d.clone(), now));
                    self.upper.push((d, now + self.settle));
                }
                Located::Submission(sub, file) => {
                    if file.as_deref().is_some_and(is_evald_output) {
                        continue;
                    }
                    match ev.kind {
                        EventKind::Access(_) => {
                            // close(write): the writer is done with this file.
                            self.writers.remove(path);
                        }
                        EventKind::Modify(ModifyKind::Data(_))
                        | EventKind::Modify(ModifyKind::Any)
                            if self.track_writers =>
                        {
                            self.writers.insert(path.clone(), now);
                        }
                        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                            self.writers.retain(|w, _| !w.starts_with(path));
                        }
                        _ => {}
                    }
                    self.dirty.insert(sub.dir.clone(), sub);
                }
            }
        }
    }

    fn live_writer_until(&self, dir: &Path, now: Instant) -> Option<Instant> {
        let grace = self.writer_grace();
        self.writers
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(_, t)| *t + grace)
            .filter(|until| *until > now)
            .max()
    }

    /// When [`Tracker::poll`] should run next.
    pub fn next_wake(&self, now: Instant) -> Instant {
        if !self.dirty.is_empty() {
            return now;
        }
        let mut t = self.next_full;
        for (_, at) in &self.upper {
            t = t.min(*at);
        }
        for (dir, o) in &self.observed {
            if o.settled {
                continue;
            }
            let mut due = o.since + self.settle;
            if let Some(w) = self.live_writer_until(dir, now) {
                // Re-check when the writer mark would expire; a close event wakes us sooner.
                due = due.max(w);
            }
            t = t.min(due);
        }
        t
    }

    fn warn_once(&mut self, path: &Path, msg: &str) {
        if self.warned.insert(path.to_path_buf()) {
            tracing::warn!(path = %path.display(), "{msg}");
        }
    }

    /// Submission folders at or below `from` (the drop folder, a task or a vendor folder).
    fn list(&mut self, from: &Path) -> Vec<SubmissionDir> {
        let depth = from
            .strip_prefix(&self.drop_dir)
            .map_or(0, |r| r.components().count());
        let mut out = Vec::new();
        let mut stack = vec![(from.to_path_buf(), depth)];
        while let Some((d, level)) = stack.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && level > 0 => continue,
                Err(e) => {
                    tracing::warn!(path = %d.display(), "cannot list: {e}");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let Ok(ft) = entry.file_type() else { continue };
                if level + 1 == 3 {
                    if ft.is_dir() || ft.is_symlink() {
                        if let Located::Submission(sub, None) = locate(&self.drop_dir, &path) {
                            out.push(sub);
                        }
                    } else if !is_evald_output(&name) {
                        self.warn_once(
                            &path,
                            &format!(
                                "a file outside any submission folder is ignored: submissions \
                                 are {}",
                                crate::layout::HINT
                            ),
                        );
                    }
                } else if ft.is_dir() {
                    stack.push((path, level + 1));
                } else if ft.is_symlink() {
                    self.warn_once(
                        &path,
                        "a symbolic link to a folder in the drop tree is not followed; copy the folder instead",
                    );
                } else {
                    self.warn_once(
                        &path,
                        &format!(
                            "a file outside any submission folder is ignored: submissions are {}",
                            crate::layout::HINT
                        ),
                    );
                }
            }
        }
        out
    }

    /// Look at what is due (events, settle deadlines, rescans) and return the folders
    /// that became complete. Does file-system I/O: call it from a blocking thread.
    /// `needs_marker(task)` says whether a task waits for a `READY` file.
    pub fn poll(&mut self, now: Instant, needs_marker: &dyn Fn(&str) -> bool) -> Vec<Ready> {
        let mut todo: BTreeMap<PathBuf, SubmissionDir> = std::mem::take(&mut self.dirty);
        if now >= self.next_full {
            self.next_full = now + self.rescan;
            let root = self.drop_dir.clone();
            for sub in self.list(&root) {
                todo.insert(sub.dir.clone(), sub);
            }
            // Forget folders that are gone.
            self.observed
                .retain(|d, _| todo.contains_key(d) || d.exists());
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.upper)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.upper = later;
        for (d, _) in due {
            for sub in self.list(&d) {
                todo.insert(sub.dir.clone(), sub);
            }
        }
        for (d, o) in &self.observed {
            if !o.settled && o.since + self.settle <= now {
                todo.insert(d.clone(), o.sub.clone());
            }
        }
        let mut ready = Vec::new();
        for (_, sub) in todo {
            if let Some(r) = self.observe(sub, now, needs_marker) {
                ready.push(r);
            }
        }
        ready
    }

    fn observe(
        &mut self,
        sub: SubmissionDir,
        now: Instant,
        needs_marker: &dyn Fn(&str) -> bool,
    ) -> Option<Ready> {
        let dir = sub.dir.clone();
        let meta = match std::fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(_) => {
                self.observed.remove(&dir);
                return None;
            }
        };
        let (fp, symlinked_to) = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&dir).unwrap_or_default();
            let fp = Fingerprint {
                digest: format!("symlink:{}", target.display()),
                files: 1,
                partial: Vec::new(),
                symlinks: vec![(dir.clone(), target.clone())],
                marker: false,
                overflow: false,
                too_deep: false,
            };
            (fp, Some(target))
        } else if meta.is_dir() {
            match fingerprint(&dir) {
                Ok(fp) => (fp, None),
                Err(e) => {
                    self.warn_once(&dir, &e.to_string());
                    return None;
                }
            }
        } else {
            return None;
        };
        let o = self
            .observed
            .entry(dir.clone())
            .or_insert_with(|| Observation {
                sub: sub.clone(),
                digest: String::new(),
                since: now,
                settled: false,
            });
        if o.digest != fp.digest {
            o.digest = fp.digest.clone();
            o.since = now;
            o.settled = false;
        }
        if o.settled {
            return None;
        }
        let since = o.since;
        if symlinked_to.is_none() {
            if self.live_writer_until(&dir, now).is_some() {
                return None;
            }
            // Events miss writers that paused longer than the writer grace, or that opened
            // their file before the folder's watch existed: ask the kernel who holds a file
            // of the folder open for writing, right before handing the folder out.
            if fp.files > 0 && fp.partial.is_empty() && now.duration_since(since) >= self.settle {
                if let Some(w) = open_writer(&dir) {
                    if self.waiting_for.insert(dir.clone()) {
                        tracing::info!(
                            dir = %dir.display(),
                            file = %w.file.display(),
                            pid = w.pid,
                            process = %w.process,
                            "waiting: a file of this folder is still open for writing"
                        );
                    }
                    if let Some(o) = self.observed.get_mut(&dir) {
                        o.since = now;
                    }
                    return None;
                }
                self.waiting_for.remove(&dir);
            }
            if fp.files == 0 || !fp.partial.is_empty() {
                // Nothing to evaluate yet, or an upload still in progress: a change wakes it.
                if let Some(o) = self.observed.get_mut(&dir) {
                    o.settled = true;
                }
                return None;
            }
            if needs_marker(&sub.task) {
                if !fp.marker {
                    if let Some(o) = self.observed.get_mut(&dir) {
                        o.settled = true;
                    }
                    return None;
                }
            } else if now.duration_since(since) < self.settle {
                return None;
            }
        }
        if let Some(o) = self.observed.get_mut(&dir) {
            o.settled = true;
        }
        Some(Ready {
            sub,
            fingerprint: fp,
            symlinked_to,
        })
    }
}

/// A process holding a file of a submission folder open for writing.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenWriter {
    /// The process.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub process: String,
    /// The file it writes.
    pub file: PathBuf,
}

/// The first process found with a file below `dir` open for writing (`/proc/*/fd` and
/// the access mode in `/proc/*/fdinfo`), evald's own output temp files aside. It sees the
/// processes this one may inspect: all of them as root or with CAP_SYS_PTRACE, otherwise
/// those of its own user; and only writers on this host (on a network mount, a writer on
/// another machine is invisible: use the `READY` marker or upload into `.staging/` and
/// rename).
pub fn open_writer(dir: &Path) -> Option<OpenWriter> {
    let dir = dir.canonicalize().ok()?;
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !target.starts_with(&dir)
                || target
                    .file_name()
                    .is_some_and(|n| is_evald_output(&n.to_string_lossy()))
            {
                continue;
            }
            let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            if flags & (libc::O_ACCMODE as u32) != libc::O_RDONLY as u32 {
                let process = std::fs::read_to_string(p.path().join("comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                return Some(OpenWriter {
                    pid,
                    process,
                    file: target,
                });
            }
        }
    }
    None
}

/// A running file-system watcher; dropping it stops the events.
pub type Watcher = Box<dyn notify::Watcher + Send>;

/// Start watching `drop_dir` recursively, sending every event to `tx`.
///
/// # Errors
/// [`WatchError::Watcher`] with a hint (inotify limits) when it cannot start.
pub fn start(
    drop_dir: &Path,
    mode: WatchMode,
    poll_every: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<notify::Result<Event>>,
) -> Result<Watcher, WatchError> {
    let err = |e: notify::Error| {
        let hint = match e.kind {
            notify::ErrorKind::MaxFilesWatch => {
                " (raise the inotify limit: sysctl fs.inotify.max_user_watches=524288, \
                 or set daemon.watch = \"poll\")"
            }
            _ => "",
        };
        WatchError::Watcher {
            path: drop_dir.to_path_buf(),
            message: format!("{e}{hint}"),
        }
    };
    let handler = move |res: notify::Result<Event>| {
        // The receiver is gone only during shutdown.
        let _ = tx.send(res);
    };
    let mut w: Watcher = match mode {
        WatchMode::Native => Box::new(notify::recommended_watcher(handler).map_err(err)?),
        WatchMode::Poll => Box::new(
            notify::PollWatcher::new(
                handler,
                notify::Config::default()
                    .with_poll_interval(poll_every)
                    .with_compare_contents(false),
            )
            .map_err(err)?,
        ),
    };
    w.watch(drop_dir, notify::RecursiveMode::Recursive)
        .map_err(err)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange};

    fn ev(kind: EventKind, p: &Path) -> Event {
        Event::new(kind).add_path(p.to_path_buf())
    }

    #[test]
    fn outputs_do_not_change_a_fingerprint_but_files_do() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.pt"), b"abc").unwrap();
        let a = fingerprint(d.path()).unwrap();
        assert_eq!(a.files, 1);
        for f in [
            "summary.json",
            "report.xlsx",
            "REJECTED.txt",
            ".tmpAbC12",
            "x.tmp",
            ".~lock.report.xlsx#",
        ] {
            std::fs::write(d.path().join(f), b"out").unwrap();
        }
        assert_eq!(fingerprint(d.path()).unwrap().digest, a.digest);
        std::fs::write(d.path().join("submission.toml"), b"").unwrap();
        let b = fingerprint(d.path()).unwrap();
        assert_ne!(b.digest, a.digest);
        std::fs::write(d.path().join("model.pt.partial"), b"").unwrap();
        assert_eq!(fingerprint(d.path()).unwrap().partial.len(), 1);
    }

    #[test]
    fn a_folder_is_ready_once_after_it_settles_and_not_while_written() {
        let d = tempfile::tempdir().unwrap();
        let drop = d.path();
        let sub = drop.join("t/v/n");
        std::fs::create_dir_all(&sub).unwrap();
        let settle = Duration::from_secs(2);
        let mut tr = Tracker::new(drop, settle, Duration::from_secs(3600), WatchMode::Native);
        let no = |_: &str| false;
        let t0 = Instant::now();
        assert!(tr.poll(t0, &no).is_empty(), "empty folder: nothing to do");
        let model = sub.join("model.pt");
        std::fs::write(&model, b"half").unwrap();
        tr.on_event(&ev(EventKind::Create(CreateKind::File), &model), t0);
        tr.on_event(
            &ev(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &model),
            t0,
        );
        assert!(tr.poll(t0, &no).is_empty());
        // Settled by size and mtime, but the writer has not closed the file.
        assert!(tr.poll(t0 + settle * 2, &no).is_empty());
        assert!(tr.next_wake(t0 + settle * 2) > t0 + settle * 2);
        tr.on_event(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &model,
            ),
            t0 + settle * 2,
        );
        let r = tr.poll(t0 + settle * 2, &no);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].sub.vendor, "v");
        // Our own outputs and reads do not hand it out again.
        std::fs::write(sub.join("summary.json"), b"{}").unwrap();
        tr.on_event(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                &model,
            ),
            t0 + settle * 3,
        );
        tr.on_event(
            &ev(
                EventKind::Create(CreateKind::File),
                &sub.join("summary.json"),
            ),
            t0 + settle * 3,
        );
        tr.rescan_now();
        assert!(tr.poll(t0 + settle * 5, &no).is_empty());
        // A changed model is new content.
        std::fs::write(&model, b"the whole model").unwrap();
        tr.rescan_now();
        assert!(tr.poll(t0 + settle * 6, &no).is_empty(), "not settled yet");
        assert_eq!(tr.poll(t0 + settle * 8, &no).len(), 1);
    }

    #[test]
    fn reads_and_folder_listings_never_trigger_scans() {
        let d = tempfile::tempdir().unwrap();
        let mut tr = Tracker::new(
            d.path(),
            Duration::from_secs(1),
            Duration::from_secs(3600),
            WatchMode::Native,
        );
        let t0 = Instant::now();
        let _ = tr.poll(t0, &|_: &str| false);
        let later = t0 + Duration::from_secs(5);
        for p in [
            d.path().to_path_buf(),
            d.path().join("t"),
            d.path().join("t/v/n/model.pt"),
        ] {
            for kind in [
                EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any)),
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
            ] {
                tr.on_event(&ev(kind, &p), t0);
            }
        }
        assert!(
            tr.next_wake(t0) >= t0 + Duration::from_secs(3600),
            "a read woke the tracker"
        );
        assert!(tr.poll(later, &|_: &str| false).is_empty());
    }

    #[test]
    fn a_marker_task_waits_for_ready_and_not_for_the_settle_time() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("t/v/n");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("model.pt"), b"m").unwrap();
        let mut tr = Tracker::new(
            d.path(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            WatchMode::Poll,
        );
        let yes = |_: &str| true;
        let t0 = Instant::now();
        assert!(tr.poll(t0, &yes).is_empty());
        std::fs::write(sub.join(READY_MARKER), b"").unwrap();
        tr.rescan_now();
        assert_eq!(
            tr.poll(Instant::now(), &yes).len(),
            1,
            "no settle time needed"
        );
    }

    #[test]
    fn a_process_writing_into_the_folder_is_found_until_it_closes() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("model.pt");
        // Another process holds the file open for writing (this one is never counted).
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("cat > \"$0\"")
            .arg(&file)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let wait = |want: bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let w = open_writer(d.path());
                if w.is_some() == want {
                    return w;
                }
                assert!(Instant::now() < deadline, "open_writer never became {want}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let w = wait(true).unwrap();
        assert_eq!(w.pid, child.id());
        assert_eq!(w.file, file.canonicalize().unwrap());
        child.stdin.take().unwrap().write_all(b"bytes").unwrap();
        child.wait().unwrap();
        assert_eq!(wait(false), None);
        // Readers do not count.
        let _r = std::fs::File::open(&file).unwrap();
        let reader = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; cat > /dev/null")
            .arg(&file)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert_eq!(open_writer(d.path()), None);
        drop(reader);
    }
}
