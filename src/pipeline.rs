//! One evaluation, start to finish: cases -> predictions -> scores -> [`Evaluation`].
//!
//! Two stages run at once so neither the model nor the CPU waits for the other:
//! - **predict**: `Backend::concurrency()` threads take cases in order and ask the
//!   execution [`Backend`] for a label map (the worker pool, this process, or a folder of
//!   finished predictions);
//! - **score**: scoring threads take finished predictions from a bounded queue, decode the
//!   reference labels and compute every metric.
//!
//! The queue bound keeps memory flat whatever the number of cases: at most
//! `concurrency + QUEUE + scorers` predictions exist at any time. Failures of one case (a
//! model error, a bad reference file, a timeout) are recorded and the rest goes on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use crate::dataset::{CaseFiles, Dataset};
use crate::evaluation::{Failure, Stage};
use crate::exec::{Backend, Prediction};
use crate::infer::PredictStats;
use crate::metrics::{self, CaseMetrics, EvalSpec};
use crate::volume;

/// Progress of an evaluation, for bars and log lines.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Evaluation begins.
    Start {
        /// Cases to do.
        total: usize,
    },
    /// A case was scored.
    Scored {
        /// Case id.
        case: String,
        /// Mean Dice over classes (NaN-excluded) of the case.
        dice: f64,
        /// Cases finished (scored or failed).
        done: usize,
    },
    /// A case failed.
    Failed {
        /// The failure.
        failure: Failure,
        /// Cases finished.
        done: usize,
    },
}

/// Timings of the stages, summed over cases (seconds).
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// Wall time of the whole evaluation.
    pub wall: f64,
    /// Sum of prediction time (decode + inference) over cases.
    pub predict: f64,
    /// Sum of model forward time.
    pub forward: f64,
    /// Sum of scoring time (label decode + metrics).
    pub score: f64,
}

impl StageTimes {
    /// As `(stage, seconds)` pairs for [`crate::evaluation::RunMeta::timings`].
    pub fn pairs(&self) -> Vec<(String, f64)> {
        vec![
            ("total_wall".into(), self.wall),
            ("predict_sum".into(), self.predict),
            ("forward_sum".into(), self.forward),
            ("score_sum".into(), self.score),
        ]
    }
}

/// Write one case's prediction into `dir` (created if needed) as `<case>.nii.gz`.
fn save_prediction(dir: &Path, case: &str, labels: &crate::volume::LabelVolume) {
    let path = dir.join(format!("{case}.nii.gz"));
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| volume::write_volume(&path, labels).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::warn!(
            case,
            "cannot save the prediction as {}: {e}",
            path.display()
        );
    }
}

/// Predictions waiting to be scored, at most.
const QUEUE: usize = 2;

/// Predict and score every case of `data`. Returns scored cases, failures (including the
/// dataset's missing cases) and stage timings. Setting `cancel` stops taking new cases;
/// cases in flight finish. With `save`, each prediction is also written there as
/// `<case>.nii.gz` on the case's grid (a write that fails is logged; the case is scored).
pub fn evaluate(
    data: &Dataset,
    spec: &EvalSpec,
    backend: &dyn Backend,
    save: Option<&Path>,
    on_progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> (Vec<CaseMetrics>, Vec<Failure>, StageTimes) {
    let t0 = Instant::now();
    let total = data.cases.len();
    on_progress(Progress::Start { total });
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results = Mutex::new((Vec::new(), Vec::new(), StageTimes::default()));
    let (tx, rx) = mpsc::sync_channel::<(&CaseFiles, Prediction)>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let scorers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 2);
    let record_failure = |f: Failure| {
        let d = done.fetch_add(1, Ordering::SeqCst) + 1;
        on_progress(Progress::Failed {
            failure: f.clone(),
            done: d,
        });
        results.lock().expect("results lock").1.push(f);
    };
    std::thread::scope(|s| {
        for _ in 0..backend.concurrency().max(1) {
            let tx = tx.clone();
            let (next, results, record_failure) = (&next, &results, &record_failure);
            s.spawn(move || loop {
                if cancel.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = data.cases.get(i) else { break };
                let t = Instant::now();
                match backend.predict(case) {
                    Ok(p) => {
                        {
                            let mut r = results.lock().expect("results lock");
                            r.2.predict += t.elapsed().as_secs_f64();
                            r.2.forward += p.stats.forward_secs;
                        }
                        if tx.send((case, p)).is_err() {
                            break;
                        }
                    }
                    Err(f) => record_failure(f),
                }
            });
        }
        drop(tx);
        for _ in 0..scorers {
            let rx = Arc::clone(&rx);
            let (results, done, record_failure) = (&results, &done, &record_failure);
            s.spawn(move || loop {
                let msg = rx.lock().expect("queue lock").recv();
                let Ok((case, p)) = msg else { break };
                let t = Instant::now();
                if let Some(dir) = save {
                    save_prediction(dir, &case.id, &p.labels);
                }
                let pred_file = p.file.clone().unwrap_or_else(|| case.input.clone());
                // The reference must be on the prediction's grid (up to a reorientation,
                // which keeps the voxel count), so a header claiming more voxels is refused
                // before anything is allocated: a reference "bomb" costs this case, never
                // the daemon's memory. A panic while decoding also fails only this case.
                let limits = volume::ReadLimits {
                    max_voxels: (p.labels.geom.len() as u64).min(volume::DEFAULT_MAX_LABEL_VOXELS),
                    max_voxels_why: Some(
                        "the prediction's grid, the grid of this case's image when evald ran \
                         the model, has that many, and a reference with more voxels cannot \
                         match it: the test set's reference does not match its image",
                    ),
                    ..volume::ReadLimits::default()
                };
                let reference = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    volume::read_labels_with(&case.label, limits)
                }))
                .unwrap_or_else(|_| {
                    Err(volume::VolumeError::Io {
                        path: case.label.clone(),
                        source: std::io::Error::other(
                            "decoding it panicked (a bug in evald; only this case is failed)",
                        ),
                    })
                });
                // A reference that cannot be used is the test set's defect, not the model's:
                // the admin reads the whole error in the log; the report (which the vendor
                // reads) names the case and the file, never the test set's folders.
                let reference = match reference {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(case = %case.id, "test-set problem, not the model's: {e}");
                        record_failure(Failure {
                            case: case.id.clone(),
                            stage: Stage::Reference,
                            reason: format!(
                                "the test set's reference label {} cannot be used; the \
                                 evaluation team has been told (not a problem of the model)",
                                case.label
                                    .file_name()
                                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                            ),
                            attempts: 1,
                        });
                        continue;
                    }
                };
                let scored = metrics::evaluate_case(
                    &case.id,
                    &reference,
                    &case.label,
                    p.labels,
                    &pred_file,
                    spec,
                );
                match scored {
                    Ok(m) => {
                        let dice = mean_dice(&m);
                        let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                        on_progress(Progress::Scored {
                            case: case.id.clone(),
                            dice,
                            done: d,
                        });
                        let mut r = results.lock().expect("results lock");
                        r.2.score += t.elapsed().as_secs_f64();
                        r.0.push(m);
                    }
                    Err(e) => record_failure(Failure {
                        case: case.id.clone(),
                        stage: Stage::Metrics,
                        reason: e.to_string(),
                        attempts: 1,
                    }),
                }
            });
        }
    });
    let (cases, mut failures, mut times) = results.into_inner().expect("results lock");
    for id in &data.missing {
        failures.push(Failure {
            case: id.clone(),
            stage: Stage::Missing,
            reason: format!("case {id} has a reference but no input file"),
            attempts: 0,
        });
    }
    if cancel.load(Ordering::SeqCst) {
        let seen: std::collections::HashSet<&str> = cases
            .iter()
            .map(|c: &CaseMetrics| c.case.as_str())
            .chain(failures.iter().map(|f| f.case.as_str()))
            .collect();
        let skipped: Vec<Failure> = data
            .cases
            .iter()
            .filter(|c| !seen.contains(c.id.as_str()))
            .map(|c| Failure {
                case: c.id.clone(),
                stage: Stage::Cancelled,
                reason: "evaluation stopped before this case ran".into(),
                attempts: 0,
            })
            .collect();
        failures.extend(skipped);
    }
    times.wall = t0.elapsed().as_secs_f64();
    (cases, failures, times)
}

