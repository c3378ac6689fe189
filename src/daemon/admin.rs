//! What the admin runs next to the service: `evald check-config`, `evald status`,
//! `evald requeue ID`. All read the same configuration file as the service and the store
//! in its `state_dir`; none needs the service to be running.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{self, ConfigError, MailTransport, Problem, Settings};
use crate::logging::printable;
use crate::store::{State, Store, Submission};

/// `evald status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Configuration file (for the state folder).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// How many recent results to show.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `evald requeue`.
#[derive(Debug, clap::Args)]
pub struct RequeueArgs {
    /// Submission id (from `evald status`).
    pub id: i64,
    /// Configuration file (for the state folder).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// Every problem of a configuration file, with its key: parsing, validation and the
/// service's folders. Empty when the service can start with it.
///
/// # Errors
/// None besides what is listed; the `Result` carries the validated settings when clean.
pub fn config_problems(path: &Path) -> std::result::Result<Settings, Vec<Problem>> {
    let raw = match config::load_raw(path) {
        Ok(r) => r,
        Err(ConfigError::Load { message, .. }) => {
            return Err(vec![Problem {
                key: "(file)".into(),
                message,
            }])
        }
        Err(ConfigError::Invalid { problems, .. }) => return Err(problems),
    };
    let mut problems = super::path_problems(&raw.daemon);
    match raw.validate(path) {
        Ok(s) if problems.is_empty() => Ok(s),
        Ok(_) => Err(problems),
        Err(ConfigError::Invalid {
            problems: mut p, ..
        }) => {
            p.append(&mut problems);
            Err(p)
        }
        Err(ConfigError::Load { message, .. }) => {
            problems.insert(
                0,
                Problem {
                    key: "(file)".into(),
                    message,
                },
            );
            Err(problems)
        }
    }
}

/// What `evald check-config` found (the command line turns problems into exit status 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigCheck {
    /// Every key is valid and every test set opens.
    Ok,
    /// This many problems were printed.
    Problems(usize),
}

/// `evald check-config`: print every problem with its key, or a short summary of what the
/// service will do. Never prints the SMTP password (it is never read here).
///
/// # Errors
/// None today beyond printing; problems are [`ConfigCheck::Problems`], not errors.
pub fn check_config(path: &Path) -> Result<ConfigCheck> {
    let mut notes = BTreeMap::new();
    let checked = config_problems(path).and_then(|s| {
        let p = test_set_problems(&s, &mut notes);
        if p.is_empty() {
            Ok(s)
        } else {
            Err(p)
        }
    });
    match checked {
        Ok(s) => {
            println!("{}: OK", path.display());
            println!("  drop folder:  {}", s.daemon.drop_dir.display());
            println!("  state folder: {}", s.daemon.state_dir.display());
            println!("  log folder:   {}", s.daemon.log_dir.display());
            println!(
                "  watch:        {:?}, settle {} s, rescan every {} s",
                s.daemon.watch,
                s.daemon.settle.as_secs(),
                s.daemon.rescan.as_secs()
            );
            println!(
                "  pool:         {} worker(s) on {}",
                s.pool.workers,
                s.pool.devices.join(", ")
            );
            match &s.mail.transport {
                MailTransport::File => println!(
                    "  mail:         .eml files in {}",
                    s.mail.outbox_dir.display()
                ),
                MailTransport::Smtp {
                    host,
                    port,
                    security,
                    auth,
                    ..
                } => println!(
                    "  mail:         smtp {host}:{port} ({security:?}){}",
                    auth.as_ref().map_or(String::new(), |(user, file)| format!(
                        ", user {user}, password from {}",
                        file.display()
                    ))
                ),
            }
            for (name, t) in &s.tasks {
                let cases = match notes.remove(name) {
                    Some(note) => note,
                    None => format!(
                        "{} case(s)",
                        crate::dataset::pair_cases(&t.images, &t.labels)
                            .map_or(0, |d| d.cases.len())
                    ),
                };
                println!(
                    "  task {name}: {cases}, classes {}, mail to {}",
                    t.eval
                        .classes
                        .iter()
                        .map(|c| format!("{}={}", c.label, c.name))
                        .collect::<Vec<_>>()
                        .join(" "),
                    if t.recipients.is_empty() {
                        "nobody".to_string()
                    } else {
                        t.recipients.join(", ")
                    }
                );
            }
            Ok(ConfigCheck::Ok)
        }
        Err(problems) => {
            println!("{}: {} problem(s):", path.display(), problems.len());
            for p in &problems {
                println!("  {}: {}", p.key, p.message);
            }
            Ok(ConfigCheck::Problems(problems.len()))
        }
    }
}

