//! The supervisor <-> worker wire protocol: messages and their framing.
//!
//! Frames are a 4-byte big-endian length followed by that many bytes of JSON (one message).
//! JSON rather than a binary format because the messages are small and rare (a few per
//! case) and a human can read them in a hex dump; volumes never travel in frames: the
//! worker gets image *paths* and returns its label map as a raw `u8` file in its scratch
//! folder, at a path the supervisor chooses (see [`mask_path`]).
//!
//! Channels: the supervisor writes to the worker's stdin; the worker writes to fd
//! [`PROTO_FD`], which the supervisor set up as a copy of the worker's original stdout
//! pipe before `exec`, while the worker's fd 1 is pointed at its stderr. So whatever
//! libtorch or CUDA print on stdout lands in the log and can never corrupt a frame.
//!
//! Sequence: worker `Hello` -> supervisor `Init` -> worker applies its sandbox, loads the
//! model -> `Ready` (or `Fatal`) -> any number of `Case` / `Probe` requests, answered in
//! order by `Done` / `Failed` / `ProbeResult`, with `Heartbeat`s throughout. The worker
//! exits on `Shutdown` or when its stdin closes.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::infer::{InferSpec, ModelFormat, PredictStats};

/// Bumped on any incompatible change; both ends refuse a mismatch.
pub const PROTO_VERSION: u32 = 3;

/// Largest frame either side accepts (messages are small; anything bigger is a bug or an
/// attack).
pub const MAX_FRAME: usize = 1 << 20;

/// The worker's protocol output descriptor (a copy of its original stdout pipe).
pub const PROTO_FD: i32 = 3;

pub use crate::sandbox::Policy;

/// Everything a worker needs before it can take cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Init {
    /// Must equal [`PROTO_VERSION`].
    pub proto: u32,
    /// Worker slot (for log lines).
    pub slot: usize,
    /// The model's format: which runtime loads it (and what its sandbox grants).
    pub format: ModelFormat,
    /// The model; `None` for a self-check worker that only answers probes.
    pub model: Option<PathBuf>,
    /// sha256 (hex) the model's bytes must have; the worker loads nothing else.
    pub model_sha256: Option<String>,
    /// Inference settings.
    pub spec: InferSpec,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// libtorch intra-op threads (and decode threads).
    pub threads: usize,
    /// Files and folders the worker may read (model, images); nothing else of the data.
    pub read_only: Vec<PathBuf>,
    /// The worker's own scratch folder (read-write; masks are written here).
    pub scratch: PathBuf,
    /// Sandbox policy.
    pub sandbox: Policy,
    /// Heartbeat period in milliseconds.
    pub heartbeat_ms: u64,
}

/// A request to probe the sandbox from inside (test-only `worker-selfcheck`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Try to open a TCP socket and connect to this address (`127.0.0.1:port`).
    pub tcp_connect: String,
    /// Try to read each of these files.
    pub read_files: Vec<PathBuf>,
    /// Try to list each of these folders.
    pub list_dirs: Vec<PathBuf>,
    /// Try to create a file in each of these folders.
    pub write_dirs: Vec<PathBuf>,
}

/// Supervisor -> worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Configuration (answered by `Ready` or `Fatal`).
    Init(Init),
    /// Predict one case (answered, in order, by `Done` or `Failed`).
    Case {
        /// Job id (names the mask file).
        id: u64,
        /// Case id, for log lines.
        case: String,
        /// The CT image file.
        image: PathBuf,
    },
    /// Probe the sandbox (answered by `ProbeResult`).
    Probe(Probe),
    /// Exit now.
    Shutdown,
}

/// Why a worker cannot work at all (deterministic: restarting will not help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FatalKind {
    /// The sandbox policy is `required` and a layer is missing.
    Sandbox,
    /// The model cannot be loaded.
    Load,
    /// The device is unusable.
    Device,
    /// The supervisor spoke another protocol version or sent nonsense.
    Protocol,
    /// The model file's bytes are not those recorded for the evaluation (evald's own
    /// snapshot was altered): not the vendor's fault, nothing is run.
    Integrity,
}

/// Why one case failed inside a worker that is still healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseErrorKind {
    /// The image could not be read.
    Read,
    /// The model raised.
    Model,
    /// The model's output is unusable (shape, type, NaN).
    BadOutput,
    /// CUDA out of memory even at batch 1.
    OutOfMemory,
    /// Another libtorch failure (device copies, conversions): may be transient.
    Torch,
    /// The mask could not be written to scratch.
    Write,
}

/// What a probe found: `allowed` is what happened, `detail` the OS's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    /// What was tried.
    pub what: String,
    /// Whether it worked.
    pub allowed: bool,
    /// OS error or a short description.
    pub detail: String,
}

/// Results of a [`Probe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// `socket(AF_INET, SOCK_STREAM)`.
    pub tcp_socket: ProbeOutcome,
    /// `connect()` to the address asked (if the socket could be made at all).
    pub tcp_connect: ProbeOutcome,
    /// One per file asked.
    pub reads: Vec<ProbeOutcome>,
    /// One per folder asked.
    pub lists: Vec<ProbeOutcome>,
    /// One per folder asked.
    pub writes: Vec<ProbeOutcome>,
}

