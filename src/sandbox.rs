//! The worker's sandbox: what a hostile model running inside `evald worker` can still do.
//!
//! Layers, applied by the worker to itself after it has its configuration and before it
//! loads the model (TorchScript loading parses vendor bytes), on the main thread while it is
//! still the only thread, so every thread created later (libtorch, decoding) inherits them:
//!
//! 1. **network namespace** (`unshare(CLONE_NEWNET)`, or with a new user namespace when
//!    not privileged): the worker sees only a down loopback. Optional: skipped with a note
//!    where the kernel or privileges refuse it.
//! 2. **landlock** (ABI up to 6 requested, best effort below): the worker may read the
//!    model, the images (never the labels: the supervisor grants single image files when
//!    the labels folder overlaps the images folder), the shared libraries libtorch and
//!    CUDA load, `/proc` and `/sys` (CUDA and OpenMP read them), a few `/dev` nodes, and
//!    may write only its scratch folder. Nothing may be executed (`execve` is denied
//!    everywhere), TCP bind/connect is denied (ABI >= 4), abstract UNIX sockets and
//!    signals to processes outside the sandbox are denied (ABI >= 6).
//! 3. **seccomp** (deny-list, EPERM): `socket()` for every family but `AF_UNIX`,
//!    io_uring (it can open sockets without `socket()`), ptrace and cross-process memory
//!    access, namespaces, mounts, modules, kexec, bpf, perf, keyrings, handle-based opens.
//!    A deny-list rather than an allow-list because the CUDA driver uses a large and
//!    changing set of ioctls and mmaps.
//!
//! `pool.sandbox = "required"` refuses to run unless landlock (at least partially) and
//! seccomp are both in force; `best-effort` logs what is missing; `off` applies nothing.
//!
//! What a runtime needs beyond the system's library folders is not decided here: the
//! worker asks the model's format (`infer::ModelFormat::sandbox_needs`) and passes it in
//! the [`Plan`] (read-only folders, read-write folders, device nodes).
//!
//! GPU path (not testable on the CPU machines this was written on, kept conservative):
//! the CUDA driver is initialised *before* the sandbox (the worker loads libtorch_cuda and
//! counts devices first), and the TorchScript runtime asks for read-write + ioctl on
//! `/dev/nvidia*`, read-write on `/dev/shm`, and read on the CUDA library folders
//! (`/usr/local/cuda*`, `/usr/local/nvidia`, the Python site folder holding libtorch and
//! the `nvidia/*` wheels; `LD_LIBRARY_PATH` is granted to every runtime). If a driver
//! needs more, the worker fails with a load or forward error naming the denied file, and
//! `pool.sandbox = "off"` is the escape hatch until the rule is added to the runtime.
//!
//! The memory cap is not a sandbox layer here: it is a cgroup set up by the supervisor
//! (`pool::cgroup`), because `RLIMIT_AS` breaks CUDA's address-space reservations.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How strictly the worker must sandbox itself (`pool.sandbox` in the config; sent to each worker in its `Init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Refuse to run unless every layer is in force.
    Required,
    /// Apply what the kernel offers, warn about the rest.
    BestEffort,
    /// No sandbox.
    Off,
}

/// What the worker must be able to reach.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Strictness.
    pub policy: Policy,
    /// Files and folders readable (model, images).
    pub read_only: Vec<PathBuf>,
    /// Folders readable and writable (scratch).
    pub read_write: Vec<PathBuf>,
    /// Device nodes opened read-write with ioctls (the runtime's, e.g. `/dev/nvidia*`).
    pub devices: Vec<PathBuf>,
}

/// State of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Layer {
    /// Enforced in full.
    Enforced(String),
    /// Enforced with fewer features than asked (older kernel).
    Partial(String),
    /// Not available here (kernel, privileges); why.
    Unavailable(String),
    /// Not asked for (`pool.sandbox = "off"`).
    Off,
}

impl Layer {
    /// In force at least partially.
    pub fn active(&self) -> bool {
        matches!(self, Layer::Enforced(_) | Layer::Partial(_))
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Enforced(d) => write!(f, "on ({d})"),
            Layer::Partial(d) => write!(f, "partial ({d})"),
            Layer::Unavailable(d) => write!(f, "UNAVAILABLE ({d})"),
            Layer::Off => write!(f, "off"),
        }
    }
}

/// What is in force in a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Network namespace.
    pub netns: Layer,
    /// Landlock file system, TCP and scope rules.
    pub landlock: Layer,
    /// seccomp deny-list.
    pub seccomp: Layer,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// Threads in the process when the sandbox was applied (1 = every later thread
    /// inherits landlock).
    pub threads_at_apply: usize,
}

impl Report {
    /// The report of a worker with the sandbox off.
    pub fn off() -> Self {
        Report {
            netns: Layer::Off,
            landlock: Layer::Off,
            seccomp: Layer::Off,
            no_new_privs: false,
            threads_at_apply: 0,
        }
    }