/// Every task's test set, opened as the evaluation will: each reference label and image
/// header must be readable (a broken reference is the evaluation team's to fix, and is
/// better found here than blamed on a vendor's model).
///
/// A DICOM task's set is read case by case (decoded, nothing written): a segment / ROI the
/// mapping lacks is a problem; the counts and each refused case go into `notes` (a refused
/// case is scored as a failure, it does not stop the service).
fn test_set_problems(s: &Settings, notes: &mut BTreeMap<String, String>) -> Vec<Problem> {
    const LISTED: usize = 10;
    let mut out = Vec::new();
    for (name, t) in &s.tasks {
        if t.format == config::TestSetFormat::Dicom {
            match crate::dicom::import::inspect(&t.labels, t.dicom_classes.as_ref()) {
                Ok(ins) => {
                    let mut note = format!(
                        "DICOM, {} case folder(s), {} series, {} read, {} refused",
                        ins.cases,
                        ins.series,
                        ins.accepted,
                        ins.refused.len()
                    );
                    for e in &ins.refused {
                        if e.refusal.reason() == crate::dicom::Reason::Unmapped {
                            out.push(Problem {
                                key: format!("tasks.{name}.dicom_classes"),
                                message: e.to_string(),
                            });
                        } else {
                            note.push_str(&format!("\n    refused: {e}"));
                        }
                    }
                    if ins.cases == 0 {
                        out.push(Problem {
                            key: format!("tasks.{name}.labels"),
                            message: format!(
                                "{}: no case folders (one folder per case: its CT series and \
                                 its SEG or RTSTRUCT)",
                                t.labels.display()
                            ),
                        });
                    }
                    notes.insert(name.clone(), note);
                }
                Err(e) => out.push(Problem {
                    key: format!("tasks.{name}.labels"),
                    message: e.to_string(),
                }),
            }
            continue;
        }
        let data = match crate::dataset::pair_cases(&t.images, &t.labels) {
            Ok(d) => d,
            Err(e) => {
                out.push(Problem {
                    key: format!("tasks.{name}.labels"),
                    message: e.to_string(),
                });
                continue;
            }
        };
        let mut bad = Vec::new();
        for c in &data.cases {
            for (what, file) in [("labels", &c.label), ("images", &c.input)] {
                if let Err(e) = crate::volume::read_geometry(file) {
                    bad.push((what, e.to_string()));
                }
            }
        }
        let n = bad.len();
        for (what, message) in bad.into_iter().take(LISTED) {
            out.push(Problem {
                key: format!("tasks.{name}.{what}"),
                message,
            });
        }
        if n > LISTED {
            out.push(Problem {
                key: format!("tasks.{name}"),
                message: format!("{} more unreadable files", n - LISTED),
            });
        }
    }
    out
}

fn state_dir(config_path: &Path) -> Result<PathBuf> {
    // Only the state folder is needed: a config with, say, a missing test set still works.
    let raw = config::load_raw(config_path)?;
    Ok(raw.daemon.state_dir)
}

/// Everything `evald status` shows.
#[derive(Debug, serde::Serialize)]
struct StatusReport {
    store: PathBuf,
    /// Whether an `evald serve` holds the state folder's lock now.
    service_running: bool,
    counts: Vec<(State, u64)>,
    running: Vec<Submission>,
    queue: Vec<Submission>,
    recent: Vec<Submission>,
    /// What the store keeps of each recent reported result, with the change against the
    /// vendor's previous reported submission of the task.
    results: Vec<RecentResult>,
    /// Messages per outbox state (`None`: no outbox yet).
    outbox: Option<Vec<(String, u64)>>,
}

