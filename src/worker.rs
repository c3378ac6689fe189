//! `evald worker` (internal): the child process that runs a vendor's model.
//!
//! Started only by the pool supervisor ([`crate::pool`]), which sets up its descriptors:
//! requests arrive on stdin, frames go out on fd [`PROTO_FD`], fd 1 is the log (stderr).
//! The life of a worker:
//!
//! 1. say `Hello`, read `Init` (on the main thread, while it is the only thread);
//! 2. on a GPU, initialise CUDA (before the sandbox: the driver opens many files once);
//! 3. sandbox itself ([`crate::sandbox`]); with `pool.sandbox = "required"` a missing
//!    layer is `Fatal`;
//! 4. start its threads (all inherit the sandbox): the **reader** (requests; stdin EOF or
//!    `Shutdown` ends the process at once, even while the model is busy), the
//!    **heartbeat**, and the **decoder**, which reads and decodes the next case's image
//!    while the main thread runs the model on the current one (prefetch);
//! 5. load the model (`Fatal` if it cannot), say `Ready`;
//! 6. main thread: predict each decoded case, write the label map as raw `u8` to
//!    `<scratch>/<job>.u8` (temp file + rename), answer `Done` or `Failed`.
//!
//! A worker whose parent dies gets SIGKILL (`PR_SET_PDEATHSIG`, set by the supervisor's
//! spawner thread) and in any case sees stdin close.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::infer::{InferError, Model};
use crate::pool::protocol::{
    self, CaseErrorKind, FatalKind, FromWorker, Init, Probe, ProbeOutcome, ProbeReport, ToWorker,
    PROTO_FD, PROTO_VERSION,
};
use crate::sandbox;
use crate::volume::{self, ImageVolume};

/// The worker cannot talk to its supervisor.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Not started by the pool (no protocol descriptor).
    #[error("evald worker is internal: it is started by the worker pool, with its protocol on fd {PROTO_FD}")]
    NotSupervised,
    /// The protocol broke before the worker was ready.
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::FrameError),
}

type Out = Arc<Mutex<File>>;

fn send(out: &Out, msg: &FromWorker) {
    let mut f = out.lock().expect("protocol writer lock");
    if protocol::write_frame(&mut *f, msg).is_err() {
        // The supervisor is gone: nothing left to do.
        exit_now(0);
    }
}