/// Mean Dice over the classes of a case, NaN excluded (for progress lines).
pub fn mean_dice(m: &CaseMetrics) -> f64 {
    crate::metrics::aggregate::mean_defined(m.classes.iter().map(|c| c.counts.dice()))
}

/// Score a folder of predictions against a folder of references (`evald score`): cases in
/// parallel, at most a few volumes decoded at once. Each prediction is read with at most
/// its reference's voxel count (from the reference's header), and each reference with at
/// most its prediction's, so no file can make a read allocate more than its partner holds.
pub fn score_folder(
    data: &Dataset,
    spec: &EvalSpec,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> (Vec<CaseMetrics>, Vec<Failure>, StageTimes) {
    struct Files;
    impl Backend for Files {
        fn devices(&self) -> Vec<String> {
            vec!["file".into()]
        }
        fn concurrency(&self) -> usize {
            2
        }
        fn predict(&self, case: &CaseFiles) -> Result<Prediction, Failure> {
            let fail = |stage: Stage, reason: String| Failure {
                case: case.id.clone(),
                stage,
                reason,
                attempts: 1,
            };
            // Bound the prediction by its reference's grid, read from the headers first: a
            // grid with another voxel count can be neither the same grid nor a
            // reorientation of it, so it is reported as the grid mismatch it is without
            // decoding either file. Were a header unreadable, read as before and let the
            // read (or the scorer, for the reference) report it.
            let limits = match (
                volume::read_geometry(&case.label),
                volume::read_geometry(&case.input),
            ) {
                (Ok(r), Ok(g)) => {
                    if g.len() != r.len() {
                        if let volume::GridRelation::Incompatible(detail) = g.relate(&r) {
                            let e = metrics::CaseError::Geometry {
                                case: case.id.clone(),
                                prediction: case.input.clone(),
                                reference: case.label.clone(),
                                detail,
                            };
                            return Err(fail(Stage::Metrics, e.to_string()));
                        }
                    }
                    volume::ReadLimits {
                        max_voxels: (r.len() as u64).min(volume::DEFAULT_MAX_LABEL_VOXELS),
                        max_voxels_why: Some(
                            "the reference's grid has that many, and a prediction with more \
                             voxels cannot match it: resample the prediction onto the \
                             reference grid",
                        ),
                        ..volume::ReadLimits::default()
                    }
                }
                _ => volume::ReadLimits {
                    max_voxels: volume::DEFAULT_MAX_LABEL_VOXELS,
                    ..volume::ReadLimits::default()
                },
            };
            let labels = volume::read_labels_with(&case.input, limits)
                .map_err(|e| fail(Stage::Read, e.to_string()))?;
            Ok(Prediction {
                labels,
                file: Some(case.input.clone()),
                stats: PredictStats::default(),
                device: "file".into(),
                attempts: 1,
            })
        }
    }
    evaluate(
        data,
        spec,
        &Files,
        None,
        on_progress,
        &AtomicBool::new(false),
    )
}
