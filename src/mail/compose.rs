//! Composing the summary email of one evaluation: subject with the headline, text and HTML
//! alternatives (per-class table, patient-level diagnosis, change against the vendor's
//! previous submission, failures), the Dice plot inline (`cid:`), the workbook attached
//! under the size cap (otherwise the body says where it is).
//!
//! MIME layout (what mail clients show best):
//! ```text
//! multipart/mixed
//! ├── multipart/alternative
//! │   ├── text/plain
//! │   └── multipart/related
//! │       ├── text/html            (<img src="cid:dice-plot">)
//! │       └── image/png            inline, Content-ID <dice-plot>
//! └── application/vnd.openxmlformats-officedocument.spreadsheetml.sheet  (report.xlsx)
//! ```
//! The HTML is also well-formed XML (every tag closed, only numeric entities), so a strict
//! parser can check it; all data-derived text is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::Message;

use crate::config::MailSettings;
use crate::evaluation::fixed as f;
use crate::evaluation::Evaluation;
use crate::metrics::aggregate::{Metric, Stats};
use crate::store::EvaluationResults;

/// Content-ID of the inline plot.
pub const PLOT_CID: &str = "dice-plot";
/// MIME type of the attached workbook.
pub const XLSX_MIME: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

/// Composing failed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// No recipient.
    #[error("no recipient for the email of {what}: set recipients in the task's config")]
    NoRecipients {
        /// `task / vendor / submission`.
        what: String,
    },
    /// An address does not parse.
    #[error("'{address}' ({role}) is not a mailbox: {reason}")]
    Address {
        /// The address as configured.
        address: String,
        /// `from` or `recipient`.
        role: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// lettre refused to build the message.
    #[error("building the email of {what}: {source}")]
    Build {
        /// `task / vendor / submission`.
        what: String,
        /// lettre's error.
        #[source]
        source: lettre::error::Error,
    },
}

/// The vendor's previous reported submission for the same task, as the store keeps its
/// results ([`crate::store::Store::previous_results`]): the email shows the change against
/// it, when both scored the same test set.
#[derive(Debug, Clone, PartialEq)]
pub struct Previous {
    /// Its submission name (folder), e.g. `v2`.
    pub submission: String,
    /// Per class label: metric key -> mean over cases (NaN when undefined).
    pub means: BTreeMap<u8, BTreeMap<Metric, f64>>,
    /// `foreground_mean`: metric key -> value.
    pub foreground: BTreeMap<Metric, f64>,
    /// Patient-level (sensitivity, specificity), when computed.
    pub patient: Option<(f64, f64)>,
    /// Cases scored.
    pub cases_scored: usize,
    /// Cases failed.
    pub cases_failed: usize,
    /// Content hash of the test set it was scored on: the change is shown only against the
    /// same bytes.
    pub testset_hash: String,
}

impl Previous {
    /// What the email compares, from a submission's stored results.
    pub fn from_results(submission: impl Into<String>, r: &EvaluationResults) -> Self {
        let st = &r.statistics;
        Previous {
            submission: submission.into(),
            means: st
                .per_class
                .iter()
                .map(|(l, m)| (*l, m.iter().map(|(k, s)| (*k, s.mean)).collect()))
                .collect(),
            foreground: st.foreground_mean.clone(),
            patient: st.patient.map(|p| (p.sensitivity, p.specificity)),
            cases_scored: r.cases_scored as usize,
            cases_failed: r.cases_failed as usize,
            testset_hash: r.testset_hash.clone(),
        }
    }

    /// Whether `eval` scored the same test-set bytes as this submission.
    pub fn comparable_with(&self, eval: &Evaluation) -> bool {
        !self.testset_hash.is_empty() && self.testset_hash == eval.meta.dataset_hash
    }

    fn mean(&self, label: u8, key: Metric) -> f64 {
        self.means
            .get(&label)
            .and_then(|m| m.get(&key))
            .copied()
            .unwrap_or(f64::NAN)
    }
}

/// The paired comparison's lines (text; the HTML shows the same lines): a heading, one
/// line per class and metric ("nodule Dice +0.021 (95% CI +0.008 to +0.034), p = 0.003,
/// 300 paired cases"), the patient-level change with McNemar's p, the cases failed in
/// either; or the sentence saying why it is not paired. Empty without a comparison.
fn paired_lines(eval: &Evaluation) -> Vec<String> {
    use crate::evaluation::compare::{change_line, p_text, Against};
    let mut out = Vec::new();
    match &eval.comparison {
        None => {}
        Some(Against::Unpaired { reason, .. }) => {
            out.push(format!("Paired comparison: {reason}."));
            out.push(String::new());
        }
        Some(Against::Paired(c)) => {
            out.push(format!(
                "Paired comparison with {} ({} cases scored in both; bootstrap 95% CI, Wilcoxon signed-rank p):",
                c.before, c.paired_cases
            ));
            for m in &c.metrics {
                out.push(format!("  {}", change_line(m)));
            }
            if let Some(p) = &c.patient {
                out.push(format!(
                    "  patient sensitivity {} -> {} (McNemar exact {}), specificity {} -> {} (McNemar exact {})",
                    f(p.sensitivity_before, 3),
                    f(p.sensitivity_after, 3),
                    p_text(Some(p.sensitivity_p)),
                    f(p.specificity_before, 3),
                    f(p.specificity_after, 3),
                    p_text(Some(p.specificity_p))
                ));
            }
            if !c.failed.is_empty() {
                let names: Vec<&str> = c.failed.iter().map(|x| x.case.as_str()).collect();
                out.push(format!(
                    "  not paired, failed in either ({}): {}",
                    names.len(),
                    names.join(", ")
                ));
            }
            out.push(String::new());
        }
    }
    out
}