/// Worker -> supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// First frame, before anything else.
    Hello {
        /// The worker's [`PROTO_VERSION`].
        proto: u32,
        /// Its pid.
        pid: u32,
        /// evald version of the worker binary.
        version: String,
    },
    /// Sandbox in force, model loaded: ready for cases.
    Ready {
        /// Device in use.
        device: String,
        /// Seconds to load the model.
        load_secs: f64,
        /// What the sandbox enforces, in words (logged by the supervisor).
        sandbox: crate::sandbox::Report,
    },
    /// The worker cannot work; it exits after sending this.
    Fatal {
        /// Class of problem.
        kind: FatalKind,
        /// What and why.
        message: String,
    },
    /// Still alive (sent every `heartbeat_ms`, whatever the main thread is doing).
    Heartbeat,
    /// A case is done: the mask is at [`mask_path`]`(scratch, id)`.
    Done {
        /// Job id.
        id: u64,
        /// Voxels written.
        voxels: u64,
        /// Inference timings.
        stats: PredictStats,
        /// Seconds spent reading and decoding the image (overlapped with the previous
        /// case's forward when prefetched).
        decode_secs: f64,
    },
    /// A case failed; the worker goes on.
    Failed {
        /// Job id.
        id: u64,
        /// Class of problem.
        kind: CaseErrorKind,
        /// The error, one line.
        message: String,
    },
    /// Answer to a [`Probe`].
    ProbeResult(ProbeReport),
}

/// Where a worker writes the mask of job `id` (the supervisor computes it too, and never
/// takes a path from a worker).
pub fn mask_path(scratch: &Path, id: u64) -> PathBuf {
    scratch.join(format!("{id}.u8"))
}

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The other end closed the channel (clean EOF between frames).
    #[error("channel closed")]
    Closed,
    /// I/O error on the pipe.
    #[error("pipe: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame (in its length prefix or its body).
    #[error("frame cut short: the stream ended after {got} of its {want} bytes")]
    Truncated {
        /// Bytes the frame should have had, prefix included (4 when the prefix itself
        /// was cut).
        want: usize,
        /// Bytes that came.
        got: usize,
    },
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    /// Not a message of this protocol.
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
}

impl FrameError {
    /// Whether the other end broke the protocol (a frame too long, or not a message of
    /// this protocol), as opposed to the channel ending: a worker doing that is killed at
    /// once, whatever it does next. A [`FrameError::Truncated`] frame is an ending.
    pub fn is_violation(&self) -> bool {
        matches!(self, FrameError::TooLong(_) | FrameError::Decode(_))
    }
}

/// Write one message as a frame (one `write_all`, then flush).
///
/// # Errors
/// [`FrameError::Io`] when the pipe is gone.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLong(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Read one frame and decode it.
///
/// # Errors
/// [`FrameError::Closed`] on EOF at a frame boundary, [`FrameError::Truncated`] on EOF
/// inside one, [`FrameError::TooLong`], [`FrameError::Decode`], or I/O errors.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated { want: 4, got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLong(n));
    }
    let mut body = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut body[got..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    want: 4 + n,
                    got: 4 + got,
                })
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_eof_is_clean() {
        let mut buf = Vec::new();
        let a = FromWorker::Hello {
            proto: PROTO_VERSION,
            pid: 42,
            version: "x".into(),
        };
        let b = FromWorker::Failed {
            id: 7,
            kind: CaseErrorKind::Model,
            message: "boom".into(),
        };
        write_frame(&mut buf, &a).unwrap();
        write_frame(&mut buf, &b).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, FromWorker>(&mut r).unwrap(), a);
        assert_eq!(read_frame::<_, FromWorker>(&mut r).unwrap(), b);
        assert!(matches!(
            read_frame::<_, FromWorker>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut r = &(u32::MAX).to_be_bytes()[..];
        assert!(matches!(
            read_frame::<_, FromWorker>(&mut r),
            Err(FrameError::TooLong(_))
        ));
        let mut r = &[0u8, 0, 0, 10, b'{'][..];
        assert!(matches!(
            read_frame::<_, FromWorker>(&mut r),
            Err(FrameError::Truncated { want: 14, got: 5 })
        ));
        let mut r = &[0u8, 0][..];
        assert!(matches!(
            read_frame::<_, FromWorker>(&mut r),
            Err(FrameError::Truncated { want: 4, got: 2 })
        ));
        let mut r = &[0u8, 0, 0, 2, b'{', b'}'][..];
        assert!(matches!(
            read_frame::<_, FromWorker>(&mut r),
            Err(FrameError::Decode(_))
        ));
        // Which of them mean the worker broke the protocol (killed at once) rather than
        // its channel ending (reaped, its exit status reported).
        assert!(FrameError::TooLong(MAX_FRAME + 1).is_violation());
        assert!(!FrameError::Truncated { want: 14, got: 5 }.is_violation());
        assert!(!FrameError::Closed.is_violation());
    }
}
