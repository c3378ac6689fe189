//! The result of one evaluation, as every output (summary.json, report, email, store)
//! sees it: scored cases, failed cases, aggregates and what produced them; [`summary`]
//! writes it as `summary.json` (nnU-Net keys, strict JSON); [`compare`] pairs it with
//! another evaluation of the same test-set content.

pub mod compare;
pub mod summary;

use std::path::PathBuf;

use crate::metrics::aggregate::{self, mean_defined, Metric, Summary};
use crate::metrics::{CaseMetrics, EvalSpec};

/// The time now as every output writes it (`started`, `finished`): RFC 3339 UTC to the
/// second. (The store writes milliseconds, so that its rows sort by time as text.)
pub fn timestamp_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A case that could not be scored, and why. Failed cases are listed and counted in every
/// output, never dropped.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// Case id.
    pub case: String,
    /// Stage that failed.
    pub stage: Stage,
    /// One-line reason (what, where, what to do).
    pub reason: String,
    /// Attempts made (1 for deterministic failures).
    pub attempts: u32,
}

/// Where a case failed: one type for the pipeline, the pool, the report, the email and
/// `summary.json` (where it is the lower-case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The image (or, for `evald score`, the prediction file) could not be read.
    Read,
    /// The model raised, returned unusable output, or ran out of memory.
    Inference,
    /// The worker process died, stopped answering, or could not hand its result over.
    Worker,
    /// The case exceeded `pool.case_timeout_secs`.
    Timeout,
    /// Not run: the evaluation was stopped early (consecutive timeouts, budget).
    Aborted,
    /// The test set's reference label cannot be used (the evaluation team's to fix).
    Reference,
    /// Scoring failed (e.g. prediction and reference on different grids).
    Metrics,
    /// The test set has a reference but no image for this case.
    Missing,
    /// The evaluation stopped (shutdown) before this case ran.
    Cancelled,
}

impl Stage {
    /// The name used in reports and `summary.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Inference => "inference",
            Stage::Worker => "worker",
            Stage::Timeout => "timeout",
            Stage::Aborted => "aborted",
            Stage::Reference => "reference",
            Stage::Metrics => "metrics",
            Stage::Missing => "missing",
            Stage::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and how an evaluation ran.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunMeta {
    /// Task name (`thyroid-ca`), or `score` for a plain folder comparison.
    pub task: String,
    /// Vendor (from the drop path), if any.
    pub vendor: Option<String>,
    /// Submission name (from the drop path), if any.
    pub submission: Option<String>,
    /// The submission folder (outputs land here).
    pub submission_dir: Option<PathBuf>,
    /// sha256 of the model file, hex.
    pub model_sha256: Option<String>,
    /// Reference labels folder.
    pub labels_dir: PathBuf,
    /// Images (or predictions) folder.
    pub inputs_dir: PathBuf,
    /// sha256 over the sorted cases and each test-set file's bytes (`dataset::manifest_hash`):
    /// two evaluations scored the same test set exactly when these are equal.
    pub dataset_hash: String,
    /// Devices used for inference.
    pub devices: Vec<String>,
    /// evald version.
    pub evald_version: String,
    /// The model's format, by name (`TorchScript`, `ONNX`), when inference ran.
    pub model_format: Option<String>,
    /// The library that ran it and its version (`libtorch 2.11.0`, `ONNX Runtime 1.32.0`),
    /// when inference ran.
    pub runtime: Option<String>,
    /// Digest of the effective configuration (when run from a config).
    pub config_digest: Option<String>,
    /// RFC 3339 start time.
    pub started: String,
    /// RFC 3339 end time.
    pub finished: String,
    /// Seconds per stage (`decode`, `inference`, `forward`, `metrics`, `total`, ...).
    pub timings: Vec<(String, f64)>,
    /// Why the evaluation stopped before every case ran (a model that keeps timing out,
    /// the evaluation's budget); the cases not run are failures with stage `aborted`.
    pub stopped_early: Option<String>,
}

/// One complete evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// What was computed.
    pub spec: EvalSpec,
    /// Scored cases, in case order.
    pub cases: Vec<CaseMetrics>,
    /// Cases that could not be scored.
    pub failures: Vec<Failure>,
    /// Aggregates over `cases`.
    pub summary: Summary,
    /// Provenance and timings.
    pub meta: RunMeta,
    /// The paired comparison with the vendor's previous submission (or why there is
    /// none), when there is one: set before the outputs are written, so that
    /// `summary.json`, the report and the email say the same.
    pub comparison: Option<compare::Against>,
}

