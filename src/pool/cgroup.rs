//! Per-worker memory cap with cgroup v2 (`pool.memory_max_mb`).
//!
//! Not `RLIMIT_AS`: CUDA reserves hundreds of GB of virtual address space and breaks under
//! an address-space limit. A cgroup caps what is actually resident (host memory only; GPU
//! memory is bounded by the device and by `Model::predict`'s batch halving).
//!
//! cgroup v2 forbids processes in a cgroup whose children have controllers enabled, so
//! with a delegated cgroup (systemd `Delegate=yes`, see the unit file) the supervisor
//!  1. creates `<own>/supervisor` and moves itself there,
//!  2. enables `+memory` in `<own>/cgroup.subtree_control`,
//!  3. creates `<own>/worker-<slot>` with `memory.max` and `memory.swap.max = 0`;
//!
//! each worker joins its cgroup between `fork` and `exec` (it writes `0` to
//! `cgroup.procs`), so it is capped before it loads anything. Where the own cgroup is not
//! writable, or cgroup v2 is not mounted at `/sys/fs/cgroup` (e.g. cgroup v1 hosts), the
//! cap is not applied and the supervisor says so once in the log (the service's own
//! `MemoryMax=` still bounds the whole daemon).

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The cgroups made for the workers; removed on drop (workers must be gone by then).
#[derive(Debug)]
pub struct MemoryCap {
    slots: Vec<PathBuf>,
}

impl MemoryCap {
    /// Set up one capped cgroup per worker slot under this process's cgroup.
    ///
    /// # Errors
    /// Why it is not possible here (no cgroup v2, not delegated, not writable).
    pub fn prepare(bytes: u64, slots: usize) -> Result<MemoryCap, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 entry in /proc/self/cgroup (cgroup v1 host)")?;
        Self::prepare_in(Path::new("/sys/fs/cgroup"), rel, bytes, slots)
    }

    /// [`Self::prepare`] with an explicit cgroup2 mount point and own cgroup (tests).
    ///
    /// # Errors
    /// As [`Self::prepare`].
    pub fn prepare_in(
        root: &Path,
        own: &str,
        bytes: u64,
        slots: usize,
    ) -> Result<MemoryCap, String> {
        if !root.join("cgroup.controllers").exists() {
            return Err(format!("cgroup v2 is not mounted at {}", root.display()));
        }
        let base = root.join(own.trim_start_matches('/'));
        let w = |p: PathBuf, v: &str| {
            std::fs::write(&p, v).map_err(|e| format!("writing {v:?} to {}: {e}", p.display()))
        };
        let enabled = std::fs::read_to_string(base.join("cgroup.subtree_control"))
            .map_err(|e| format!("{}: {e}", base.display()))?;
        if !enabled.split_whitespace().any(|c| c == "memory") {
            let available = std::fs::read_to_string(base.join("cgroup.controllers"))
                .map_err(|e| format!("{}: {e}", base.display()))?;
            if !available.split_whitespace().any(|c| c == "memory") {
                return Err(format!(
                    "the memory controller is not delegated to {} (systemd: Delegate=yes)",
                    base.display()
                ));
            }
            let sup = base.join("supervisor");
            std::fs::create_dir_all(&sup).map_err(|e| format!("{}: {e}", sup.display()))?;
            w(sup.join("cgroup.procs"), "0")?;
            w(base.join("cgroup.subtree_control"), "+memory")?;
        }
        let mut dirs = Vec::new();
        for s in 0..slots {
            let d = base.join(format!("worker-{s}"));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            w(d.join("memory.max"), &bytes.to_string())?;
            // No swap: a capped worker that swaps is a hung worker.
            let _ = std::fs::write(d.join("memory.swap.max"), "0");
            dirs.push(d);
        }
        Ok(MemoryCap { slots: dirs })
    }

    /// `cgroup.procs` of a slot, as a C string for use between fork and exec.
    pub fn procs_file(&self, slot: usize) -> Option<CString> {
        let p = self.slots.get(slot)?.join("cgroup.procs");
        CString::new(p.into_os_string().into_encoded_bytes()).ok()
    }
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        for d in &self.slots {
            // Fails while a process is still inside; nothing else to do then.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Between fork and exec: move the calling process into the cgroup whose `cgroup.procs` is
/// `procs` (only async-signal-safe calls).
pub(crate) fn join_in_child(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if r != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_v2_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = MemoryCap::prepare_in(d.path(), "/x", 1 << 30, 2).unwrap_err();
        assert!(e.contains("not mounted"), "{e}");
    }

    #[test]
    fn delegated_cgroup_gets_worker_children_with_limits() {
        // A fake cgroup2 tree: plain files stand in for the kernel's.
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let own = root.join("system.slice/evald.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        let cap = MemoryCap::prepare_in(root, "/system.slice/evald.service", 1 << 30, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(
            std::fs::read_to_string(own.join("supervisor/cgroup.procs")).unwrap(),
            "0"
        );
        for s in 0..2 {
            let w = own.join(format!("worker-{s}"));
            assert_eq!(
                std::fs::read_to_string(w.join("memory.max")).unwrap(),
                (1u64 << 30).to_string()
            );
        }
        assert!(cap
            .procs_file(1)
            .unwrap()
            .to_string_lossy()
            .ends_with("worker-1/cgroup.procs"));
        assert!(cap.procs_file(2).is_none());
    }

    #[test]
    fn undelegated_memory_controller_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let e = MemoryCap::prepare_in(root, "/", 1 << 30, 1).unwrap_err();
        assert!(e.contains("Delegate"), "{e}");
    }
}
