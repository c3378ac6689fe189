//! The ONNX runtime: a `.onnx` graph run by ONNX Runtime (the `ort` crate, its C library
//! loaded at run time), on the CPU execution provider or CUDA's. It owns everything
//! ORT-specific: finding and loading `libonnxruntime.so` (and what the worker's sandbox must
//! grant for it), the session and its threads, checking the graph's one input and one
//! output against the [`InferSpec`] at load, the forward call, ORT's error messages (CUDA
//! out-of-memory recognised by message), and, on the CPU, the output checks, argmax and the
//! 3D sliding window's accumulation, on the tiles, weights and HU window of
//! [`super::tiling`] exactly as the TorchScript runtime uses them: 2D slices in batches
//! padded at the bottom/right to `pad_multiple`, 3D windows blended as `sum(w * y)` (the
//! division by `sum(w) > 0` does not change the argmax and is skipped), `labels` outputs
//! blended as one-hot votes.
//!
//! Where the library comes from, first found wins: `ORT_DYLIB_PATH` (the `ort` crate's own
//! variable; when set it must be right, nothing else is tried), then
//! `<binary>/../lib/evald/onnxruntime/libonnxruntime.so` (what `scripts/install.sh` ships
//! beside an installed binary), then the build checkout's `.onnxruntime/lib/` (what
//! `scripts/setup-onnxruntime.sh`, run by `make setup`, installs), so neither the tests nor
//! `target/*/evald` need any variable.
//!
//! Threads: ONNX Runtime and libtorch each keep a thread pool and slow each other down when
//! both are busy in one process, so a worker runs one format only, and an ONNX worker never
//! starts libtorch's pool: [`set_intra_threads`] (called by the worker with the pool's
//! per-worker thread count, through [`ModelFormat::set_threads`]) sizes ORT's intra-op pool
//! instead.
//!
//! GPU: `cuda:N` registers ORT's CUDA execution provider (which must be present beside the
//! library: `scripts/setup-onnxruntime.sh --gpu`) and fails the load when it cannot be
//! registered, instead of ORT's default of falling back to the CPU. Untested: the machines
//! this was written on have no GPU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::device::{DeviceError, DeviceName};
use super::{
    halve_on_oom, tiling, InferError, InferSpec, InputKind, ModelFormat, OutputKind, PredictStats,
    Runtime, SandboxNeeds,
};
use crate::volume::{ImageVolume, LabelVolume, Volume};

/// The variable naming the ONNX Runtime library to load instead of the defaults.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The library's file name (a link to the versioned file in the wheel's layout).
pub const LIBRARY: &str = "libonnxruntime.so";

/// Where `scripts/install.sh` puts the library, relative to the installed binary's folder.
pub const INSTALLED_DIR: &str = "../lib/evald/onnxruntime";

/// The checkout's library, installed by `scripts/setup-onnxruntime.sh`.
const CHECKOUT_LIBRARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.onnxruntime/lib/libonnxruntime.so"
);

/// ORT's CUDA execution provider, which ORT loads from its own folder.
const CUDA_PROVIDER: &str = "libonnxruntime_providers_cuda.so";

/// Intra-op threads for sessions created from now on (0: ORT's default, one per core).
static INTRA_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Size ONNX Runtime's intra-op thread pool for the sessions loaded after this call (the
/// worker passes the pool's per-worker thread count; 0 keeps ORT's default).
pub fn set_intra_threads(n: usize) {
    INTRA_THREADS.store(n, Ordering::Relaxed);
}

/// Where the ONNX Runtime library is looked for, in order (see the module doc).
pub fn library_candidates() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os(DYLIB_ENV).filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        v.push(dir.join(INSTALLED_DIR).join(LIBRARY));
    }
    v.push(PathBuf::from(CHECKOUT_LIBRARY));
    v
}

/// The ONNX Runtime library this process loads: the first candidate that exists, with its
/// links resolved (so the sandbox grants the folder of the file itself).
///
/// # Errors
/// A message naming every place looked at and how to install it.
pub fn library_path() -> Result<PathBuf, String> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        let candidates = library_candidates();
        candidates
            .iter()
            .find_map(|p| std::fs::canonicalize(p).ok())
            .ok_or_else(|| {
                let tried: Vec<String> =
                    candidates.iter().map(|p| p.display().to_string()).collect();
                format!(
                    "no ONNX Runtime library at {}: run `make setup` (scripts/setup-onnxruntime.sh) \
                     or set {DYLIB_ENV} to a libonnxruntime.so >= 1.{}",
                    tried.join(" or "),
                    ort::MINOR_VERSION
                )
            })
    })
    .clone()
}

/// The version of the ONNX Runtime library (`1.32.0`), as the library reports it, for the
/// report's provenance; `unavailable (why)` when there is none.
pub fn version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| match library_path().and_then(|p| library_version(&p)) {
            Ok(v) => v,
            Err(why) => format!("unavailable ({why})"),
        })
        .clone()
}