impl Evaluation {
    /// Assemble an evaluation; cases are sorted by id and aggregated.
    pub fn new(
        spec: EvalSpec,
        mut cases: Vec<CaseMetrics>,
        mut failures: Vec<Failure>,
        meta: RunMeta,
    ) -> Self {
        cases.sort_by(|a, b| a.case.cmp(&b.case));
        failures.sort_by(|a, b| a.case.cmp(&b.case));
        let summary = aggregate::summarize(&cases, &spec);
        Evaluation {
            spec,
            cases,
            failures,
            summary,
            meta,
            comparison: None,
        }
    }

    /// Cases attempted (scored + failed).
    pub fn total_cases(&self) -> usize {
        self.cases.len() + self.failures.len()
    }

    /// `task / vendor / submission`: what the evaluation is about, in one line (report and
    /// email headers).
    pub fn who(&self) -> String {
        [
            Some(self.meta.task.as_str()),
            self.meta.vendor.as_deref(),
            self.meta.submission.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" / ")
    }

    /// Class name of a label ("label 3" when unnamed).
    pub fn class_name(&self, label: u8) -> String {
        self.spec
            .classes
            .iter()
            .find(|c| c.label == label)
            .map_or_else(|| format!("label {label}"), |c| c.name.clone())
    }
}

/// A number with `d` decimals for people (terminal, email), or "n/a" when undefined.
pub fn fixed(v: f64, d: usize) -> String {
    if v.is_finite() {
        format!("{v:.d$}")
    } else {
        "n/a".into()
    }
}

impl Evaluation {
    /// The mean over cases of `metric` for the class `label` (NaN when undefined or not
    /// computed).
    pub fn class_mean(&self, label: u8, metric: Metric) -> f64 {
        self.summary
            .per_class
            .get(&label)
            .and_then(|m| m.get(&metric))
            .map_or(f64::NAN, |s| s.mean)
    }

    /// The headline Dice: nnU-Net's foreground mean over classes (the class mean with one
    /// class). When a class has no defined Dice in any case the foreground mean is undefined
    /// (as in nnU-Net); the headline then averages the classes that have one, and says so.
    pub fn headline_dice(&self) -> (f64, &'static str) {
        if self.spec.classes.len() == 1 {
            return (
                self.class_mean(self.spec.classes[0].label, Metric::Dice),
                "Dice, mean",
            );
        }
        let fg = self
            .summary
            .foreground_mean
            .get(&Metric::Dice)
            .copied()
            .unwrap_or(f64::NAN);
        if fg.is_finite() {
            return (fg, "Dice, foreground mean");
        }
        let m = mean_defined(
            self.spec
                .classes
                .iter()
                .map(|c| self.class_mean(c.label, Metric::Dice)),
        );
        if m.is_nan() {
            (f64::NAN, "Dice")
        } else {
            (m, "Dice, mean of classes with a defined Dice")
        }
    }

    /// One line for logs, `evald status` and systemd's STATUS.
    pub fn status_line(&self) -> String {
        let mut parts = Vec::new();
        for c in &self.spec.classes {
            let dice = self.class_mean(c.label, Metric::Dice);
            if dice.is_finite() {
                parts.push(format!("{} {dice:.3}", c.name));
            } else {
                parts.push(format!("{} n/a", c.name));
            }
        }
        let mut line = format!(
            "Dice {}; {}/{} cases scored",
            parts.join(", "),
            self.cases.len(),
            self.total_cases()
        );
        if let Some(why) = &self.meta.stopped_early {
            line.push_str(&format!("; stopped early: {why}"));
        }
        line
    }
}
