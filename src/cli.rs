//! The command line: raw arguments (clap) -> validated settings -> the library.
//!
//! Commands (the contract is the README's command table): `score`, `run`, `demo`, `serve`, `check-config`,
//! `status`, `requeue`, `compare`, and the internal `worker`. Errors are `anyhow` here only; the
//! library's typed errors carry the context (file, case, key).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{self, Settings, TaskSettings};
use crate::dataset;
use crate::evaluation::{fixed, Evaluation, RunMeta};
use crate::exec::InProcess;
use crate::infer::Model;
use crate::metrics::aggregate::Metric;
use crate::metrics::EvalSpec;
use crate::pipeline::{self, Progress};
use crate::submission;

/// evald: evaluates vendors' 3D segmentation models on a held-out CT test set.
#[derive(Debug, Parser)]
#[command(name = "evald", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score a folder of predictions against reference labels (nnU-Net naming).
    Score(ScoreArgs),
    /// Evaluate one submission folder (model.pt [+ submission.toml]) for a task.
    Run(RunArgs),
    /// Whole pipeline on generated phantoms and a generated model; no setup needed.
    Demo(DemoArgs),
    /// Run the service: watch the drop folder, evaluate, report (systemd unit).
    Serve(ConfigArgs),
    /// Check a configuration file; print every problem with its key (exit 2 on problems).
    CheckConfig(ConfigArgs),
    /// Queue, running evaluation, last results and outbox, from the store.
    Status(crate::daemon::StatusArgs),
    /// Evaluate a submission again, even if the same model was evaluated before.
    Requeue(crate::daemon::RequeueArgs),
    /// Paired comparison of two evaluations of the same test-set content (B - A).
    Compare(CompareArgs),
    /// Internal: a worker process of the pool (started by evald itself).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Test-only: start one sandboxed worker and probe what it can reach (JSON on stdout;
    /// exit code 1 when it is not confined).
    #[command(hide = true, name = "worker-selfcheck")]
    WorkerSelfcheck(SelfcheckArgs),
}

/// `evald worker` (internal).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Slot number given by the supervisor.
    #[arg(long, default_value_t = 0)]
    pub slot: usize,
}

/// `evald worker-selfcheck` (test-only).
#[derive(Debug, clap::Args)]
pub struct SelfcheckArgs {
    /// Images folder the worker may read.
    #[arg(long)]
    pub images: PathBuf,
    /// Labels folder the worker must not read.
    #[arg(long)]
    pub labels: PathBuf,
    /// `required`, `best-effort` or `off`.
    #[arg(long, default_value = "required")]
    pub sandbox: String,
}

/// `evald serve`, `evald check-config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// A command's wish for a specific exit status (e.g. 2 from `check-config` on problems);
/// `main` exits with it without printing anything more.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

/// `evald score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// Reference labels folder (`<case>.nii.gz`).
    #[arg(long)]
    pub labels: PathBuf,
    /// Predictions folder (`<case>.nii.gz`).
    #[arg(long)]
    pub predictions: PathBuf,
    /// Where to write summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Class labels to score, e.g. `1,2` (default: every label in the first reference).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u8>,
    /// Also write an Excel report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Skip surface distances (HD95, ASSD, NSD).
    #[arg(long)]
    pub no_surface: bool,
    /// Skip per-slice numbers.
    #[arg(long)]
    pub no_slices: bool,
    /// NSD tolerance in mm for every class.
    #[arg(long, default_value_t = 1.0)]
    pub nsd_tolerance: f64,
    /// Score lesion-wise for these labels.
    #[arg(long, value_delimiter = ',')]
    pub lesion_classes: Vec<u8>,
    /// Patient-level diagnosis on this label.
    #[arg(long)]
    pub positive_class: Option<u8>,
}

/// `evald run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Submission folder: the model (an nnU-Net folder, `model.pt`, ...) and optionally
    /// `submission.toml`.
    pub submission: PathBuf,
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Task (default: from the drop path `<drop>/<task>/<vendor>/<name>`, or the only task).
    #[arg(long)]
    pub task: Option<String>,
    /// Device (`cpu`, `cuda:0`): replaces `pool.devices` (default: the pool's devices;
    /// `cpu` with `--in-process`).
    #[arg(long)]
    pub device: Option<String>,
    /// Run the model inside this process instead of the sandboxed worker pool.
    #[arg(long)]
    pub in_process: bool,
    /// Write each case's predicted label map here as `<case>.nii.gz` (on the case's grid),
    /// to open in a viewer.
    #[arg(long, value_name = "DIR")]
    pub save_predictions: Option<PathBuf>,
}