fn exit_now(code: i32) -> ! {
    // No destructors, no atexit handlers: libtorch's static teardown can hang while its
    // threads are busy, and there is nothing to flush.
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

enum Work {
    Case {
        id: u64,
        case: String,
        image: Result<ImageVolume, String>,
        decode_secs: f64,
    },
    Probe(Probe),
}

/// Run the worker until told to stop. Returns the process exit code.
///
/// # Errors
/// [`WorkerError`] when the process was not started by the pool or the protocol breaks
/// before the worker is ready.
pub fn main(slot: usize) -> Result<i32, WorkerError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(PROTO_FD, libc::F_GETFD) } < 0 {
        return Err(WorkerError::NotSupervised);
    }
    // SAFETY: fd 3 is open (checked above) and owned by nobody else in this process.
    let out_file = unsafe { File::from_raw_fd(PROTO_FD) };
    // SAFETY: as above; the protocol fd must not leak into anything exec'ed.
    unsafe { libc::fcntl(PROTO_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let out: Out = Arc::new(Mutex::new(out_file));
    // SAFETY: fd 0 is the request pipe; this File becomes its only user.
    let mut input = BufReader::new(unsafe { File::from_raw_fd(0) });

    send(
        &out,
        &FromWorker::Hello {
            proto: PROTO_VERSION,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    );
    let init = match protocol::read_frame::<_, ToWorker>(&mut input) {
        Ok(ToWorker::Init(i)) => i,
        Ok(ToWorker::Shutdown) | Err(protocol::FrameError::Closed) => return Ok(0),
        Ok(other) => {
            fatal(
                &out,
                FatalKind::Protocol,
                format!("expected init, got {other:?}"),
            );
        }
        Err(e) => return Err(e.into()),
    };
    if init.proto != PROTO_VERSION {
        fatal(
            &out,
            FatalKind::Protocol,
            format!(
                "supervisor speaks protocol {}, this worker {PROTO_VERSION}",
                init.proto
            ),
        );
    }
    let gpu = crate::infer::device::DeviceName::parse(&init.device).is_some_and(|d| d.is_gpu());
    if gpu {
        // Conservative GPU path: let the driver open what it needs before the sandbox,
        // through the format's own runtime.
        if let Err(e) = init.format.check_device(&init.device) {
            fatal(&out, FatalKind::Device, e.to_string());
        }
    }
    // What the runtime needs besides the model, the images and the scratch folder.
    let needs = init.format.sandbox_needs(gpu);
    let mut read_write = vec![init.scratch.clone()];
    read_write.extend(needs.read_write);
    let mut read_only = init.read_only.clone();
    read_only.extend(needs.read_only);
    let plan = sandbox::Plan {
        policy: init.sandbox,
        read_only,
        read_write,
        devices: needs.devices,
    };
    let report = match sandbox::apply(&plan) {
        Ok(r) => r,
        Err(e) => fatal(&out, FatalKind::Sandbox, e.to_string()),
    };
    tracing::info!(slot, pid = std::process::id(), "sandbox: {report}");

    // Threads from here on inherit the sandbox.
    let threads = init.threads.max(1);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    // Only this format's runtime's pool: an ONNX worker never starts libtorch's.
    init.format.set_threads(threads);
    start_heartbeat(&out, Duration::from_millis(init.heartbeat_ms.max(50)));
    let work_rx = start_reader_and_decoder(input);

    let t0 = Instant::now();
    let model = match &init.model {
        Some(path) => {
            let loaded = match &init.model_sha256 {
                Some(sha) => {
                    Model::load_verified_as(init.format, path, sha, &init.device, init.spec.clone())
                }
                None => Model::load_as(init.format, path, &init.device, init.spec.clone()),
            };
            match loaded {
                Ok(m) => Some(m),
                Err(InferError::Device(e)) => fatal(&out, FatalKind::Device, e.to_string()),
                // evald's installation, not the vendor's model.
                Err(e @ InferError::RuntimeUnavailable { .. }) => {
                    fatal(&out, FatalKind::Device, e.to_string())
                }
                Err(e @ InferError::Changed { .. }) => {
                    fatal(&out, FatalKind::Integrity, e.to_string())
                }
                Err(e) => fatal(&out, FatalKind::Load, e.to_string()),
            }
        }
        None => None,
    };
    send(
        &out,
        &FromWorker::Ready {
            device: init.device.clone(),
            load_secs: t0.elapsed().as_secs_f64(),
            sandbox: report,
        },
    );
    serve(&init, model.as_ref(), &work_rx, &out);
    Ok(0)
}

fn fatal(out: &Out, kind: FatalKind, message: String) -> ! {
    let message = crate::logging::bounded(&message, crate::logging::MAX_QUOTED).into_owned();
    tracing::error!("{message}");
    send(out, &FromWorker::Fatal { kind, message });
    exit_now(2)
}

fn start_heartbeat(out: &Out, period: Duration) {
    let out = Arc::clone(out);
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            send(&out, &FromWorker::Heartbeat);
        })
        .expect("spawn heartbeat thread");
}

/// Reader: requests -> decoder; EOF or Shutdown ends the process. Decoder: reads each
/// case's image, hands it over when the main thread is ready for it (rendezvous), so at
/// most one decoded case waits while the model runs.
fn start_reader_and_decoder(mut input: BufReader<File>) -> mpsc::Receiver<Work> {
    let (req_tx, req_rx) = mpsc::channel::<ToWorker>();
    std::thread::Builder::new()
        .name("requests".into())
        .spawn(move || loop {
            match protocol::read_frame::<_, ToWorker>(&mut input) {
                Ok(ToWorker::Shutdown) | Err(_) => exit_now(0),
                Ok(msg) => {
                    if req_tx.send(msg).is_err() {
                        exit_now(0);
                    }
                }
            }
        })
        .expect("spawn reader thread");
    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(0);
    std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || {
            for msg in req_rx {
                let work = match msg {
                    ToWorker::Case { id, case, image } => {
                        let t = Instant::now();
                        let image = volume::read_image(&image).map_err(|e| e.to_string());
                        Work::Case {
                            id,
                            case,
                            image,
                            decode_secs: t.elapsed().as_secs_f64(),
                        }
                    }
                    ToWorker::Probe(p) => Work::Probe(p),
                    ToWorker::Init(_) | ToWorker::Shutdown => continue,
                };
                if work_tx.send(work).is_err() {
                    break;
                }
            }
        })
        .expect("spawn decode thread");
    work_rx
}