    /// Whether the layers `required` demands are in force.
    pub fn meets_required(&self) -> bool {
        self.landlock.active() && self.seccomp.active() && self.no_new_privs
    }

    /// Layers that are not in force, in words (empty when all are).
    pub fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        for (name, l) in [
            ("network namespace", &self.netns),
            ("landlock", &self.landlock),
            ("seccomp", &self.seccomp),
        ] {
            if let Layer::Unavailable(why) = l {
                m.push(format!("{name}: {why}"));
            }
        }
        m
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "netns {}, landlock {}, seccomp {}, no_new_privs {}",
            self.netns, self.landlock, self.seccomp, self.no_new_privs
        )
    }
}

/// The sandbox could not be applied as the policy demands.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `required` and a layer is missing.
    #[error("pool.sandbox = \"required\" but not every layer is available: {missing} (report: {report}); set pool.sandbox = \"best-effort\" to run anyway")]
    Missing {
        /// Missing layers.
        missing: String,
        /// Everything found.
        report: Box<Report>,
    },
    /// A layer failed in a way that is not "unsupported" (bad rule, syscall error).
    #[error("sandbox layer {layer}: {message}")]
    Apply {
        /// Which layer.
        layer: &'static str,
        /// Error.
        message: String,
    },
}

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Apply the sandbox to the calling process (call on the main thread, before other threads
/// exist).
///
/// # Errors
/// [`SandboxError::Missing`] when the policy is `required` and a layer is missing;
/// [`SandboxError::Apply`] when a layer fails for another reason under `required`
/// (under `best-effort` such layers are reported unavailable instead).
pub fn apply(plan: &Plan) -> Result<Report, SandboxError> {
    if plan.policy == Policy::Off {
        return Ok(Report::off());
    }
    let threads_at_apply = threads_now();
    let netns = unshare_net();
    let (landlock, nnp) = match apply_landlock(plan) {
        Ok(x) => x,
        Err(e) if plan.policy == Policy::Required => return Err(e),
        Err(e) => (Layer::Unavailable(e.to_string()), false),
    };
    let seccomp = match apply_seccomp() {
        Ok(l) => l,
        Err(e) if plan.policy == Policy::Required => return Err(e),
        Err(e) => Layer::Unavailable(e.to_string()),
    };
    let no_new_privs = nnp || seccomp.active() || read_no_new_privs();
    let report = Report {
        netns,
        landlock,
        seccomp,
        no_new_privs,
        threads_at_apply,
    };
    if plan.policy == Policy::Required && !report.meets_required() {
        return Err(SandboxError::Missing {
            missing: report.missing().join("; "),
            report: Box::new(report),
        });
    }
    Ok(report)
}

fn read_no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

fn unshare_net() -> Layer {
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return Layer::Enforced("new network namespace".into());
    }
    let first = std::io::Error::last_os_error();
    // Unprivileged: a user namespace makes us "root" enough for a network namespace
    // (needs a single-threaded process and user namespaces enabled).
    // SAFETY: as above.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0 {
        return Layer::Enforced("new user + network namespace".into());
    }
    let second = std::io::Error::last_os_error();
    Layer::Unavailable(format!(
        "unshare(CLONE_NEWNET): {first}; with CLONE_NEWUSER: {second}"
    ))
}

/// The system's shared-library folders and the loader's configuration, which any runtime
/// may `dlopen` from after the sandbox is on (a runtime's own folders come in the plan,
/// from what its runtime declares it needs).
fn library_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["/usr/lib", "/usr/lib64", "/lib", "/lib64"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for f in ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d"] {
        v.push(f.into());
    }
    if let Ok(exe) = std::env::current_exe() {
        v.push(exe);
    }
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        v.extend(std::env::split_paths(&p).filter(|p| p.is_absolute()));
    }
    v
}