/// The sentence shown instead of the change when the previous submission was scored on
/// other test-set bytes.
fn not_comparable(prev: &Previous, eval: &Evaluation) -> String {
    format!(
        "No change against {} (the vendor's previous submission) is shown: it was scored on a \
         different test set ({}; this one {}).",
        prev.submission,
        short(&prev.testset_hash),
        short(&eval.meta.dataset_hash)
    )
}

/// What happened to the workbook in the email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportInMail {
    /// Attached (file name, bytes).
    Attached {
        /// Where it was read from.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Larger than the cap: the body gives its path.
    TooLarge {
        /// Where it is.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The cap.
        cap: u64,
    },
    /// Could not be read: the body says so and where it should be.
    Unreadable {
        /// Where it should be.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// No report was written (e.g. none requested).
    None,
}

/// A composed email: the message and what went into it (for logs and tests).
#[derive(Debug, Clone)]
pub struct Composed {
    /// The message, ready for the outbox.
    pub message: Message,
    /// Its subject.
    pub subject: String,
    /// The text alternative.
    pub text: String,
    /// The HTML alternative.
    pub html: String,
    /// The inline plot, when it could be drawn.
    pub plot_png: Option<Vec<u8>>,
    /// The workbook's fate.
    pub report: ReportInMail,
    /// A short file-name-safe label (`thyroid-ca_acme_v3`) for `.eml` names and logs.
    pub label: String,
}

fn stat(eval: &Evaluation, label: u8, key: Metric) -> Option<&Stats> {
    eval.summary.per_class.get(&label)?.get(&key)
}

/// The class the subject names beside the headline: the patient-level class when set
/// (what the program is about, e.g. the nodule), else the weakest class.
fn focus_class(eval: &Evaluation) -> Option<(String, f64)> {
    if eval.spec.classes.len() < 2 {
        return None;
    }
    let pick = eval
        .spec
        .positive_class
        .filter(|l| eval.spec.classes.iter().any(|c| c.label == *l))
        .or_else(|| {
            eval.spec
                .classes
                .iter()
                .map(|c| (c.label, eval.class_mean(c.label, Metric::Dice)))
                .filter(|(_, d)| d.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(l, _)| l)
        })?;
    Some((eval.class_name(pick), eval.class_mean(pick, Metric::Dice)))
}

/// `[evald] thyroid-ca / acme / v3: Dice 0.912 (nodule 0.81), 300/300 cases`.
pub fn subject(eval: &Evaluation) -> String {
    let total = eval.total_cases();
    let scored = eval.cases.len();
    if scored == 0 {
        return format!("[evald] {}: no case scored, 0/{total} cases", eval.who());
    }
    let mut s = format!(
        "[evald] {}: Dice {}",
        eval.who(),
        f(eval.headline_dice().0, 3)
    );
    if let Some((name, d)) = focus_class(eval) {
        let _ = write!(s, " ({name} {})", f(d, 2));
    }
    let _ = write!(s, ", {scored}/{total} cases");
    s
}

fn label_of(eval: &Evaluation) -> String {
    safe_label(&eval.who())
}

fn safe_label(who: &str) -> String {
    let raw = who.replace(" / ", "_");
    let safe: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    safe.chars().take(80).collect()
}

/// Escape text for HTML (element content and attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MB", n as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.0} kB", (n as f64 / 1024.0).ceil())
    }
}

/// Is a higher value better for this metric? (For the colour of a change.)
fn higher_is_better(key: Metric) -> bool {
    !key.is_distance()
}

/// A signed change with its direction: ("+0.012", Some(true)) when better.
fn change(now: f64, before: f64, key: Metric, d: usize) -> (String, Option<bool>) {
    if !(now.is_finite() && before.is_finite()) {
        return ("n/a".into(), None);
    }
    let delta = now - before;
    let text = format!("{delta:+.d$}");
    let zero = format!("{:+.d$}", 0.0);
    if text == zero || text == format!("{:+.d$}", -0.0) {
        return (format!("{:.d$}", 0.0), None);
    }
    (text, Some((delta > 0.0) == higher_is_better(key)))
}

/// A 95% CI as `low<sep>high`, or "n/a" when undefined.
fn ci((lo, hi): (f64, f64), sep: &str) -> String {
    if lo.is_finite() && hi.is_finite() {
        format!("{lo:.3}{sep}{hi:.3}")
    } else {
        "n/a".into()
    }
}

/// "present (any voxel)" or "present with at least N mm³".
fn presence(min_mm3: f64, cube: &str) -> String {
    if min_mm3 > 0.0 {
        format!("at least {min_mm3} mm{cube}")
    } else {
        "any voxel".into()
    }
}

/// The numbers both bodies show, computed once.
struct Facts {
    who: String,
    rows: Vec<ClassRow>,
    foreground: [f64; 4],
}

struct ClassRow {
    label: u8,
    name: String,
    n: usize,
    n_nan: usize,
    means: [f64; 4],
    dice_ci: (f64, f64),
}