fn library_version(path: &Path) -> Result<String, String> {
    // SAFETY: loading ONNX Runtime runs its initialisers, which start no threads and touch
    // nothing of this process; the handle is kept (leaked) so the library stays loaded,
    // as ort keeps its own handle to the same library.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    // SAFETY: OrtGetApiBase is ONNX Runtime's C entry point, with this signature in every
    // release; the symbol is checked to exist.
    let base = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib
            .get(b"OrtGetApiBase")
            .map_err(|e| format!("{} is not ONNX Runtime: {e}", path.display()))?;
        get()
    };
    if base.is_null() {
        return Err(format!("{}: OrtGetApiBase returned null", path.display()));
    }
    // SAFETY: base points to ORT's static OrtApiBase; the version is a static C string.
    let v = unsafe {
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            return Err(format!("{}: no version string", path.display()));
        }
        std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    std::mem::forget(lib);
    Ok(v)
}

/// The process's ONNX Runtime environment, made once: loads the library (checking it
/// implements the API the `ort` crate was built for) before any other `ort` call, since
/// `ort` panics when its first call finds no library.
fn environment() -> Result<&'static Environment, InferError> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path()?;
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        let env = builder
            .with_name("evald")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("{}: cannot create an environment: {e}", path.display()))?;
        // ORT's info level narrates every graph transformation: warnings and errors only
        // reach evald's log (through tracing, with the worker's fields).
        env.set_log_level(ort::logging::LogLevel::Warning);
        Ok(env)
    })
    .as_ref()
    .map_err(|message| InferError::RuntimeUnavailable {
        format: ModelFormat::Onnx,
        message: message.clone(),
    })
}

/// Check a device name for the ONNX runtime: `cpu`, or `cuda:N` when the CUDA execution
/// provider is installed beside the library and the CUDA driver sees device N (asking the
/// driver initialises it, which the worker does before its sandbox). Returns the CUDA
/// index. libtorch is not asked: an ONNX worker leaves it alone.
///
/// # Errors
/// [`DeviceError::Name`] for a malformed name, [`DeviceError::NoCuda`] saying what is
/// missing.
pub fn check_device(name: &str) -> Result<Option<usize>, DeviceError> {
    let index = match DeviceName::parse(name) {
        Some(DeviceName::Cpu) => return Ok(None),
        Some(DeviceName::Cuda(i)) => i,
        None => return Err(DeviceError::Name(name.to_string())),
    };
    let no_cuda = |why: String| DeviceError::NoCuda {
        name: name.to_string(),
        why,
    };
    let lib = library_path().map_err(no_cuda)?;
    let provider = lib.with_file_name(CUDA_PROVIDER);
    if !provider.exists() {
        return Err(no_cuda(format!(
            "the ONNX Runtime at {} is the CPU build (no {CUDA_PROVIDER}): run scripts/setup-onnxruntime.sh --gpu",
            lib.display()
        )));
    }
    let n = cuda_driver_devices().map_err(no_cuda)?;
    if index < n {
        Ok(Some(index))
    } else {
        Err(no_cuda(format!("the CUDA driver sees {n} device(s)")))
    }
}

/// The number of CUDA devices, from the driver itself (`cuInit`, `cuDeviceGetCount`).
fn cuda_driver_devices() -> Result<usize, String> {
    static COUNT: OnceLock<Result<usize, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            // SAFETY: libcuda is NVIDIA's driver library, made to be dlopen'ed; the two
            // entry points have these signatures in every driver API since CUDA 2.
            unsafe {
                let lib = libloading::Library::new("libcuda.so.1")
                    .map_err(|e| format!("no CUDA driver: {e}"))?;
                let init: libloading::Symbol<unsafe extern "C" fn(u32) -> i32> =
                    lib.get(b"cuInit").map_err(|e| e.to_string())?;
                let count: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
                    lib.get(b"cuDeviceGetCount").map_err(|e| e.to_string())?;
                let rc = init(0);
                if rc != 0 {
                    return Err(format!("cuInit failed with CUDA error {rc}"));
                }
                let mut n = 0i32;
                let rc = count(&mut n);
                if rc != 0 {
                    return Err(format!("cuDeviceGetCount failed with CUDA error {rc}"));
                }
                // The driver stays loaded for ORT's CUDA provider.
                std::mem::forget(lib);
                Ok(usize::try_from(n).unwrap_or(0))
            }
        })
        .clone()
}

/// What the ONNX runtime needs inside the worker's sandbox: the library's folder (it
/// `dlopen`s its execution providers from there) and, on a GPU, what CUDA needs, as for
/// libtorch (the CUDA folders, the Python site folder whose `nvidia/*` wheels hold the
/// CUDA 13 libraries ORT's CUDA provider loads, `/dev/shm`, `/dev/nvidia*`).
pub fn sandbox_needs(gpu: bool) -> SandboxNeeds {
    let mut n = if gpu {
        super::torchscript::sandbox_needs(true)
    } else {
        SandboxNeeds::default()
    };
    if let Ok(lib) = library_path() {
        if let Some(dir) = lib.parent() {
            n.read_only.push(dir.to_path_buf());
        }
    }
    // The folders of the candidates as written (links into the real folder).
    for c in library_candidates() {
        if let Some(dir) = c.parent().filter(|d| d.exists()) {
            if !n.read_only.iter().any(|p| p == dir) {
                n.read_only.push(dir.to_path_buf());
            }
        }
    }
    n
}