fn apply_landlock(plan: &Plan) -> Result<(Layer, bool), SandboxError> {
    use landlock::{
        Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let err = |e: &dyn std::fmt::Display| SandboxError::Apply {
        layer: "landlock",
        message: e.to_string(),
    };
    let all = AccessFs::from_all(abi);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    // Write everything but execute (nothing is ever executed in a worker).
    let rw = all & !BitFlags::from(AccessFs::Execute);
    let dev_rw = rw & !(AccessFs::MakeChar | AccessFs::MakeBlock);
    let file_only = AccessFs::from_file(abi);

    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    for p in &plan.read_only {
        rules.push((p.clone(), read));
    }
    for p in library_dirs() {
        rules.push((p, read));
    }
    for p in ["/proc", "/sys", "/dev/urandom", "/dev/random"] {
        rules.push((p.into(), read));
    }
    for p in ["/dev/null", "/dev/zero"] {
        rules.push((p.into(), dev_rw));
    }
    for p in &plan.read_write {
        rules.push((p.clone(), rw));
    }
    for p in &plan.devices {
        rules.push((p.clone(), dev_rw));
    }

    let mut created = Ruleset::default()
        .handle_access(all)
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::from_all(abi))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let mut granted = 0;
    for (path, access) in rules {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // absent on this machine: nothing to grant
        };
        let access = if meta.is_dir() {
            access
        } else {
            access & file_only
        };
        let fd = PathFd::new(&path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&format!("{}: {e}", path.display())))?;
        granted += 1;
    }
    // Not `all_threads`: that needs ABI 8 and would make every older kernel "partial";
    // the worker applies this while it is single-threaded (see `threads_at_apply`).
    let status = created.restrict_self().map_err(|e| err(&e))?;
    let kernel = match status.landlock {
        landlock::LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => format!(
            "kernel ABI {}",
            kernel_abi.map_or(effective_abi.to_string(), |k| k.to_string())
        ),
        other => format!("{other:?}"),
    };
    let detail = format!("{kernel}, {granted} path rules, exec denied, TCP denied, scoped");
    let layer = match status.ruleset {
        RulesetStatus::FullyEnforced => Layer::Enforced(detail),
        RulesetStatus::PartiallyEnforced => Layer::Partial(detail),
        RulesetStatus::NotEnforced => Layer::Unavailable(format!("not supported: {kernel}")),
    };
    Ok((layer, status.no_new_privs))
}

/// Syscalls denied outright.
fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
    ];
    v.sort_unstable();
    v
}

fn apply_seccomp() -> Result<Layer, SandboxError> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let err = |e: &dyn std::fmt::Display| SandboxError::Apply {
        layer: "seccomp",
        message: e.to_string(),
    };
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Ok(Layer::Unavailable("unsupported CPU architecture".into()));
    };
    let mut rules = std::collections::BTreeMap::new();
    let not_unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        libc::AF_UNIX as u64,
    )
    .map_err(|e| err(&e))?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![not_unix]).map_err(|e| err(&e))?],
    );
    for s in denied_syscalls() {
        rules.insert(s, vec![]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    let prog: BpfProgram = filter.try_into().map_err(|e| err(&e))?;
    let n = denied_syscalls().len();
    match seccompiler::apply_filter_all_threads(&prog) {
        Ok(()) => Ok(Layer::Enforced(format!(
            "socket() limited to AF_UNIX, {n} syscalls denied, all threads"
        ))),
        Err(e_all) => match seccompiler::apply_filter(&prog) {
            Ok(()) => Ok(Layer::Partial(format!(
                "socket() limited to AF_UNIX, {n} syscalls denied, this thread only (TSYNC: {e_all})"
            ))),
            Err(e) if is_unsupported(&e) => Ok(Layer::Unavailable(e.to_string())),
            Err(e) => Err(err(&e)),
        },
    }
}

fn is_unsupported(e: &seccompiler::Error) -> bool {
    let s = e.to_string();
    s.contains("Invalid argument") || s.contains("not implemented") || s.contains("ENOSYS")
}

/// Files and folders of `images` a worker may read, given where the labels are: the whole
/// folder normally; only the image files (`*_NNNN.nii[.gz]`) when the labels folder is the
/// images folder or inside it, so that a worker can never open a reference.
pub fn image_grants(images: &Path, labels: Option<&Path>) -> Vec<PathBuf> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let img = canon(images);
    let overlaps = labels.is_some_and(|l| canon(l).starts_with(&img));
    if !overlaps {
        return vec![img];
    }
    let Ok(dir) = std::fs::read_dir(&img) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| is_image_name(&p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    v.sort();
    v
}

fn is_image_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"));
    stem.and_then(|s| s.rsplit_once('_'))
        .is_some_and(|(_, ch)| ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert!(is_image_name("case_001_0000.nii.gz"));
        assert!(is_image_name("a_0001.nii"));
        assert!(!is_image_name("case_001.nii.gz"));
        assert!(!is_image_name("case_0000.txt"));
    }

    #[test]
    fn labels_inside_images_get_file_grants_only() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("images");
        std::fs::create_dir_all(img.join("labels")).unwrap();
        std::fs::write(img.join("c_001_0000.nii.gz"), b"x").unwrap();
        std::fs::write(img.join("c_001.nii.gz"), b"x").unwrap();
        let g = image_grants(&img, Some(&img.join("labels")));
        assert_eq!(g.len(), 1);
        assert!(g[0].ends_with("c_001_0000.nii.gz"));
        let g = image_grants(&img, Some(&img));
        assert_eq!(g.len(), 1);
        let other = d.path().join("labels");
        std::fs::create_dir_all(&other).unwrap();
        let g = image_grants(&img, Some(&other));
        assert_eq!(g, vec![std::fs::canonicalize(&img).unwrap()]);
    }
}