const HEAD_KEYS: [Metric; 4] = [Metric::Dice, Metric::IoU, Metric::Hd95, Metric::Nsd];
const HEAD_DECIMALS: [usize; 4] = [3, 3, 2, 3];

fn facts(eval: &Evaluation) -> Facts {
    let rows = eval
        .spec
        .classes
        .iter()
        .map(|c| {
            let d = stat(eval, c.label, Metric::Dice);
            ClassRow {
                label: c.label,
                name: c.name.clone(),
                n: d.map_or(0, |s| s.n),
                n_nan: d.map_or(0, |s| s.n_nan),
                means: HEAD_KEYS.map(|k| eval.class_mean(c.label, k)),
                dice_ci: d.map_or((f64::NAN, f64::NAN), |s| (s.ci95_low, s.ci95_high)),
            }
        })
        .collect();
    let foreground = HEAD_KEYS.map(|k| {
        eval.summary
            .foreground_mean
            .get(&k)
            .copied()
            .unwrap_or(f64::NAN)
    });
    Facts {
        who: eval.who(),
        rows,
        foreground,
    }
}

fn report_sentence(r: &ReportInMail) -> Option<String> {
    match r {
        ReportInMail::Attached { path, bytes } => Some(format!(
            "The full report is attached ({}, {}); it is also at {}.",
            path.file_name()
                .map_or_else(|| "report.xlsx".into(), |n| n.to_string_lossy().into_owned()),
            human_bytes(*bytes),
            path.display()
        )),
        ReportInMail::TooLarge { path, bytes, cap } => Some(format!(
            "The full report is {} (over the {} attachment limit), so it is not attached: open it at {}.",
            human_bytes(*bytes),
            human_bytes(*cap),
            path.display()
        )),
        ReportInMail::Unreadable { path, reason } => Some(format!(
            "The report could not be attached ({reason}); it should be at {}.",
            path.display()
        )),
        ReportInMail::None => None,
    }
}

fn conventions_line(eval: &Evaluation) -> String {
    let classes = &eval.spec.classes;
    let tol = match classes.first() {
        Some(c0)
            if classes
                .iter()
                .all(|c| c.nsd_tolerance_mm == c0.nsd_tolerance_mm) =>
        {
            format!("{} mm", c0.nsd_tolerance_mm)
        }
        _ => classes
            .iter()
            .map(|c| format!("{} {} mm", c.name, c.nsd_tolerance_mm))
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        "Conventions: Dice/IoU as nnU-Net (undefined when both masks are empty, excluded from means); HD95 as MONAI (max of the two directed 95th percentiles); NSD as DeepMind at {tol}; 95% CIs by percentile bootstrap (2000 resamples, fixed seed)."
    )
}

