//! The execution layer's interface: what the pipeline asks of whatever runs a model over
//! the cases of a test set, and nothing of submissions, reports or mail.
//!
//! - [`Job`]: one model (an immutable file and its hash) with its inference settings, over
//!   one images folder: all an execution backend is told;
//! - [`Backend`]: predicts cases of a job, as many at once as it says; implemented by the
//!   supervised local worker pool (the `pool` module), by [`InProcess`] (this process, for
//!   `evald run --in-process` and tests) and, in the pipeline, by a folder of finished
//!   predictions (`evald score`);
//! - [`Prediction`] and [`Totals`]: what comes back.
//!
//! Which backend an evaluation uses is decided above this layer (the `backend` module); the
//! pipeline and everything under it see only `&dyn Backend`. Two seams sit below a
//! backend: where a worker runs (the pool's launcher) and what runs the model (an
//! [`crate::infer`] runtime).

use std::path::PathBuf;

use crate::dataset::CaseFiles;
use crate::evaluation::{Failure, Stage};
use crate::infer::{InferError, InferSpec, Model, ModelFormat, PredictStats};
use crate::volume::{self, LabelVolume};

/// What a backend runs: one model on one test set's images.
#[derive(Debug, Clone)]
pub struct Job {
    /// The model's format: which runtime the workers load it with.
    pub format: ModelFormat,
    /// The model file (an immutable snapshot, for submissions).
    pub model: PathBuf,
    /// The sha256 (hex) every worker checks the model's bytes against before loading
    /// them (`None`: load whatever is there, for tests and benches of a fixed file).
    pub model_sha256: Option<String>,
    /// Inference settings (task defaults + manifest).
    pub spec: InferSpec,
    /// The images folder (workers may read it, or only its image files when `labels`
    /// lies inside it).
    pub images: PathBuf,
    /// The labels folder (never readable by workers; used only to decide the grants).
    pub labels: Option<PathBuf>,
    /// A folder for the workers' scratch sub-folders, on a local disk.
    pub scratch: PathBuf,
}

/// A prediction for one case.
#[derive(Debug)]
pub struct Prediction {
    /// The label map on the image grid.
    pub labels: LabelVolume,
    /// Where it was read from, if it was a file (`evald score`; shown in summary.json).
    pub file: Option<PathBuf>,
    /// Timings.
    pub stats: PredictStats,
    /// Device that produced it.
    pub device: String,
    /// Attempts it took.
    pub attempts: u32,
}

/// Counters over a backend's life (for the log line that compares forward time with
/// wall time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Cases predicted.
    pub done: u64,
    /// Cases failed for good.
    pub failed: u64,
    /// Attempts that were retried.
    pub retries: u64,
    /// Workers that died or were killed.
    pub worker_losses: u64,
    /// Cases that hit the per-case timeout.
    pub timeouts: u64,
    /// Sum of model forward seconds.
    pub forward_secs: f64,
    /// Sum of worker-side image decode seconds.
    pub decode_secs: f64,
    /// Sum of worker-side prediction seconds (windowing + forward + argmax).
    pub predict_secs: f64,
}

impl Totals {
    /// One log line: forward seconds (summed and per worker) against the evaluation's
    /// wall time, the figure that says whether the model or evald is the bottleneck.
    pub fn log(&self, workers: usize, startup_secs: f64, wall_secs: f64) {
        let floor = self.forward_secs / workers.max(1) as f64;
        let ratio = if floor > 0.0 {
            format!("{:.2}", wall_secs / floor)
        } else {
            "n/a".into()
        };
        tracing::info!(
            cases = self.done,
            failed = self.failed,
            retries = self.retries,
            worker_losses = self.worker_losses,
            timeouts = self.timeouts,
            forward_sum = format!("{:.2}", self.forward_secs),
            forward_per_worker = format!("{floor:.2}"),
            decode_sum = format!("{:.2}", self.decode_secs),
            predict_sum = format!("{:.2}", self.predict_secs),
            startup = format!("{startup_secs:.2}"),
            wall = format!("{wall_secs:.2}"),
            wall_over_forward = ratio,
            "model forward time vs wall time"
        );
    }
}

/// Produces label maps for the cases of one [`Job`].
pub trait Backend: Sync {
    /// How many `predict` calls may run at once.
    fn concurrency(&self) -> usize;
    /// Predict one case.
    ///
    /// # Errors
    /// A [`Failure`] for this case (stage, reason, attempts).
    fn predict(&self, case: &CaseFiles) -> Result<Prediction, Failure>;
    /// Why this backend stopped taking cases before the evaluation ended (the cases it
    /// refused then are failures saying so); `None` while it runs normally.
    fn stopped_early(&self) -> Option<String> {
        None
    }
    /// The devices it runs on (for the report's Run sheet).
    fn devices(&self) -> Vec<String>;
    /// Its counters so far.
    fn totals(&self) -> Totals {
        Totals::default()
    }
    /// How many workers it runs (for the forward-floor log line).
    fn workers(&self) -> usize {
        self.concurrency()
    }
}

/// Runs a [`Model`] in this process, one case at a time (`evald run --in-process`, tests,
/// benches). No sandbox: for trusted models only.
pub struct InProcess {
    model: Model,
    device: String,
}

impl InProcess {
    /// Wrap a loaded model.
    pub fn new(model: Model, device: &str) -> Self {
        InProcess {
            model,
            device: device.to_string(),
        }
    }
}

/// A failure record from an inference error.
pub fn inference_failure(case: &str, e: &InferError, attempts: u32) -> Failure {
    Failure {
        case: case.to_string(),
        stage: Stage::Inference,
        reason: e.to_string(),
        attempts,
    }
}

impl Backend for InProcess {
    fn concurrency(&self) -> usize {
        1
    }

    fn devices(&self) -> Vec<String> {
        vec![self.device.clone()]
    }

    fn predict(&self, case: &CaseFiles) -> Result<Prediction, Failure> {
        let image = volume::read_image(&case.input).map_err(|e| Failure {
            case: case.id.clone(),
            stage: Stage::Read,
            reason: e.to_string(),
            attempts: 1,
        })?;
        let (labels, stats) = self
            .model
            .predict(&image)
            .map_err(|e| inference_failure(&case.id, &e, 1))?;
        Ok(Prediction {
            labels,
            file: None,
            stats,
            device: self.device.clone(),
            attempts: 1,
        })
    }
}