/// `evald compare`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "A and B are each a summary.json, a folder holding one (a submission \
folder after `evald run` or the service), or a submission id (`12` or `#12`) of the store \
of --config. Differences are B - A, over the cases scored in both; cases failed in either \
are listed. Two evaluations are paired only when their test-set content hash is equal: \
otherwise evald exits with status 1 and says \"not paired: different test-set content\". \
Mean difference with a paired percentile bootstrap 95% CI (2000 resamples, fixed seed); \
two-sided Wilcoxon signed-rank p as scipy.stats.wilcoxon's defaults (zero differences \
dropped, average ranks for ties); patient level: McNemar exact on the discordant patients."
)]
pub struct CompareArgs {
    /// The earlier (reference) evaluation.
    pub a: String,
    /// The later evaluation.
    pub b: String,
    /// Configuration file (for submission ids: the store in its state folder).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print the comparison as JSON (summary.json's `evald.comparison` block).
    #[arg(long)]
    pub json: bool,
}

/// `evald demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where to put the generated data, submission and outputs.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Number of phantom cases.
    #[arg(long, default_value_t = 10)]
    pub cases: usize,
    /// Phantom grid `X,Y,Z`.
    #[arg(long, value_delimiter = ',', default_values_t = [192usize, 192, 48])]
    pub size: Vec<usize>,
}

/// Run the parsed command line.
///
/// # Errors
/// Anything that stops the command, with context.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => score(a),
        Command::Run(a) => run_submission(a).map(|_| ()),
        Command::Demo(a) => demo(a),
        Command::Serve(a) => crate::daemon::serve(&a.config),
        Command::CheckConfig(a) => match crate::daemon::check_config(&a.config)? {
            crate::daemon::ConfigCheck::Ok => Ok(()),
            crate::daemon::ConfigCheck::Problems(_) => Err(Exit(2).into()),
        },
        Command::Status(a) => crate::daemon::status(&a),
        Command::Requeue(a) => crate::daemon::requeue(&a),
        Command::Compare(a) => compare(&a),
        Command::Worker(a) => {
            let code = crate::worker::main(a.slot)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::WorkerSelfcheck(a) => crate::pool::selfcheck_cli(&a.images, &a.labels, &a.sandbox),
    }
}

/// A progress reporter: a bar on a terminal, one log line per case otherwise.
pub fn progress_reporter(what: &str) -> impl Fn(Progress) + Sync {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} cases, {elapsed} elapsed, ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    });
    move |p: Progress| match (&bar, p) {
        (Some(b), Progress::Start { total }) => b.set_length(total as u64),
        (Some(b), Progress::Scored { done, .. }) => {
            b.set_position(done as u64);
            if done as u64 == b.length().unwrap_or(0) {
                b.finish();
            }
        }
        (Some(b), Progress::Failed { failure, done }) => {
            b.println(format!(
                "case {} failed ({}): {}",
                failure.case, failure.stage, failure.reason
            ));
            b.set_position(done as u64);
        }
        (None, Progress::Start { total }) => tracing::info!(total, "evaluation started"),
        (None, Progress::Scored { case, dice, done }) => {
            tracing::info!(case, dice = format!("{dice:.4}"), done, "case scored")
        }
        (None, Progress::Failed { failure, done }) => tracing::warn!(
            case = failure.case,
            stage = failure.stage.as_str(),
            reason = failure.reason,
            done,
            "case failed"
        ),
    }
}