/// The text alternative.
fn text_body(
    eval: &Evaluation,
    fx: &Facts,
    prev: Option<&Previous>,
    report: &ReportInMail,
) -> String {
    let mut t = String::new();
    let m = &eval.meta;
    let _ = writeln!(t, "evald evaluated {}.", fx.who);
    let _ = writeln!(
        t,
        "{} of {} cases scored, {} failed.",
        eval.cases.len(),
        eval.total_cases(),
        eval.failures.len()
    );
    if let Some(why) = &m.stopped_early {
        let _ = writeln!(
            t,
            "STOPPED EARLY: {why}; the cases not run are listed as failed."
        );
    }
    if let Some(sha) = &m.model_sha256 {
        let _ = writeln!(t, "Model sha256: {sha}");
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "Per class (mean over cases, 95% CI of the mean Dice):");
    let mut table: Vec<[String; 7]> = vec![[
        "class".into(),
        "Dice".into(),
        "95% CI".into(),
        "IoU".into(),
        "HD95 mm".into(),
        "NSD".into(),
        "cases".into(),
    ]];
    for r in &fx.rows {
        let cases = if r.n_nan > 0 {
            format!("{} ({} undefined)", r.n, r.n_nan)
        } else {
            r.n.to_string()
        };
        table.push([
            r.name.clone(),
            f(r.means[0], 3),
            ci(r.dice_ci, "-"),
            f(r.means[1], 3),
            f(r.means[2], 2),
            f(r.means[3], 3),
            cases,
        ]);
    }
    if fx.rows.len() > 1 {
        table.push([
            "foreground".into(),
            f(fx.foreground[0], 3),
            String::new(),
            f(fx.foreground[1], 3),
            f(fx.foreground[2], 2),
            f(fx.foreground[3], 3),
            String::new(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
                line.push_str("  ");
            }
        }
        let _ = writeln!(t, "{}", line.trim_end());
    }
    let _ = writeln!(t);
    if let Some(p) = &eval.summary.patient {
        let _ = writeln!(
            t,
            "Patient-level diagnosis ({} present, {}), {} patients:",
            eval.class_name(p.positive_class),
            presence(p.min_positive_mm3, "3"),
            p.tp + p.fp + p.fn_ + p.tn
        );
        let _ = writeln!(
            t,
            "  sensitivity {}  specificity {}  PPV {}  NPV {}  accuracy {}",
            f(p.sensitivity, 3),
            f(p.specificity, 3),
            f(p.ppv, 3),
            f(p.npv, 3),
            f(p.accuracy, 3)
        );
        let _ = writeln!(t, "  TP {}  FP {}  FN {}  TN {}", p.tp, p.fp, p.fn_, p.tn);
        let _ = writeln!(t);
    }
    if let Some(prev) = prev.filter(|p| !p.comparable_with(eval)) {
        let _ = writeln!(t, "{}", not_comparable(prev, eval));
        let _ = writeln!(t);
    }
    if let Some(prev) = prev.filter(|p| p.comparable_with(eval)) {
        let _ = writeln!(
            t,
            "Change against {} (the vendor's previous submission):",
            prev.submission
        );
        for r in &fx.rows {
            let parts: Vec<String> = HEAD_KEYS
                .iter()
                .enumerate()
                .filter_map(|(i, key)| {
                    let before = prev.mean(r.label, *key);
                    if !(before.is_finite() || r.means[i].is_finite()) {
                        return None;
                    }
                    let (delta, _) = change(r.means[i], before, *key, HEAD_DECIMALS[i]);
                    Some(format!(
                        "{key} {} -> {} ({delta})",
                        f(before, HEAD_DECIMALS[i]),
                        f(r.means[i], HEAD_DECIMALS[i])
                    ))
                })
                .collect();
            let what = if parts.is_empty() {
                "undefined in both".to_string()
            } else {
                parts.join(", ")
            };
            let _ = writeln!(t, "  {}: {what}", r.name);
        }
        if let (Some((s0, p0)), Some(p)) = (prev.patient, &eval.summary.patient) {
            let _ = writeln!(
                t,
                "  patient sensitivity: {} -> {}; specificity: {} -> {}",
                f(s0, 3),
                f(p.sensitivity, 3),
                f(p0, 3),
                f(p.specificity, 3)
            );
        }
        let _ = writeln!(
            t,
            "  cases scored: {} -> {}",
            prev.cases_scored,
            eval.cases.len()
        );
        let _ = writeln!(t);
    }
    for line in paired_lines(eval) {
        let _ = writeln!(t, "{line}");
    }
    if eval.failures.is_empty() {
        let _ = writeln!(t, "No case failed.");
    } else {
        let _ = writeln!(t, "Failed cases ({}):", eval.failures.len());
        for fl in eval.failures.iter().take(MAX_FAILURES_LISTED) {
            let _ = writeln!(
                t,
                "  {} ({}, {} attempt{}): {}",
                fl.case,
                fl.stage,
                fl.attempts,
                if fl.attempts == 1 { "" } else { "s" },
                fl.reason
            );
        }
        if eval.failures.len() > MAX_FAILURES_LISTED {
            let _ = writeln!(
                t,
                "  ... and {} more (see the Failures sheet)",
                eval.failures.len() - MAX_FAILURES_LISTED
            );
        }
    }
    let _ = writeln!(t);
    if let Some(s) = report_sentence(report) {
        let _ = writeln!(t, "{s}");
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "-- ");
    let _ = writeln!(
        t,
        "evald {} | test set {} | {}",
        m.evald_version,
        short(&m.dataset_hash),
        m.finished
    );
    let _ = writeln!(t, "{}", conventions_line(eval));
    t
}

/// Failures listed in the body (all are in the report).
const MAX_FAILURES_LISTED: usize = 20;

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

const TH: &str = "padding:6px 10px;border-bottom:2px solid #b6c3d1;text-align:right;font-weight:600;white-space:nowrap;";
const TH_L: &str =
    "padding:6px 10px;border-bottom:2px solid #b6c3d1;text-align:left;font-weight:600;";
const TD: &str = "padding:6px 10px;border-bottom:1px solid #e4e8ee;text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums;";
const TD_L: &str = "padding:6px 10px;border-bottom:1px solid #e4e8ee;text-align:left;";
const H2: &str = "font-size:16px;margin:26px 0 8px;color:#1f2328;";
const MUTED: &str = "color:#57606a;";

fn delta_html(now: f64, before: f64, key: Metric, d: usize) -> String {
    let (text, better) = change(now, before, key, d);
    let (color, arrow) = match better {
        Some(true) => ("#1a7f37", "&#9650; "),
        Some(false) => ("#cf222e", "&#9660; "),
        None => ("#57606a", ""),
    };
    format!(
        "<span style=\"color:{color};\">{arrow}{}</span>",
        escape(&text)
    )
}

/// The HTML alternative (well-formed XML; inline styles only, as mail clients want).
fn html_body(
    eval: &Evaluation,
    fx: &Facts,
    prev: Option<&Previous>,
    report: &ReportInMail,
    subject: &str,
    with_plot: bool,
) -> String {
    let m = &eval.meta;
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n<title>{}</title>\n</head>",
        escape(subject)
    );
    h.push_str("<body style=\"margin:0;padding:0;background:#f3f5f8;\">\n");
    h.push_str("<div style=\"max-width:780px;margin:0 auto;padding:28px 32px;background:#ffffff;font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:14px;line-height:1.45;color:#1f2328;\">\n");
    let _ = writeln!(
        h,
        "<p style=\"margin:0 0 4px;font-size:12px;letter-spacing:.06em;text-transform:uppercase;{MUTED}\">evald evaluation</p>\n<h1 style=\"margin:0 0 6px;font-size:22px;\">{}</h1>",
        escape(&fx.who)
    );
    let failed_style = if eval.failures.is_empty() {
        MUTED.to_string()
    } else {
        "color:#cf222e;font-weight:600;".to_string()
    };
    let _ = write!(
        h,
        "<p style=\"margin:0 0 18px;{MUTED}\">{} of {} cases scored &#183; <span style=\"{failed_style}\">{} failed</span>",
        eval.cases.len(),
        eval.total_cases(),
        eval.failures.len()
    );
    if let Some(sha) = &m.model_sha256 {
        let _ = write!(
            h,
            " &#183; model <code title=\"{}\">{}</code>",
            escape(sha),
            escape(&short(sha))
        );
    }
    h.push_str("</p>\n");
    if let Some(why) = &m.stopped_early {
        let _ = writeln!(
            h,
            "<p style=\"margin:0 0 18px;color:#cf222e;font-weight:600;\">Stopped early: {}; the cases not run are listed as failed.</p>",
            escape(why)
        );
    }

    // Headline tiles.
    h.push_str("<table role=\"presentation\" cellspacing=\"0\" cellpadding=\"0\" style=\"border-collapse:separate;border-spacing:0 0;margin:0 0 8px;\"><tr>\n");
    let tile = |h: &mut String, label: &str, value: &str, sub: &str| {
        let _ = writeln!(
            h,
            "<td style=\"padding:12px 18px;background:#f0f4f9;border-radius:6px;\"><div style=\"font-size:12px;{MUTED}\">{}</div><div style=\"font-size:26px;font-weight:700;\">{}</div><div style=\"font-size:12px;{MUTED}\">{}</div></td><td style=\"width:12px;\"></td>",
            escape(label),
            escape(value),
            escape(sub)
        );
    };
    let (headline, dice_label) = eval.headline_dice();
    tile(
        &mut h,
        dice_label,
        &f(headline, 3),
        &format!("{} classes", fx.rows.len()),
    );
    if let Some((name, d)) = focus_class(eval) {
        tile(
            &mut h,
            &format!("Dice, {name}"),
            &f(d, 3),
            "mean over cases",
        );
    }
    if let Some(p) = &eval.summary.patient {
        tile(
            &mut h,
            "Patient-level sensitivity",
            &f(p.sensitivity, 3),
            &format!("specificity {}", f(p.specificity, 3)),
        );
    }
    h.push_str("</tr></table>\n");

    // Per-class table.
    let _ = writeln!(h, "<h2 style=\"{H2}\">Per class</h2>");
    h.push_str("<table cellspacing=\"0\" cellpadding=\"0\" style=\"border-collapse:collapse;width:100%;\">\n<thead><tr>");
    let _ = write!(h, "<th style=\"{TH_L}\">Class</th>");
    for name in ["Dice", "95% CI", "IoU", "HD95 (mm)", "NSD", "Cases"] {
        let _ = write!(h, "<th style=\"{TH}\">{name}</th>");
    }
    if let Some(p) = prev {
        let _ = write!(
            h,
            "<th style=\"{TH}\">Dice vs {}</th>",
            escape(&p.submission)
        );
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for r in &fx.rows {
        let cases = if r.n_nan > 0 {
            format!(
                "{} <span style=\"{MUTED}font-size:12px;\">({} undefined)</span>",
                r.n, r.n_nan
            )
        } else {
            r.n.to_string()
        };
        let _ = write!(
            h,
            "<tr><td style=\"{TD_L}\"><strong>{}</strong> <span style=\"{MUTED}font-size:12px;\">label {}</span></td><td style=\"{TD}font-weight:700;\">{}</td><td style=\"{TD}{MUTED}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD}\">{cases}</td>",
            escape(&r.name),
            r.label,
            f(r.means[0], 3),
            ci(r.dice_ci, "&#8211;"),
            f(r.means[1], 3),
            f(r.means[2], 2),
            f(r.means[3], 3),
        );
        if let Some(p) = prev {
            let _ = write!(
                h,
                "<td style=\"{TD}\">{}</td>",
                delta_html(r.means[0], p.mean(r.label, Metric::Dice), Metric::Dice, 3)
            );
        }
        h.push_str("</tr>\n");
    }
    if fx.rows.len() > 1 {
        let _ = write!(
            h,
            "<tr style=\"background:#f6f8fa;\"><td style=\"{TD_L}\"><em>foreground mean</em></td><td style=\"{TD}font-weight:700;\">{}</td><td style=\"{TD}\"></td><td style=\"{TD}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD}\"></td>",
            f(fx.foreground[0], 3),
            f(fx.foreground[1], 3),
            f(fx.foreground[2], 2),
            f(fx.foreground[3], 3),
        );
        if let Some(p) = prev {
            let _ = write!(
                h,
                "<td style=\"{TD}\">{}</td>",
                delta_html(
                    fx.foreground[0],
                    p.foreground.get(&Metric::Dice).copied().unwrap_or(f64::NAN),
                    Metric::Dice,
                    3
                )
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");

    if with_plot {
        let _ = writeln!(
            h,
            "<p style=\"margin:18px 0 0;\"><img src=\"cid:{PLOT_CID}\" width=\"600\" alt=\"Dice per case: box and strip plot per class\" style=\"display:block;width:100%;max-width:600px;height:auto;border:1px solid #e4e8ee;\"/></p>\n<p style=\"margin:4px 0 0;font-size:12px;{MUTED}\">Each dot is a case; box = quartiles, bar = median, cross = mean, whiskers = 1.5 IQR.</p>"
        );
    }

    // Patient level.
    if let Some(p) = &eval.summary.patient {
        let _ = writeln!(
            h,
            "<h2 style=\"{H2}\">Patient-level diagnosis</h2>\n<p style=\"margin:0 0 8px;{MUTED}\">A patient is positive when {} is present ({}); {} patients.</p>",
            escape(&eval.class_name(p.positive_class)),
            presence(p.min_positive_mm3, "&#179;"),
            p.tp + p.fp + p.fn_ + p.tn
        );
        h.push_str(
            "<table cellspacing=\"0\" cellpadding=\"0\" style=\"border-collapse:collapse;\">\n",
        );
        let _ = writeln!(
            h,
            "<thead><tr><th style=\"{TH_L}\"></th><th style=\"{TH}\">predicted positive</th><th style=\"{TH}\">predicted negative</th></tr></thead>\n<tbody>\n<tr><td style=\"{TD_L}\">reference positive</td><td style=\"{TD}\">{} <span style=\"{MUTED}\">TP</span></td><td style=\"{TD}\">{} <span style=\"{MUTED}\">FN</span></td></tr>\n<tr><td style=\"{TD_L}\">reference negative</td><td style=\"{TD}\">{} <span style=\"{MUTED}\">FP</span></td><td style=\"{TD}\">{} <span style=\"{MUTED}\">TN</span></td></tr>\n</tbody>\n</table>",
            p.tp, p.fn_, p.fp, p.tn
        );
        let _ = writeln!(
            h,
            "<p style=\"margin:8px 0 0;\">Sensitivity <strong>{}</strong> &#183; specificity <strong>{}</strong> &#183; PPV {} &#183; NPV {} &#183; accuracy {}</p>",
            f(p.sensitivity, 3),
            f(p.specificity, 3),
            f(p.ppv, 3),
            f(p.npv, 3),
            f(p.accuracy, 3)
        );
    }

    // Change against the previous submission.
    if let Some(prev) = prev.filter(|p| !p.comparable_with(eval)) {
        let _ = writeln!(
            h,
            "<p style=\"margin:16px 0 0;{MUTED}\">{}</p>",
            escape(&not_comparable(prev, eval))
        );
    }
    if let Some(prev) = prev.filter(|p| p.comparable_with(eval)) {
        let _ = writeln!(
            h,
            "<h2 style=\"{H2}\">Change against {}</h2>\n<p style=\"margin:0 0 8px;{MUTED}\">The vendor's previous submission for this task ({} cases scored, {} failed).</p>",
            escape(&prev.submission),
            prev.cases_scored,
            prev.cases_failed
        );
        // One row per class: each metric as "now" over its change; a metric undefined in
        // both submissions for every class (e.g. surface distances off) is left out.
        let keys: Vec<usize> = (0..HEAD_KEYS.len())
            .filter(|&i| {
                fx.rows
                    .iter()
                    .any(|r| r.means[i].is_finite() || prev.mean(r.label, HEAD_KEYS[i]).is_finite())
            })
            .collect();
        h.push_str("<table cellspacing=\"0\" cellpadding=\"0\" style=\"border-collapse:collapse;\">\n<thead><tr>");
        let _ = write!(h, "<th style=\"{TH_L}\">Class</th>");
        for &i in &keys {
            let unit = if HEAD_KEYS[i] == Metric::Hd95 {
                " (mm)"
            } else {
                ""
            };
            let _ = write!(
                h,
                "<th style=\"{TH}\">{}{unit}<br/><span style=\"font-weight:400;{MUTED}font-size:12px;\">{} &#8594; {}</span></th>",
                HEAD_KEYS[i],
                escape(&prev.submission),
                escape(m.submission.as_deref().unwrap_or("this run"))
            );
        }
        h.push_str("</tr></thead>\n<tbody>\n");
        for r in &fx.rows {
            let _ = write!(h, "<tr><td style=\"{TD_L}\">{}</td>", escape(&r.name));
            for &i in &keys {
                let before = prev.mean(r.label, HEAD_KEYS[i]);
                let _ = write!(
                    h,
                    "<td style=\"{TD}\"><span style=\"{MUTED}\">{}</span> &#8594; {}<br/><span style=\"font-size:12px;\">{}</span></td>",
                    f(before, HEAD_DECIMALS[i]),
                    f(r.means[i], HEAD_DECIMALS[i]),
                    delta_html(r.means[i], before, HEAD_KEYS[i], HEAD_DECIMALS[i])
                );
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody>\n</table>\n");
        if let (Some((s0, p0)), Some(p)) = (prev.patient, &eval.summary.patient) {
            let _ = writeln!(
                h,
                "<p style=\"margin:8px 0 0;\">Patient level: sensitivity {} &#8594; {} ({}) &#183; specificity {} &#8594; {} ({})</p>",
                f(s0, 3),
                f(p.sensitivity, 3),
                delta_html(p.sensitivity, s0, Metric::Sensitivity, 3),
                f(p0, 3),
                f(p.specificity, 3),
                delta_html(p.specificity, p0, Metric::Specificity, 3)
            );
        }
    }

    let paired = paired_lines(eval);
    if !paired.is_empty() {
        let _ = writeln!(h, "<p style=\"margin:8px 0 0;\">");
        for line in paired.iter().filter(|l| !l.is_empty()) {
            let _ = writeln!(h, "{}<br/>", escape(line.trim_start()));
        }
        let _ = writeln!(h, "</p>");
    }

    // Failures.
    let _ = writeln!(h, "<h2 style=\"{H2}\">Failures</h2>");
    if eval.failures.is_empty() {
        let _ = writeln!(h, "<p style=\"margin:0;{MUTED}\">No case failed.</p>");
    } else {
        h.push_str("<table cellspacing=\"0\" cellpadding=\"0\" style=\"border-collapse:collapse;width:100%;\">\n<thead><tr>");
        let _ = writeln!(
            h,
            "<th style=\"{TH_L}\">Case</th><th style=\"{TH_L}\">Stage</th><th style=\"{TH}\">Attempts</th><th style=\"{TH_L}\">Reason</th></tr></thead>\n<tbody>"
        );
        for fl in eval.failures.iter().take(MAX_FAILURES_LISTED) {
            let _ = writeln!(
                h,
                "<tr><td style=\"{TD_L}white-space:nowrap;\">{}</td><td style=\"{TD_L}\">{}</td><td style=\"{TD}\">{}</td><td style=\"{TD_L}font-size:13px;\">{}</td></tr>",
                escape(&fl.case),
                escape(fl.stage.as_str()),
                fl.attempts,
                escape(&fl.reason)
            );
        }
        h.push_str("</tbody>\n</table>\n");
        if eval.failures.len() > MAX_FAILURES_LISTED {
            let _ = writeln!(
                h,
                "<p style=\"margin:6px 0 0;{MUTED}\">&#8230; and {} more: see the Failures sheet.</p>",
                eval.failures.len() - MAX_FAILURES_LISTED
            );
        }
    }

    if let Some(s) = report_sentence(report) {
        let _ = writeln!(
            h,
            "<p style=\"margin:24px 0 0;padding:10px 14px;background:#f0f4f9;border-radius:6px;\">{}</p>",
            escape(&s)
        );
    }
    let _ = writeln!(
        h,
        "<p style=\"margin:24px 0 0;font-size:12px;{MUTED}\">evald {} &#183; test set <code>{}</code> &#183; finished {}<br/>{}</p>",
        escape(&m.evald_version),
        escape(&short(&m.dataset_hash)),
        escape(&m.finished),
        escape(&conventions_line(eval))
    );
    h.push_str("</div>\n</body>\n</html>\n");
    h
}

fn mailbox(address: &str, role: &'static str) -> Result<Mailbox, ComposeError> {
    address
        .parse()
        .map_err(|e: lettre::address::AddressError| ComposeError::Address {
            address: address.to_string(),
            role,
            reason: e.to_string(),
        })
}

/// Compose the summary email of `eval` for `recipients`.
///
/// `previous` is the same vendor's previous submission for the task (the body shows the
/// change against it); `report` is the workbook to attach (read now; over
/// `settings.attach_max_bytes` the body gives its path instead). The Dice plot is drawn
/// here; if drawing fails the email goes without it. Blocking (reads the report, draws):
/// from async code, call it in `spawn_blocking`.
///
/// # Errors
/// [`ComposeError`] for missing or malformed addresses, or a message lettre refuses.
pub fn compose(
    eval: &Evaluation,
    recipients: &[String],
    previous: Option<&Previous>,
    report: Option<&Path>,
    settings: &MailSettings,
) -> Result<Composed, ComposeError> {
    let what = eval.who();
    if recipients.is_empty() {
        return Err(ComposeError::NoRecipients { what });
    }
    let from = mailbox(&settings.from, "from")?;
    let to: Vec<Mailbox> = recipients
        .iter()
        .map(|r| mailbox(r, "recipient"))
        .collect::<Result<_, _>>()?;
    let (report_state, report_bytes) = match report {
        None => (ReportInMail::None, None),
        Some(path) => match std::fs::metadata(path) {
            Err(e) => (
                ReportInMail::Unreadable {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                },
                None,
            ),
            Ok(meta) if meta.len() > settings.attach_max_bytes => (
                ReportInMail::TooLarge {
                    path: path.to_path_buf(),
                    bytes: meta.len(),
                    cap: settings.attach_max_bytes,
                },
                None,
            ),
            Ok(_) => match std::fs::read(path) {
                Ok(b) => (
                    ReportInMail::Attached {
                        path: path.to_path_buf(),
                        bytes: b.len() as u64,
                    },
                    Some(b),
                ),
                Err(e) => (
                    ReportInMail::Unreadable {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    },
                    None,
                ),
            },
        },
    };
    let plot_png = match crate::plot::dice_png(eval) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, submission = what, "email without the Dice plot");
            None
        }
    };
    let subject = subject(eval);
    let fx = facts(eval);
    let text = text_body(eval, &fx, previous, &report_state);
    let html = html_body(
        eval,
        &fx,
        previous,
        &report_state,
        &subject,
        plot_png.is_some(),
    );

    let html_part = SinglePart::html(html.clone());
    let rich = match &plot_png {
        Some(png) => MultiPart::related().singlepart(html_part).singlepart(
            Attachment::new_inline(PLOT_CID.to_string()).body(
                png.clone(),
                ContentType::parse("image/png").expect("valid MIME type"),
            ),
        ),
        None => MultiPart::related().singlepart(html_part),
    };
    let alternative = MultiPart::alternative()
        .singlepart(SinglePart::plain(text.clone()))
        .multipart(rich);
    let mut body = MultiPart::mixed().multipart(alternative);
    if let (Some(bytes), Some(path)) = (report_bytes, report) {
        let name = path.file_name().map_or_else(
            || "report.xlsx".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        body = body.singlepart(Attachment::new(name).body(
            bytes,
            ContentType::parse(XLSX_MIME).expect("valid MIME type"),
        ));
    }
    let message = build_message(from, to, &subject, body, &what)?;
    Ok(Composed {
        message,
        subject,
        text,
        html,
        plot_png,
        report: report_state,
        label: label_of(eval),
    })
}

/// The message with evald's headers. The Message-ID is fixed here, before the outbox
/// records the bytes: a resend after a crash carries the same id, so mail clients can
/// recognise the duplicate.
fn build_message(
    from: Mailbox,
    to: Vec<Mailbox>,
    subject: &str,
    body: MultiPart,
    what: &str,
) -> Result<Message, ComposeError> {
    let mut builder = Message::builder()
        .from(from)
        .subject(subject)
        .message_id(None)
        .user_agent(format!("evald {}", env!("CARGO_PKG_VERSION")));
    for mb in to {
        builder = builder.to(mb);
    }
    builder
        .multipart(body)
        .map_err(|source| ComposeError::Build {
            what: what.to_string(),
            source,
        })
}

/// A plain-text notice to the team that a submission ended without a report (`failed`):
/// `who` names it (`t / acme / v1`), `problem` says what happened, `next` what the admin
/// can do. Short on purpose; the log has the rest.
///
/// # Errors
/// [`ComposeError`] for missing or malformed addresses, or a message lettre refuses.
pub fn compose_failure(
    who: &str,
    problem: &str,
    next: &str,
    recipients: &[String],
    settings: &MailSettings,
) -> Result<Composed, ComposeError> {
    if recipients.is_empty() {
        return Err(ComposeError::NoRecipients { what: who.into() });
    }
    let from = mailbox(&settings.from, "from")?;
    let to: Vec<Mailbox> = recipients
        .iter()
        .map(|r| mailbox(r, "recipient"))
        .collect::<Result<_, _>>()?;
    // Folder names are the vendors': one line, no control characters, in the subject.
    let who_line = crate::logging::printable(who).into_owned();
    let subject = format!("[evald] {who_line}: FAILED, no report");
    let text = format!(
        "evald could not evaluate {who_line}; no report was written.\n\n\
         What happened:\n  {problem}\n\n\
         What to do:\n  {next}\n\n\
         The vendor finds the same explanation in FAILED.txt in the submission folder.\n",
    );
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{}</title></head>\n\
         <body style=\"font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:14px;\">\n\
         <h1 style=\"font-size:20px;\">{}</h1>\n<p style=\"color:#cf222e;font-weight:600;\">FAILED: no report was written.</p>\n\
         <p><b>What happened:</b> {}</p>\n<p><b>What to do:</b> {}</p>\n</body></html>\n",
        escape(&subject),
        escape(&who_line),
        escape(problem),
        escape(next)
    );
    let body = MultiPart::alternative()
        .singlepart(SinglePart::plain(text.clone()))
        .singlepart(SinglePart::html(html.clone()));
    let message = build_message(from, to, &subject, body, who)?;
    Ok(Composed {
        message,
        subject,
        text,
        html,
        plot_png: None,
        report: ReportInMail::None,
        label: safe_label(who),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
    }

    #[test]
    fn change_direction_follows_the_metric() {
        assert_eq!(
            change(0.9, 0.8, Metric::Dice, 3),
            ("+0.100".into(), Some(true))
        );
        assert_eq!(
            change(3.0, 2.0, Metric::Hd95, 2),
            ("+1.00".into(), Some(false))
        );
        assert_eq!(change(0.8, 0.8, Metric::Dice, 3).1, None);
        assert_eq!(change(f64::NAN, 0.8, Metric::Dice, 3).0, "n/a");
    }

    #[test]
    fn previous_keeps_undefined_means_undefined() {
        let mut per_class = BTreeMap::new();
        let st = |mean| crate::store::StoredStats {
            n: 3,
            n_nan: 0,
            mean,
            std: f64::NAN,
            median: mean,
            p25: mean,
            p75: mean,
            min: mean,
            max: mean,
            ci95_low: mean,
            ci95_high: mean,
        };
        per_class.insert(
            1u8,
            BTreeMap::from([(Metric::Dice, st(0.5)), (Metric::Hd95, st(f64::NAN))]),
        );
        let r = EvaluationResults {
            model_sha256: None,
            testset_hash: "ab".repeat(32),
            cases_scored: 3,
            cases_failed: 1,
            stopped_early: None,
            evald_version: "x".into(),
            statistics: crate::store::Statistics {
                classes: Vec::new(),
                per_class,
                foreground_mean: BTreeMap::new(),
                foreground: BTreeMap::new(),
                patient: None,
            },
            failures: Vec::new(),
            cases: None,
        };
        let p = Previous::from_results("v1", &r);
        assert_eq!(p.mean(1, Metric::Dice), 0.5);
        assert!(p.mean(1, Metric::Hd95).is_nan());
        assert!(p.mean(2, Metric::Dice).is_nan());
        assert_eq!((p.cases_scored, p.cases_failed), (3, 1));
        assert!(p.patient.is_none());
    }
}