/// The first line of an ORT message, bounded (some carry whole graphs).
fn first_line(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    let line = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(500).collect()
}

fn is_oom(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("failed to allocate memory")
        || m.contains("cudaerrormemoryallocation")
}

/// A dimension as the graph declares it: fixed, or set per call (`-1`, or a name).
fn fixed(d: i64) -> Option<usize> {
    usize::try_from(d).ok().filter(|&d| d > 0)
}

fn dims_text(shape: &[i64], symbols: &[String]) -> String {
    let d: Vec<String> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match fixed(d) {
            Some(d) => d.to_string(),
            None => symbols
                .get(i)
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| "?".into()),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

/// The model's output of one forward call, on the CPU, as `f32` whatever its type
/// (integers up to 2^24 are exact, and any larger one is out of the label range anyway).
struct Output {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// Declared as a floating-point type.
    float: bool,
    ty: TensorElementType,
}

/// A loaded ONNX graph bound to one device.
#[derive(Debug)]
pub struct Onnx {
    // `Session::run` takes `&mut`: ORT's allocators are not all thread-safe.
    session: Mutex<Session>,
    input: String,
    /// The input's declared shape (`-1` where it is set per call) and its dimension names.
    input_shape: Vec<i64>,
    input_symbols: Vec<String>,
    /// The batch the graph is fixed to, if it is (every call is padded to it).
    fixed_batch: Option<usize>,
    spec: InferSpec,
    path: PathBuf,
    gpu: bool,
}

impl Onnx {
    /// Load the ONNX file `path` onto `device` (`cpu`, `cuda:N`).
    ///
    /// # Errors
    /// [`InferError::File`] for an unreadable file, otherwise as [`Onnx::load_bytes`].
    pub fn load(path: &Path, device: &str, spec: InferSpec) -> Result<Self, InferError> {
        check_device(device)?;
        let bytes = crate::files::read_bounded(path, super::MAX_MODEL_BYTES)?;
        Self::load_bytes(&bytes, path, device, spec)
    }

    /// Load these bytes (read, and hash-checked, by the caller from `path`) onto `device`,
    /// and check the graph's input and output against `spec`.
    ///
    /// # Errors
    /// [`InferError::Device`] for an unusable device, [`InferError::RuntimeUnavailable`]
    /// when ONNX Runtime is not installed, [`InferError::Load`] for bytes that are not an
    /// ONNX model ORT can run, or a graph whose input or output evald cannot feed or read
    /// (the message names the graph's shape and what evald feeds).
    pub fn load_bytes(
        bytes: &[u8],
        path: &Path,
        device: &str,
        spec: InferSpec,
    ) -> Result<Self, InferError> {
        let cuda = check_device(device)?;
        let env = environment()?;
        let load_error = |message: String| InferError::Load {
            path: path.to_path_buf(),
            format: ModelFormat::Onnx,
            device: device.to_string(),
            message,
        };
        let mut builder = Session::builder(env).map_err(|e| load_error(first_line(&e)))?;
        let threads = INTRA_THREADS.load(Ordering::Relaxed);
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| load_error(first_line(&e)))?;
        }
        if let Some(i) = cuda {
            let id = i32::try_from(i).map_err(|_| load_error(format!("CUDA device {i}")))?;
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(id)
                    .build()
                    .error_on_failure()])
                .map_err(|e| load_error(format!("CUDA execution provider: {}", first_line(&e))))?;
        }
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| load_error(first_line(&e)))?;
        let io = check_io(&session, &spec).map_err(load_error)?;
        Ok(Onnx {
            session: Mutex::new(session),
            input: io.name,
            input_shape: io.shape,
            input_symbols: io.symbols,
            fixed_batch: io.fixed_batch,
            spec,
            path: path.to_path_buf(),
            gpu: cuda.is_some(),
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The spec in use.
    pub fn spec(&self) -> &InferSpec {
        &self.spec
    }

    /// One forward call on a C-order `f32` input of `shape`: the model's output, its shape
    /// and its values as `f32`, with nothing checked (what the parity tests compare with
    /// PyTorch's own outputs).
    ///
    /// # Errors
    /// [`InferError::OutOfMemory`] for CUDA out-of-memory, [`InferError::Forward`] when the
    /// model raises (a shape it refuses, an operator that fails), [`InferError::BadOutput`]
    /// when the output is not a numeric tensor.
    pub fn forward(
        &self,
        input: &[f32],
        shape: &[usize],
    ) -> Result<(Vec<usize>, Vec<f32>), InferError> {
        let mut stats = PredictStats::default();
        let y = self.run(input, shape, &mut stats)?;
        Ok((y.shape, y.data))
    }

    fn run(
        &self,
        input: &[f32],
        shape: &[usize],
        stats: &mut PredictStats,
    ) -> Result<Output, InferError> {
        let input_shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let forward_error = |message: String| InferError::Forward {
            input_shape: input_shape.clone(),
            message,
        };
        let x = TensorRef::from_array_view((shape.to_vec(), input))
            .map_err(|e| forward_error(first_line(&e)))?;
        // A panic elsewhere cannot leave the session half-run: a poisoned lock is as good.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let t = Instant::now();
        let outputs = session.run(ort::inputs![x]).map_err(|e| {
            let message = first_line(&e);
            if self.gpu && is_oom(&message) {
                InferError::OutOfMemory {
                    batch: shape.first().copied().unwrap_or(0),
                    message,
                }
            } else {
                forward_error(message)
            }
        })?;
        stats.forward_secs += t.elapsed().as_secs_f64();
        stats.forward_calls += 1;
        let y = outputs
            .values()
            .next()
            .ok_or_else(|| InferError::BadOutput("the model returned no output".into()))?;
        extract(&y)
    }

    /// Refuse, before the call, slices that a graph with fixed H or W cannot take (known
    /// only per case), with both shapes in the message.
    fn check_slices(&self, ph: usize, pw: usize, ny: usize, nx: usize) -> Result<(), InferError> {
        let want = [self.input_shape.get(2), self.input_shape.get(3)];
        let ok = want
            .iter()
            .zip([ph, pw])
            .all(|(d, got)| d.and_then(|&d| fixed(d)).is_none_or(|d| d == got));
        if ok {
            return Ok(());
        }
        Err(InferError::Forward {
            input_shape: vec![
                self.fixed_batch.unwrap_or(self.spec.batch_size) as i64,
                1,
                ph as i64,
                pw as i64,
            ],
            message: format!(
                "the model's input '{}' is fixed to {}, but this case's slices are {ny} x {nx} (H x W), \
                 fed as {ph} x {pw} (pad_multiple {}): export with dynamic H and W (dynamic_shapes)",
                self.input,
                dims_text(&self.input_shape, &self.input_symbols),
                self.spec.pad_multiple
            ),
        })
    }

    fn predict_2d(
        &self,
        image: &ImageVolume,
        stats: &mut PredictStats,
    ) -> Result<Vec<u8>, InferError> {
        let [nx, ny, nz] = image.geom.dims;
        let m = self.spec.pad_multiple.max(1);
        let (ph, pw) = (ny.div_ceil(m) * m, nx.div_ceil(m) * m);
        self.check_slices(ph, pw, ny, nx)?;
        let sl = nx * ny;
        let mut out = vec![0u8; sl * nz];
        let mut batch = self.spec.batch_size.max(1);
        let mut z0 = 0;
        while z0 < nz {
            let b = batch.min(nz - z0);
            // A graph fixed to a batch is fed that many slices every time (zero slices
            // after the last), and its extra outputs are dropped.
            let feed = self.fixed_batch.unwrap_or(b).max(b);
            let mut buf = tiling::windowed_slices(image, self.spec.window, z0, b, ph, pw);
            buf.resize(feed * ph * pw, 0.0);
            match self.run(&buf, &[feed, 1, ph, pw], stats) {
                Ok(y) => {
                    let labels = to_labels(&y, &[feed, ph, pw], self.spec.output)?;
                    tiling::unpad_slices(&labels, b, [ph, pw], [ny, nx], z0, &mut out);
                    z0 += b;
                }
                Err(e) => {
                    if self.fixed_batch.is_none() && halve_on_oom(&e, &mut batch) {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        stats.batch_used = batch;
        Ok(out)
    }

    fn predict_3d(
        &self,
        image: &ImageVolume,
        stats: &mut PredictStats,
    ) -> Result<Vec<u8>, InferError> {
        let spec = &self.spec;
        let [nx, ny, nz] = image.geom.dims;
        let patch = spec.patch_size;
        let padded = tiling::padded([nz, ny, nx], patch);
        let vol = tiling::windowed_padded(image, spec.window, padded);
        let w = tiling::gaussian(patch);
        let windows = tiling::tiles(padded, patch, spec.overlap);
        let pv: usize = patch.iter().product();
        let nv: usize = padded.iter().product();
        let mut acc: Vec<f32> = Vec::new();
        let mut channels = 0;
        let mut batch = spec.batch_size.max(1);
        let mut i = 0;
        while i < windows.len() {
            let n = batch.min(windows.len() - i);
            let feed = self.fixed_batch.unwrap_or(n).max(n);
            let mut x = vec![0f32; feed * pv];
            for (j, s) in windows[i..i + n].iter().enumerate() {
                crop(&vol, padded, *s, patch, &mut x[j * pv..(j + 1) * pv]);
            }
            let y = match self.run(&x, &[feed, 1, patch[0], patch[1], patch[2]], stats) {
                Ok(y) => y,
                Err(e) => {
                    if self.fixed_batch.is_none() && halve_on_oom(&e, &mut batch) {
                        continue;
                    }
                    return Err(e);
                }
            };
            let want = [feed, patch[0], patch[1], patch[2]];
            // Per window, scores [C, D, H, W] to blend: the raw outputs, or one-hot votes.
            let (c, scores) = if spec.output == OutputKind::Labels {
                let labels = to_labels(&y, &want, spec.output)?;
                let c = spec.num_classes.max(2);
                if let Some(&l) = labels.iter().find(|&&l| usize::from(l) >= c) {
                    return Err(InferError::BadOutput(format!(
                        "label {l} is not one of the task's {c} classes (0..{c})"
                    )));
                }
                let mut s = vec![0f32; feed * c * pv];
                for (j, lab) in labels.chunks_exact(pv).enumerate() {
                    for (v, &l) in lab.iter().enumerate() {
                        s[(j * c + usize::from(l)) * pv + v] = 1.0;
                    }
                }
                (c, s)
            } else {
                // Validates shape and finiteness; the labels themselves are not needed.
                to_labels(&y, &want, spec.output)?;
                (y.shape[1], y.data)
            };
            if c == 1 {
                return Err(InferError::BadOutput(
                    "single-channel 3D outputs are not supported; return [B, 2, D, H, W] (background, foreground)".into(),
                ));
            }
            if acc.is_empty() {
                channels = c;
                acc = vec![0f32; c * nv];
            } else if c != channels {
                return Err(InferError::BadOutput(format!(
                    "channel count changed between windows ({channels} then {c})"
                )));
            }
            for (j, s) in windows[i..i + n].iter().enumerate() {
                for ch in 0..c {
                    let src = &scores[(j * c + ch) * pv..(j * c + ch + 1) * pv];
                    let dst = &mut acc[ch * nv..(ch + 1) * nv];
                    blend(dst, padded, *s, patch, src, &w);
                }
            }
            i += n;
        }
        stats.batch_used = batch;
        if acc.is_empty() {
            return Err(InferError::BadOutput("no window was predicted".into()));
        }
        // Argmax over the channels on the image's part of the padded grid (first maximum
        // wins, as torch.argmax).
        let mut out = vec![0u8; nx * ny * nz];
        for z in 0..nz {
            for yy in 0..ny {
                for xx in 0..nx {
                    let v = (z * padded[1] + yy) * padded[2] + xx;
                    let mut best = 0;
                    for ch in 1..channels {
                        if acc[ch * nv + v] > acc[best * nv + v] {
                            best = ch;
                        }
                    }
                    out[(z * ny + yy) * nx + xx] = best as u8;
                }
            }
        }
        Ok(out)
    }
}

impl Runtime for Onnx {
    fn predict(&self, image: &ImageVolume) -> Result<(LabelVolume, PredictStats), InferError> {
        let t0 = Instant::now();
        let mut stats = PredictStats::default();
        let data = match self.spec.input {
            InputKind::Slices2d => self.predict_2d(image, &mut stats)?,
            InputKind::Volume3d => self.predict_3d(image, &mut stats)?,
        };
        stats.total_secs = t0.elapsed().as_secs_f64();
        Ok((
            Volume {
                geom: image.geom.clone(),
                data,
            },
            stats,
        ))
    }
}

/// Copy the `patch` at `start` of a C-order `[D, H, W]` volume of size `padded` into `dst`.
fn crop(vol: &[f32], padded: [usize; 3], start: [usize; 3], patch: [usize; 3], dst: &mut [f32]) {
    for d in 0..patch[0] {
        for h in 0..patch[1] {
            let s = ((start[0] + d) * padded[1] + start[1] + h) * padded[2] + start[2];
            let o = (d * patch[1] + h) * patch[2];
            dst[o..o + patch[2]].copy_from_slice(&vol[s..s + patch[2]]);
        }
    }
}

/// `acc[window] += src * w` for one channel of one window.
fn blend(
    acc: &mut [f32],
    padded: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
    src: &[f32],
    w: &[f32],
) {
    for d in 0..patch[0] {
        for h in 0..patch[1] {
            let a = ((start[0] + d) * padded[1] + start[1] + h) * padded[2] + start[2];
            let o = (d * patch[1] + h) * patch[2];
            let row = &mut acc[a..a + patch[2]];
            for ((r, &y), &wt) in row
                .iter_mut()
                .zip(&src[o..o + patch[2]])
                .zip(&w[o..o + patch[2]])
            {
                *r += y * wt;
            }
        }
    }
}

/// The graph's one input, as checked at load.
struct Io {
    name: String,
    shape: Vec<i64>,
    symbols: Vec<String>,
    fixed_batch: Option<usize>,
}

/// Check the graph's inputs and outputs against what evald feeds and reads; a message
/// naming the graph's shapes and what evald would feed otherwise.
fn check_io(session: &Session, spec: &InferSpec) -> Result<Io, String> {
    let (rank, layout) = match spec.input {
        InputKind::Slices2d => (4, "[B, 1, H, W]"),
        InputKind::Volume3d => (5, "[B, 1, D, H, W]"),
    };
    let kind = match spec.input {
        InputKind::Slices2d => "slices2d",
        InputKind::Volume3d => "volume3d",
    };
    let inputs = session.inputs();
    let names = |o: &[ort::value::Outlet]| -> String {
        o.iter()
            .map(|i| format!("'{}'", i.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let [input] = inputs else {
        return Err(format!(
            "the model has {} inputs ({}); evald feeds one: the windowed image as float32 {layout}",
            inputs.len(),
            names(inputs)
        ));
    };
    let name = input.name().to_string();
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = input.dtype()
    else {
        return Err(format!(
            "input '{name}' is a {:?}, not a tensor; evald feeds float32 {layout}",
            input.dtype()
        ));
    };
    let symbols: Vec<String> = dimension_symbols.iter().map(|s| s.to_string()).collect();
    let text = dims_text(shape, &symbols);
    if *ty != TensorElementType::Float32 {
        return Err(format!(
            "input '{name}' {text} is {ty:?}; evald feeds float32 (export with a float32 input)"
        ));
    }
    if shape.len() != rank {
        return Err(format!(
            "input '{name}' is {text} (rank {}); input = \"{kind}\" feeds {layout} (rank {rank}): \
             set input in submission.toml to match the model",
            shape.len()
        ));
    }
    let fixed_batch = fixed(shape[0]);
    if let Some(b) = fixed_batch {
        if b != spec.batch_size {
            return Err(format!(
                "input '{name}' is fixed to {text}: batch {b}, but evald feeds batches of {} \
                 (batch_size): set batch_size = {b} in submission.toml, or export with a dynamic batch",
                spec.batch_size
            ));
        }
    }
    if let Some(c) = fixed(shape[1]).filter(|&c| c != 1) {
        return Err(format!(
            "input '{name}' is {text}: {c} channels, but evald feeds one channel, {layout}"
        ));
    }
    if spec.input == InputKind::Volume3d {
        let p = spec.patch_size;
        let bad = shape[2..]
            .iter()
            .zip(p)
            .any(|(&d, want)| fixed(d).is_some_and(|d| d != want));
        if bad {
            return Err(format!(
                "input '{name}' is fixed to {text}, but evald feeds patches of [{}, {}, {}] (patch_size): \
                 set patch_size to the model's D, H, W in submission.toml, or export with dynamic D, H, W",
                p[0], p[1], p[2]
            ));
        }
    }
    let outputs = session.outputs();
    let [output] = outputs else {
        return Err(format!(
            "the model has {} outputs ({}); evald reads one: return only the segmentation {}",
            outputs.len(),
            names(outputs),
            match spec.output {
                OutputKind::Labels => "labels",
                _ => "scores [B, C, ...]",
            }
        ));
    };
    let oname = output.name();
    let ValueType::Tensor {
        ty: oty,
        shape: oshape,
        dimension_symbols: osym,
    } = output.dtype()
    else {
        return Err(format!(
            "output '{oname}' is a {:?}, not a tensor",
            output.dtype()
        ));
    };
    let osymbols: Vec<String> = osym.iter().map(|s| s.to_string()).collect();
    let otext = dims_text(oshape, &osymbols);
    let float = matches!(
        oty,
        TensorElementType::Float32
            | TensorElementType::Float64
            | TensorElementType::Float16
            | TensorElementType::Bfloat16
    );
    let integer = matches!(
        oty,
        TensorElementType::Uint8
            | TensorElementType::Int8
            | TensorElementType::Uint16
            | TensorElementType::Int16
            | TensorElementType::Int32
            | TensorElementType::Int64
            | TensorElementType::Uint32
            | TensorElementType::Uint64
            | TensorElementType::Bool
    );
    match spec.output {
        OutputKind::Logits | OutputKind::Probabilities => {
            if !float {
                return Err(format!(
                    "output '{oname}' {otext} is {oty:?}, not scores; declare output = \"labels\" in submission.toml if it returns labels"
                ));
            }
            if !oshape.is_empty() && oshape.len() != rank {
                return Err(format!(
                    "output '{oname}' is {otext}; for {:?} evald reads [B, C, spatial...] (rank {rank})",
                    spec.output
                ));
            }
            if let Some(c) = oshape.get(1).and_then(|&c| fixed(c)).filter(|&c| c > 256) {
                return Err(format!(
                    "output '{oname}' is {otext}: {c} channels; evald reads at most 256 classes"
                ));
            }
        }
        OutputKind::Labels => {
            if !float && !integer {
                return Err(format!(
                    "output '{oname}' {otext} is {oty:?}; labels must be integers (or whole floats)"
                ));
            }
            if !oshape.is_empty() && oshape.len() != rank && oshape.len() != rank - 1 {
                return Err(format!(
                    "output '{oname}' is {otext}; for labels evald reads [B, spatial...] or [B, 1, spatial...]"
                ));
            }
        }
    }
    Ok(Io {
        name,
        shape: shape.to_vec(),
        symbols,
        fixed_batch,
    })
}

/// Copy a tensor output to the CPU as `f32`.
fn extract(y: &DynValue) -> Result<Output, InferError> {
    let ValueType::Tensor { ty, .. } = y.dtype() else {
        return Err(InferError::BadOutput(format!(
            "the output is a {:?}, not a tensor",
            y.dtype()
        )));
    };
    let ty = *ty;
    let err = |e: ort::Error| InferError::BadOutput(first_line(&e));
    macro_rules! take {
        ($t:ty, $conv:expr) => {{
            let (shape, data) = y.try_extract_tensor::<$t>().map_err(err)?;
            let conv = $conv;
            (
                shape.to_vec(),
                data.iter().map(|&v| conv(v)).collect::<Vec<f32>>(),
            )
        }};
    }
    let (shape, data) = match ty {
        TensorElementType::Float32 => take!(f32, |v: f32| v),
        TensorElementType::Float64 => take!(f64, |v: f64| v as f32),
        TensorElementType::Float16 => take!(half::f16, |v: half::f16| v.to_f32()),
        TensorElementType::Bfloat16 => take!(half::bf16, |v: half::bf16| v.to_f32()),
        TensorElementType::Int64 => take!(i64, |v: i64| v as f32),
        TensorElementType::Int32 => take!(i32, |v: i32| v as f32),
        TensorElementType::Int16 => take!(i16, |v: i16| f32::from(v)),
        TensorElementType::Int8 => take!(i8, |v: i8| f32::from(v)),
        TensorElementType::Uint64 => take!(u64, |v: u64| v as f32),
        TensorElementType::Uint32 => take!(u32, |v: u32| v as f32),
        TensorElementType::Uint16 => take!(u16, |v: u16| f32::from(v)),
        TensorElementType::Uint8 => take!(u8, |v: u8| f32::from(v)),
        TensorElementType::Bool => take!(bool, |v: bool| f32::from(u8::from(v))),
        other => {
            return Err(InferError::BadOutput(format!(
                "output of type {other:?} is not numeric"
            )))
        }
    };
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| InferError::BadOutput(format!("output shape {shape:?}")))?;
    let float = matches!(
        ty,
        TensorElementType::Float32
            | TensorElementType::Float64
            | TensorElementType::Float16
            | TensorElementType::Bfloat16
    );
    Ok(Output {
        shape,
        data,
        float,
        ty,
    })
}

/// Turn a model output into labels (u8, `want` = batch first then spatial: `[B, H, W]` or
/// `[B, D, H, W]`), checking its shape and values, with the TorchScript runtime's rules:
/// scores `[B, C, spatial...]` (1 <= C <= 256, finite; C = 1: logits > 0, probabilities >
/// 0.5; otherwise the first maximum), labels `[B, spatial...]` or `[B, 1, spatial...]`,
/// whole numbers in 0..=255.
fn to_labels(y: &Output, want: &[usize], kind: OutputKind) -> Result<Vec<u8>, InferError> {
    let size = &y.shape;
    let spatial = &want[1..];
    let shape_err = |expect: &str| {
        InferError::BadOutput(format!(
            "shape {size:?} ({:?}); expected {expect} for input batch {} x {spatial:?} with output kind {kind:?}",
            y.ty, want[0]
        ))
    };
    match kind {
        OutputKind::Logits | OutputKind::Probabilities => {
            let ok = size.len() == want.len() + 1
                && size[0] == want[0]
                && size[2..] == *spatial
                && (1..=256).contains(&size[1]);
            if !ok {
                return Err(shape_err("[B, C, spatial...] with 1 <= C <= 256"));
            }
            if !y.float {
                return Err(InferError::BadOutput(format!(
                    "{kind:?} output has integer type {:?}; declare output = \"labels\" in submission.toml",
                    y.ty
                )));
            }
            if y.data.iter().any(|v| !v.is_finite()) {
                return Err(InferError::BadOutput(
                    "output contains NaN or infinity".into(),
                ));
            }
            let c = size[1];
            let s: usize = spatial.iter().product();
            let mut out = vec![0u8; want[0] * s];
            if c == 1 {
                let thr = if kind == OutputKind::Logits { 0.0 } else { 0.5 };
                for (o, &v) in out.iter_mut().zip(&y.data) {
                    *o = u8::from(v > thr);
                }
                return Ok(out);
            }
            for b in 0..want[0] {
                let scores = &y.data[b * c * s..(b + 1) * c * s];
                let labels = &mut out[b * s..(b + 1) * s];
                let mut best: Vec<f32> = scores[..s].to_vec();
                for ch in 1..c {
                    for ((l, m), &v) in labels
                        .iter_mut()
                        .zip(best.iter_mut())
                        .zip(&scores[ch * s..(ch + 1) * s])
                    {
                        if v > *m {
                            *m = v;
                            *l = ch as u8;
                        }
                    }
                }
            }
            Ok(out)
        }
        OutputKind::Labels => {
            let squeezed: Vec<usize> = if size.len() == want.len() + 1 && size.get(1) == Some(&1) {
                size.iter()
                    .enumerate()
                    .filter(|&(i, _)| i != 1)
                    .map(|(_, &d)| d)
                    .collect()
            } else {
                size.clone()
            };
            if squeezed != want {
                return Err(shape_err("[B, spatial...] or [B, 1, spatial...]"));
            }
            if y.float && y.data.iter().any(|v| v.round() != *v) {
                return Err(InferError::BadOutput(
                    "labels output holds non-integer values (NaN or fractions)".into(),
                ));
            }
            let (lo, hi) = y
                .data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            if lo < 0.0 || hi > 255.0 {
                return Err(InferError::BadOutput(format!(
                    "labels output ranges {lo}..{hi}; labels must be 0..=255"
                )));
            }
            Ok(y.data.iter().map(|&v| v as u8).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(shape: &[usize], data: Vec<f32>, float: bool) -> Output {
        Output {
            shape: shape.to_vec(),
            data,
            float,
            ty: if float {
                TensorElementType::Float32
            } else {
                TensorElementType::Int64
            },
        }
    }

    #[test]
    fn scores_take_the_first_maximum_and_one_channel_thresholds() {
        // [B=1, C=3, 4 voxels]: a tie between channels 1 and 2 goes to 1 (torch.argmax).
        let y = out(
            &[1, 3, 2, 2],
            vec![0.0, 5.0, 0.0, 1.0, 1.0, 0.0, 2.0, 1.0, 1.0, 0.0, 2.0, 3.0],
            true,
        );
        assert_eq!(
            to_labels(&y, &[1, 2, 2], OutputKind::Logits).unwrap(),
            [1, 0, 1, 2]
        );
        let one = out(&[1, 1, 1, 3], vec![-0.1, 0.2, 0.7], true);
        assert_eq!(
            to_labels(&one, &[1, 1, 3], OutputKind::Logits).unwrap(),
            [0, 1, 1]
        );
        assert_eq!(
            to_labels(&one, &[1, 1, 3], OutputKind::Probabilities).unwrap(),
            [0, 0, 1]
        );
    }

    #[test]
    fn bad_outputs_are_one_clear_error_each() {
        let msg = |r: Result<Vec<u8>, InferError>| r.unwrap_err().to_string();
        let nan = out(&[1, 2, 1, 2], vec![0.0, f32::NAN, 1.0, 0.0], true);
        assert!(msg(to_labels(&nan, &[1, 1, 2], OutputKind::Logits)).contains("NaN"));
        let small = out(&[1, 2, 1, 1], vec![0.0, 1.0], true);
        assert!(
            msg(to_labels(&small, &[1, 1, 2], OutputKind::Logits)).contains("shape [1, 2, 1, 1]")
        );
        let ints = out(&[1, 2, 1, 1], vec![0.0, 1.0], false);
        assert!(msg(to_labels(&ints, &[1, 1, 1], OutputKind::Logits))
            .contains("declare output = \"labels\""));
        let frac = out(&[1, 1, 2], vec![0.5, 1.0], true);
        assert!(msg(to_labels(&frac, &[1, 1, 2], OutputKind::Labels)).contains("non-integer"));
        let big = out(&[1, 1, 2], vec![300.0, 1.0], false);
        assert!(msg(to_labels(&big, &[1, 1, 2], OutputKind::Labels)).contains("0..=255"));
        let neg = out(&[1, 1, 1, 2], vec![-1.0, 1.0], false);
        assert!(msg(to_labels(&neg, &[1, 1, 2], OutputKind::Labels)).contains("0..=255"));
        // [B, 1, spatial] labels are squeezed.
        let ok = out(&[1, 1, 1, 2], vec![2.0, 1.0], false);
        assert_eq!(
            to_labels(&ok, &[1, 1, 2], OutputKind::Labels).unwrap(),
            [2, 1]
        );
    }

    #[test]
    fn windows_are_cropped_and_blended_where_they_lie() {
        // A 2 x 3 x 4 volume, a 1 x 2 x 2 patch at [1, 1, 2].
        let vol: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 4];
        crop(&vol, [2, 3, 4], [1, 1, 2], [1, 2, 2], &mut dst);
        assert_eq!(dst, [18.0, 19.0, 22.0, 23.0]);
        let mut acc = vec![1f32; 24];
        blend(
            &mut acc,
            [2, 3, 4],
            [1, 1, 2],
            [1, 2, 2],
            &[1.0, 2.0, 3.0, 4.0],
            &[0.5, 0.5, 1.0, 2.0],
        );
        assert_eq!((acc[18], acc[19], acc[22], acc[23]), (1.5, 2.0, 4.0, 9.0));
        assert_eq!(acc.iter().filter(|&&v| v == 1.0).count(), 20);
    }

    #[test]
    fn the_checkout_library_is_the_last_resort_and_device_names_are_checked() {
        // The candidates always end with the checkout's library (unless the variable
        // names one), so an error can say where to install it.
        let c = library_candidates();
        if std::env::var_os(DYLIB_ENV).is_none() {
            assert_eq!(c.last().unwrap(), Path::new(CHECKOUT_LIBRARY));
        }
        assert!(DeviceName::parse("cuda:x").is_none());
        assert!(matches!(check_device("gpu0"), Err(DeviceError::Name(_))));
        assert_eq!(check_device("cpu").unwrap(), None);
    }
}