fn serve(init: &Init, model: Option<&Model>, work: &mpsc::Receiver<Work>, out: &Out) {
    for w in work {
        match w {
            Work::Probe(p) => send(out, &FromWorker::ProbeResult(run_probe(&p))),
            Work::Case {
                id,
                case,
                image,
                decode_secs,
            } => {
                let msg = match predict_case(init, model, id, image) {
                    Ok((voxels, stats)) => {
                        tracing::debug!(case, forward = stats.forward_secs, "case done");
                        FromWorker::Done {
                            id,
                            voxels,
                            stats,
                            decode_secs,
                        }
                    }
                    Err((kind, message)) => {
                        let message = crate::logging::bounded(&message, crate::logging::MAX_QUOTED)
                            .into_owned();
                        tracing::warn!(case, "case failed: {message}");
                        FromWorker::Failed { id, kind, message }
                    }
                };
                send(out, &msg);
            }
        }
    }
}

fn predict_case(
    init: &Init,
    model: Option<&Model>,
    id: u64,
    image: Result<ImageVolume, String>,
) -> Result<(u64, crate::infer::PredictStats), (CaseErrorKind, String)> {
    let image = image.map_err(|e| (CaseErrorKind::Read, e))?;
    let model = model.ok_or((
        CaseErrorKind::Model,
        "this worker has no model (self-check)".to_string(),
    ))?;
    let (labels, stats) = model.predict(&image).map_err(|e| {
        let kind = match &e {
            InferError::Forward { .. }
            | InferError::Load { .. }
            | InferError::Changed { .. }
            | InferError::File(_)
            | InferError::Input(_) => CaseErrorKind::Model,
            InferError::BadOutput(_) => CaseErrorKind::BadOutput,
            InferError::OutOfMemory { .. } => CaseErrorKind::OutOfMemory,
            InferError::Device(_)
            | InferError::Torch(_)
            | InferError::RuntimeUnavailable { .. } => CaseErrorKind::Torch,
        };
        (kind, e.to_string())
    })?;
    drop(image);
    let path = protocol::mask_path(&init.scratch, id);
    write_mask(&path, &labels.data).map_err(|e| {
        (
            CaseErrorKind::Write,
            format!("cannot write the mask {}: {e}", path.display()),
        )
    })?;
    Ok((labels.data.len() as u64, stats))
}

fn write_mask(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn outcome(what: String, r: std::io::Result<()>) -> ProbeOutcome {
    match r {
        Ok(()) => ProbeOutcome {
            what,
            allowed: true,
            detail: "ok".into(),
        },
        Err(e) => ProbeOutcome {
            what,
            allowed: false,
            detail: e.to_string(),
        },
    }
}

/// Try what the sandbox must forbid (and what it must allow), from inside.
fn run_probe(p: &Probe) -> ProbeReport {
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let tcp_socket = outcome(
        "socket(AF_INET, SOCK_STREAM)".into(),
        if fd >= 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        },
    );
    let tcp_connect = if fd >= 0 {
        let r = connect_v4(fd, &p.tcp_connect);
        // SAFETY: closing the socket made above.
        unsafe { libc::close(fd) };
        outcome(format!("connect({})", p.tcp_connect), r)
    } else {
        ProbeOutcome {
            what: format!("connect({})", p.tcp_connect),
            allowed: false,
            detail: "no socket".into(),
        }
    };
    let reads = p
        .read_files
        .iter()
        .map(|f| outcome(f.display().to_string(), std::fs::read(f).map(|_| ())))
        .collect();
    let lists = p
        .list_dirs
        .iter()
        .map(|d| {
            outcome(
                d.display().to_string(),
                std::fs::read_dir(d).and_then(|mut it| it.next().transpose().map(|_| ())),
            )
        })
        .collect();
    let writes = p
        .write_dirs
        .iter()
        .map(|d| {
            let f: PathBuf = d.join(".evald-probe");
            let r = std::fs::write(&f, b"probe");
            if r.is_ok() {
                let _ = std::fs::remove_file(&f);
            }
            outcome(d.display().to_string(), r)
        })
        .collect();
    ProbeReport {
        tcp_socket,
        tcp_connect,
        reads,
        lists,
        writes,
    }
}

fn connect_v4(fd: i32, addr: &str) -> std::io::Result<()> {
    let a: std::net::SocketAddrV4 = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sa is a valid sockaddr_in for the length given.
    let r = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