/// One recent reported result, as `evald status --json` shows it.
#[derive(Debug, serde::Serialize)]
struct RecentResult {
    id: i64,
    model_sha256: Option<String>,
    testset_hash: String,
    cases_scored: u64,
    cases_failed: u64,
    stopped_early: Option<String>,
    /// Per class name: mean Dice (null when undefined).
    dice: std::collections::BTreeMap<String, Option<f64>>,
    previous: Option<PreviousResult>,
    /// The line shown in the text output.
    #[serde(skip)]
    line: String,
}

/// The vendor's previous reported submission of the task, against which a result compares.
#[derive(Debug, serde::Serialize)]
struct PreviousResult {
    id: i64,
    name: String,
    /// Scored on the same test-set bytes (only then are changes given).
    comparable: bool,
    /// Per class name: change of the mean Dice (null when undefined in either).
    dice_change: std::collections::BTreeMap<String, Option<f64>>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The stored results of `s` with the change against its previous submission; `None` for
/// rows without results (not reported, or reported before the store kept results).
fn recent_result(store: &Store, s: &Submission) -> Result<Option<RecentResult>> {
    let Some(stored) = store.results(s.id)? else {
        return Ok(None);
    };
    let r = &stored.results;
    let classes = &r.statistics.classes;
    let dice = classes
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                finite(r.mean(c.label, crate::metrics::aggregate::Metric::Dice)),
            )
        })
        .collect();
    let mut line = format!(
        "Dice {}; {}/{} cases scored",
        classes
            .iter()
            .map(|c| format!(
                "{} {}",
                c.name,
                crate::evaluation::fixed(
                    r.mean(c.label, crate::metrics::aggregate::Metric::Dice),
                    3
                )
            ))
            .collect::<Vec<_>>()
            .join(", "),
        r.cases_scored,
        r.cases_scored + r.cases_failed
    );
    if let Some(why) = &r.stopped_early {
        let _ = write!(line, "; stopped early: {why}");
    }
    let previous = store.previous_results(s.id)?.map(|(p, pr)| {
        let comparable = r.comparable_with(&pr.results);
        let dice_change: std::collections::BTreeMap<String, Option<f64>> = if comparable {
            classes
                .iter()
                .map(|c| {
                    let d = r.mean(c.label, crate::metrics::aggregate::Metric::Dice)
                        - pr.results
                            .mean(c.label, crate::metrics::aggregate::Metric::Dice);
                    (c.name.clone(), finite(d))
                })
                .collect()
        } else {
            Default::default()
        };
        if comparable {
            let _ = write!(
                line,
                "; vs {} (#{}): {}",
                p.name,
                p.id,
                dice_change
                    .iter()
                    .map(|(n, d)| format!("{n} {}", d.map_or("n/a".into(), |d| format!("{d:+.3}"))))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else {
            let _ = write!(
                line,
                "; vs {} (#{}): other test set, not compared",
                p.name, p.id
            );
        }
        PreviousResult {
            id: p.id,
            name: p.name,
            comparable,
            dice_change,
        }
    });
    Ok(Some(RecentResult {
        id: s.id,
        model_sha256: r.model_sha256.clone(),
        testset_hash: r.testset_hash.clone(),
        cases_scored: r.cases_scored,
        cases_failed: r.cases_failed,
        stopped_early: r.stopped_early.clone(),
        dice,
        previous,
        line,
    }))
}

/// `#id task/vendor/name`, escaped: folder names are the vendors' (a newline in one must
/// not print as a forged second line).
fn who(s: &Submission) -> String {
    printable(&format!("#{} {}/{}/{}", s.id, s.task, s.vendor, s.name)).into_owned()
}

/// Print `text` to stdout; a reader that went away (`evald status | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `evald status`: queue, running evaluation with progress, last results, outbox.
///
/// # Errors
/// Unreadable configuration or store.
pub fn status(a: &StatusArgs) -> Result<()> {
    let dir = state_dir(&a.config)?;
    let Some(store) = Store::open_existing(&dir)? else {
        if a.json {
            println!("null");
        } else {
            println!(
                "no store yet in {} (evald serve has not run with this configuration)",
                dir.display()
            );
        }
        return Ok(());
    };
    let recent = store.recent_results(a.last)?;
    let mut results = Vec::new();
    for s in &recent {
        if matches!(s.state, State::Reported | State::Mailed) {
            results.extend(recent_result(&store, s)?);
        }
    }
    let outbox = crate::mail::outbox_counts(store.connection_ref())?.map(|c| {
        c.into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect()
    });
    let r = StatusReport {
        store: store.path().to_path_buf(),
        service_running: super::service_running(&dir),
        counts: store.counts()?,
        running: store.in_state(State::Running)?,
        queue: store.in_state(State::Queued)?,
        recent,
        results,
        outbox,
    };
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&r)?));
    }
    let mut o = String::new();
    let _ = writeln!(o, "store: {}", r.store.display());
    let _ = writeln!(
        o,
        "submissions: {}",
        r.counts
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if r.running.is_empty() {
        let _ = writeln!(o, "running: nothing");
    }
    if !r.service_running && !r.running.is_empty() {
        let _ = writeln!(
            o,
            "no evald serve is running on this state folder: the evaluation below was \
             interrupted and runs again from the start at the next start"
        );
    }
    for s in &r.running {
        let pct = (s.progress_done * 100)
            .checked_div(s.progress_total)
            .map_or(String::new(), |p| format!(" ({p}%)"));
        let _ = writeln!(
            o,
            "running: {}  {}/{} cases{pct}, started {}, attempt {}",
            who(s),
            s.progress_done,
            s.progress_total,
            s.started_at.as_deref().unwrap_or("?"),
            s.attempts
        );
    }
    let _ = writeln!(
        o,
        "queue:{}",
        if r.queue.is_empty() { " empty" } else { "" }
    );
    for (i, s) in r.queue.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {}. {}  since {}{}",
            i + 1,
            who(s),
            s.updated_at,
            s.error
                .as_deref()
                .map_or(String::new(), |e| format!("  ({})", printable(e)))
        );
    }
    let _ = writeln!(o, "last results:");
    for s in &r.recent {
        let what = match s.state {
            State::Reported | State::Mailed => {
                // From the stored results; rows reported before the store kept them have
                // their one-line headline only.
                let line = r
                    .results
                    .iter()
                    .find(|x| x.id == s.id)
                    .map_or(s.headline.as_deref().unwrap_or_default(), |x| {
                        x.line.as_str()
                    });
                printable(line).into_owned()
            }
            _ => printable(s.error.as_deref().unwrap_or_default()).into_owned(),
        };
        let _ = writeln!(
            o,
            "  {}  {:<8}  {}  {}",
            who(s),
            s.state.as_str(),
            s.finished_at.as_deref().unwrap_or(&s.updated_at),
            what
        );
    }
    match &r.outbox {
        Some(counts) => drop(writeln!(
            o,
            "outbox: {}",
            counts
                .iter()
                .map(|(s, n)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => {
            let _ = writeln!(o, "outbox: none yet");
        }
    }
    emit(&o)
}

/// `evald requeue ID`: evaluate a submission again, even if the same model was evaluated.
/// The running service picks it up within seconds (or at its next start).
///
/// # Errors
/// Unknown id, a submission that is queued or running already, or an unreadable store.
pub fn requeue(a: &RequeueArgs) -> Result<()> {
    let dir = state_dir(&a.config)?;
    let mut store = Store::open_existing(&dir)?
        .with_context(|| format!("no store in {} (evald serve has not run)", dir.display()))?;
    let s = store.requeue(a.id)?;
    println!("{} queued again", who(&s));
    Ok(())
}