fn score(a: ScoreArgs) -> Result<()> {
    let data = dataset::pair_predictions(&a.predictions, &a.labels)?;
    for p in &data.problems {
        tracing::warn!("{p}");
    }
    if data.cases.is_empty() {
        bail!(
            "no case has both a prediction in {} and a reference in {} (expected <case>.nii.gz in both)",
            a.predictions.display(),
            a.labels.display()
        );
    }
    let classes = if a.classes.is_empty() {
        let first = crate::volume::read_labels(&data.cases[0].label)?;
        let mut seen = [false; 256];
        for &v in &first.data {
            seen[v as usize] = true;
        }
        (1..=255u8).filter(|&l| seen[l as usize]).collect()
    } else {
        a.classes.clone()
    };
    let names: Vec<(u8, String)> = classes.iter().map(|&l| (l, format!("label {l}"))).collect();
    let mut spec = EvalSpec::for_classes(
        &names
            .iter()
            .map(|(l, n)| (*l, n.as_str()))
            .collect::<Vec<_>>(),
    );
    spec.surface = !a.no_surface;
    spec.per_slice = !a.no_slices;
    spec.positive_class = a.positive_class;
    for c in &mut spec.classes {
        c.nsd_tolerance_mm = a.nsd_tolerance;
        c.lesion = a.lesion_classes.contains(&c.label);
    }
    let started = crate::evaluation::timestamp_now();
    let (cases, failures, times) =
        pipeline::score_folder(&data, &spec, &progress_reporter("scoring"));
    let meta = RunMeta {
        task: "score".into(),
        labels_dir: a.labels.clone(),
        inputs_dir: a.predictions.clone(),
        dataset_hash: dataset::manifest_hash(&data, None),
        evald_version: env!("CARGO_PKG_VERSION").into(),
        started,
        finished: crate::evaluation::timestamp_now(),
        timings: times.pairs(),
        ..Default::default()
    };
    let eval = Evaluation::new(spec, cases, failures, meta);
    crate::evaluation::summary::write(&eval, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    print_headline(&eval);
    println!("summary: {}", a.out.display());
    if let Some(r) = &a.report {
        crate::report::write(&eval, r).with_context(|| format!("writing {}", r.display()))?;
        println!("report: {}", r.display());
    }
    tracing::info!(
        cases = eval.cases.len(),
        failed = eval.failures.len(),
        seconds = format!("{:.2}", times.wall),
        "scored"
    );
    Ok(())
}

/// One side of `evald compare`: a summary.json, a folder with one, or a store id.
fn compare_side(what: &str, config: &Path) -> Result<crate::evaluation::compare::Side> {
    use crate::evaluation::compare::Side;
    let id = what.strip_prefix('#').unwrap_or(what);
    let path = Path::new(what);
    if !path.exists() {
        if let Ok(id) = id.parse::<i64>() {
            let settings = config::load(config)?;
            let store = crate::store::Store::open_read_only(&settings.daemon.state_dir)?
                .with_context(|| {
                    format!(
                        "no store in {} (submission #{id})",
                        settings.daemon.state_dir.display()
                    )
                })?;
            let sub = store.get(id)?;
            let results = store
                .results(id)?
                .with_context(|| format!("submission #{id} has no reported results"))?;
            let name = format!("#{id} {}/{}", sub.vendor, sub.name);
            return results.results.side(name.clone()).with_context(|| {
                format!("{name} was reported by an evald that kept no per-case values")
            });
        }
        bail!("{what}: no such file or folder, and not a submission id");
    }
    let file = if path.is_dir() {
        path.join("summary.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    Side::from_summary(&doc, what).with_context(|| format!("reading {}", file.display()))
}

/// `evald compare A B`.
fn compare(a: &CompareArgs) -> Result<()> {
    use crate::evaluation::compare::{self as cmp, Against};
    let before = compare_side(&a.a, &a.config)?;
    let after = compare_side(&a.b, &a.config)?;
    let c = match cmp::compare(&before, &after) {
        Against::Paired(c) => c,
        Against::Unpaired { .. } => bail!(
            "not paired: different test-set content ({} scored test set {}, {} test set {})",
            before.name,
            before
                .testset_hash
                .get(..12)
                .unwrap_or(&before.testset_hash),
            after.name,
            after.testset_hash.get(..12).unwrap_or(&after.testset_hash)
        ),
    };
    if a.json {
        let doc = crate::evaluation::summary::comparison_json(Some(&Against::Paired(c)));
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{} vs {}: {} paired cases (test set {})",
        c.after,
        c.before,
        c.paired_cases,
        c.testset_hash.get(..12).unwrap_or(&c.testset_hash)
    );
    for m in &c.metrics {
        println!("  {}", cmp::change_line(m));
    }
    if let Some(p) = &c.patient {
        println!(
            "  sensitivity {} -> {} ({} positives), McNemar exact p = {}",
            fixed(p.sensitivity_before, 3),
            fixed(p.sensitivity_after, 3),
            p.positives,
            fixed(p.sensitivity_p, 4)
        );
        println!(
            "  specificity {} -> {} ({} negatives), McNemar exact p = {}",
            fixed(p.specificity_before, 3),
            fixed(p.specificity_after, 3),
            p.negatives,
            fixed(p.specificity_p, 4)
        );
    }
    for f in &c.failed {
        let side =
            |s: Option<crate::evaluation::Stage>| s.map_or("scored".to_string(), |s| s.to_string());
        println!(
            "  failed: {} ({}: {}, {}: {})",
            f.case,
            c.before,
            side(f.before),
            c.after,
            side(f.after)
        );
    }
    for case in &c.scored_in_one_only {
        println!("  not paired: {case} (scored in one only)");
    }
    Ok(())
}

/// Print the headline numbers of an evaluation.
pub fn print_headline(eval: &Evaluation) {
    println!(
        "cases: {} scored, {} failed",
        eval.cases.len(),
        eval.failures.len()
    );
    for c in &eval.spec.classes {
        let Some(s) = eval.summary.per_class.get(&c.label) else {
            continue;
        };
        let get = |k: Metric, d| fixed(s.get(&k).map_or(f64::NAN, |s| s.mean), d);
        let dice = s.get(&Metric::Dice);
        println!(
            "  {:<12} Dice {} (95% CI {}-{})  IoU {}  HD95 {} mm  NSD {}",
            c.name,
            get(Metric::Dice, 4),
            fixed(dice.map_or(f64::NAN, |s| s.ci95_low), 4),
            fixed(dice.map_or(f64::NAN, |s| s.ci95_high), 4),
            get(Metric::IoU, 4),
            get(Metric::Hd95, 2),
            get(Metric::Nsd, 4),
        );
    }
    if let Some(p) = &eval.summary.patient {
        println!(
            "  patient-level ({}): sensitivity {}, specificity {} (TP {} FP {} FN {} TN {})",
            eval.class_name(p.positive_class),
            fixed(p.sensitivity, 3),
            fixed(p.specificity, 3),
            p.tp,
            p.fp,
            p.fn_,
            p.tn
        );
    }
    for f in &eval.failures {
        println!("  failed: {} ({}): {}", f.case, f.stage, f.reason);
    }
}

/// Resolve which task a submission belongs to.
///
/// # Errors
/// When the task is unknown or cannot be inferred.
pub fn resolve_task<'a>(
    settings: &'a Settings,
    submission: &Path,
    task: Option<&str>,
) -> Result<&'a TaskSettings> {
    if let Some(t) = task {
        return settings.tasks.get(t).with_context(|| {
            format!(
                "task '{t}' is not configured (known: {})",
                settings.task_names(", ")
            )
        });
    }
    let from_path = submission
        .canonicalize()
        .ok()
        .and_then(|p| crate::layout::named(&p).task);
    if let Some(t) = from_path.and_then(|t| settings.tasks.get(&t)) {
        return Ok(t);
    }
    if settings.tasks.len() == 1 {
        return Ok(settings.tasks.values().next().expect("one task"));
    }
    bail!(
        "cannot tell the task of {}: pass --task",
        submission.display()
    )
}

/// `evald run`: evaluate a submission in this process, write summary.json and report.
///
/// # Errors
/// Configuration, manifest or model problems (per-case problems are failures in the report).
pub fn run_submission(a: RunArgs) -> Result<Evaluation> {
    let settings = config::load(&a.config)?;
    let task = resolve_task(&settings, &a.submission, a.task.as_deref())?;
    // A DICOM test set is decoded (or taken from the cache) into its NIfTI view first.
    let ready = crate::testset::materialise(task, &settings.daemon.state_dir)?;
    let task = &ready.task;
    let sub = submission::prepare(&a.submission, task)?;
    let mut ctx = submission::RunContext::of(&settings);
    ctx.save_predictions = a.save_predictions.clone();
    let eval = if a.in_process {
        let device = a.device.clone().unwrap_or_else(|| "cpu".into());
        // The bytes that were hashed for the report are the bytes loaded.
        let model = Model::load_verified_as(
            sub.format,
            &sub.model_path,
            &sub.model_sha256,
            &device,
            sub.infer.clone(),
        )?;
        let backend = InProcess::new(model, &device);
        submission::evaluate(
            &sub,
            task,
            &backend,
            &ctx,
            &progress_reporter("evaluating"),
            &AtomicBool::new(false),
        )?
    } else {
        evaluate_with_backend(
            &settings,
            &sub,
            task,
            a.device.as_deref(),
            &ctx,
            &progress_reporter("evaluating"),
        )?
    };
    if let Some(d) = &a.save_predictions {
        println!("predictions: {}", d.display());
    }
    let (summary, report) = submission::write_outputs(&eval, &a.submission)?;
    print_headline(&eval);
    println!("summary: {}", summary.display());
    println!("report: {}", report.display());
    match crate::mail::send_now(&eval, &task.recipients, Some(&report), &settings) {
        Ok(sent) => println!("email: {sent}"),
        Err(e) => println!("email: not sent: {e}"),
    }
    Ok(eval)
}

/// Evaluate a prepared submission with the configured execution backend (`device`
/// replaces `pool.devices` when given), on a snapshot of its model in a scratch folder of
/// this run. Logs forward time against wall time.
fn evaluate_with_backend(
    settings: &Settings,
    sub: &submission::Prepared,
    task: &TaskSettings,
    device: Option<&str>,
    ctx: &submission::RunContext,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<Evaluation> {
    let mut settings = settings.clone();
    if let Some(d) = device {
        settings.pool.devices = vec![d.to_string()];
    }
    let scratch = tempfile::Builder::new()
        .prefix("evald-pool-")
        .tempdir()
        .context("creating the workers' scratch folder")?;
    // Workers load this copy, never the file a vendor may still be replacing.
    let model = sub.snapshot(&scratch.path().join("models"))?;
    let t0 = Instant::now();
    let backend = crate::backend::start(&settings, &sub.job(&model, task, scratch.path()))
        .with_context(|| format!("starting the workers for {}", sub.model_path.display()))?;
    let started = t0.elapsed().as_secs_f64();
    let eval = submission::evaluate(
        sub,
        task,
        backend.as_ref(),
        ctx,
        on_progress,
        &AtomicBool::new(false),
    )?;
    backend
        .totals()
        .log(backend.workers(), started, t0.elapsed().as_secs_f64());
    Ok(eval)
}

fn demo(a: DemoArgs) -> Result<()> {
    let [x, y, z] = <[usize; 3]>::try_from(a.size.as_slice())
        .map_err(|_| anyhow::anyhow!("--size takes three numbers X,Y,Z"))?;
    let root = &a.out;
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("clearing {}", root.display()))?;
    }
    let data = root.join("data");
    println!(
        "generating {} phantom cases of {x}x{y}x{z} in {}",
        a.cases,
        data.display()
    );
    let set = crate::phantom::generate(&data, a.cases, [x, y, z], [0.8, 0.8, 2.5], 2026)?;
    // The vendor's files, staged outside the drop folder; the service receives them.
    let staging = root.join("staging/v1");
    std::fs::create_dir_all(&staging)?;
    crate::phantom::write_demo_model(&staging.join("model.pt"))?;
    std::fs::write(
        staging.join("submission.toml"),
        "input = \"slices2d\"\noutput = \"logits\"\nbatch_size = 8\n",
    )?;
    let cfg = root.join("evald.toml");
    std::fs::write(&cfg, demo_config(root, &set.images, &set.labels))?;
    let settings = config::load(&cfg)?;
    std::fs::create_dir_all(&settings.daemon.drop_dir)?;
    let dest = settings.daemon.drop_dir.join("thyroid-ca/demo-vendor/v1");
    println!("starting the service on {}", cfg.display());
    let out = crate::daemon::run_demo(
        settings,
        &staging,
        &dest,
        std::time::Duration::from_secs(600),
    )?;
    if out.evaluation.cases.is_empty() {
        bail!("demo scored no case");
    }
    print_headline(&out.evaluation);
    println!("summary: {}", out.summary.display());
    println!("report: {}", out.report.display());
    // Mail (issue 4) is not merged yet: no email line until it writes one.
    if let Some(e) = &out.email {
        println!("email: {}", e.display());
    }
    Ok(())
}

/// The demo's configuration (embedded defaults + the generated task).
pub fn demo_config(root: &Path, images: &Path, labels: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let root = abs(root);
    format!(
        r#"# Generated by `evald demo`.
[daemon]
drop_dir = "{drop}"
state_dir = "{state}"
log_dir = "{logs}"
settle_secs = 1
rescan_secs = 5

[pool]
workers = 2
devices = ["cpu"]
case_timeout_secs = 120

[mail]
transport = "file"
outbox_dir = "{outbox}"
from = "evald demo <evald@localhost>"

[tasks.thyroid-ca]
images = "{images}"
labels = "{labels}"
classes = {{ 1 = "thyroid", 2 = "nodule" }}
window = {{ level = 40, width = 400 }}
input = "slices2d"
positive_class = 2
lesion_classes = [2]
nsd_tolerance_mm = {{ 1 = 1.0, 2 = 1.0 }}
recipients = ["ai-eval@example.org"]
"#,
        drop = root.join("drop").display(),
        state = root.join("state").display(),
        logs = root.join("logs").display(),
        outbox = root.join("outbox").display(),
        images = abs(images).display(),
        labels = abs(labels).display(),
    )
}
