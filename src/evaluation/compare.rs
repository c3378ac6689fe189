//! The paired comparison of two evaluations of the same test-set content (issue 13): per
//! class and metric (Dice, IoU, HD95, NSD) the per-case differences `after - before`, their
//! mean with a paired bootstrap 95% CI and the Wilcoxon signed-rank p-value; for the
//! patient-level diagnosis, the change in sensitivity and specificity with McNemar's exact
//! test on the discordant patients. The statistics themselves are [`crate::stats`]'.
//!
//! Pairing rules, and why:
//! - Only evaluations whose test-set content hash is equal are paired; anything else is an
//!   [`Against::Unpaired`] with the reason (a difference over other cases is not a paired
//!   difference, and the email must not pretend it is).
//! - A case pairs when both scored it. Cases failed in either are listed with each side's
//!   stage ([`Comparison::failed`]), never dropped silently; a case scored in one and
//!   absent from the other is listed too ([`Comparison::scored_in_one_only`]).
//! - Per metric, a pair counts when both values are defined (Dice of two empty masks is
//!   undefined); pairs with an undefined side are counted in [`MetricChange::undefined`].
//!   The mean difference is over the counted pairs, so it can differ slightly from the
//!   difference of the two evaluations' class means (which average all their own cases).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Evaluation, Stage};
use crate::metrics::aggregate::{class_value, Metric};
use crate::stats::{self, Wilcoxon};

/// The per-class metrics compared, in report order.
pub const COMPARED: [Metric; 4] = [Metric::Dice, Metric::IoU, Metric::Hd95, Metric::Nsd];

/// One case's values as a comparison needs them (and the store keeps them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseValues {
    /// Case id.
    pub case: String,
    /// Per class label: every metric computed for the case (NaN: undefined; `null` in JSON).
    #[serde(with = "nan_null_nested")]
    pub classes: BTreeMap<u8, BTreeMap<Metric, f64>>,
    /// Patient-level call (reference positive, predicted positive), when the task has a
    /// positive class.
    pub patient: Option<(bool, bool)>,
}

/// NaN as `null` in JSON, both ways (serde_json refuses `null` for an `f64`).
mod nan_null_nested {
    use super::*;

    type Nested = BTreeMap<u8, BTreeMap<Metric, f64>>;

    pub fn serialize<S: Serializer>(m: &Nested, s: S) -> Result<S::Ok, S::Error> {
        let o: BTreeMap<&u8, BTreeMap<&Metric, Option<f64>>> = m
            .iter()
            .map(|(l, v)| {
                (
                    l,
                    v.iter()
                        .map(|(k, x)| (k, x.is_finite().then_some(*x)))
                        .collect(),
                )
            })
            .collect();
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Nested, D::Error> {
        let o = BTreeMap::<u8, BTreeMap<Metric, Option<f64>>>::deserialize(d)?;
        Ok(o.into_iter()
            .map(|(l, v)| {
                (
                    l,
                    v.into_iter()
                        .map(|(k, x)| (k, x.unwrap_or(f64::NAN)))
                        .collect(),
                )
            })
            .collect())
    }
}

/// Every scored case of `eval` with every metric computed for it.
pub fn case_values(eval: &Evaluation) -> Vec<CaseValues> {
    let calls: BTreeMap<&str, (bool, bool)> = eval
        .summary
        .patient
        .iter()
        .flat_map(|p| p.calls.iter().map(|(c, r, q)| (c.as_str(), (*r, *q))))
        .collect();
    eval.cases
        .iter()
        .map(|cm| CaseValues {
            case: cm.case.clone(),
            classes: cm
                .classes
                .iter()
                .map(|m| {
                    (
                        m.label,
                        Metric::ALL
                            .into_iter()
                            .filter_map(|k| class_value(m, k).map(|v| (k, v)))
                            .collect(),
                    )
                })
                .collect(),
            patient: calls.get(cm.case.as_str()).copied(),
        })
        .collect()
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// What it is called in every output (`v3`, `#12 acme/v3`).
    pub name: String,
    /// The test-set content hash it was scored on.
    pub testset_hash: String,
    /// The task's classes (label, name).
    pub classes: Vec<(u8, String)>,
    /// Patient level: (positive class, min_positive_mm3), when the task has one.
    pub patient: Option<(u8, f64)>,
    /// Scored cases.
    pub cases: Vec<CaseValues>,
    /// Failed cases and where they failed.
    pub failures: Vec<(String, Stage)>,
}

impl Side {
    /// The side of an evaluation in memory.
    pub fn of(eval: &Evaluation, name: impl Into<String>) -> Side {
        Side {
            name: name.into(),
            testset_hash: eval.meta.dataset_hash.clone(),
            classes: eval
                .spec
                .classes
                .iter()
                .map(|c| (c.label, c.name.clone()))
                .collect(),
            patient: eval
                .summary
                .patient
                .as_ref()
                .map(|p| (p.positive_class, p.min_positive_mm3)),
            cases: case_values(eval),
            failures: eval
                .failures
                .iter()
                .map(|f| (f.case.clone(), f.stage))
                .collect(),
        }
    }
}

/// Why a `summary.json` cannot be one side of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// A field the comparison needs is missing or has the wrong type.
    #[error("summary.json: {what} is missing or malformed")]
    Field {
        /// The field (a JSON path).
        what: String,
    },
    /// A metric name that this evald does not know.
    #[error("summary.json: case {case}: unknown metric '{key}'")]
    Metric {
        /// Case id.
        case: String,
        /// The key.
        key: String,
    },
}

fn field(what: &str) -> SummaryError {
    SummaryError::Field { what: what.into() }
}

/// The case id of a `metric_per_case` entry: its `case` (written since schema 3's
/// summary.json), else the reference file's name without `.nii.gz`/`.nii`.
fn case_id(entry: &serde_json::Value) -> Option<String> {
    if let Some(c) = entry["case"].as_str() {
        return Some(c.to_string());
    }
    let f = entry["reference_file"].as_str()?;
    let name = std::path::Path::new(f).file_name()?.to_str()?;
    let id = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(name);
    Some(id.to_string())
}

impl Side {
    /// The side of an evaluation as its `summary.json` (the parsed document) tells it:
    /// per-case values from `metric_per_case`, the test-set hash from `evald.run`, the
    /// patient-level calls and the failures from `evald`.
    ///
    /// # Errors
    /// [`SummaryError`] when a field the comparison needs is missing or malformed.
    pub fn from_summary(
        doc: &serde_json::Value,
        name: impl Into<String>,
    ) -> Result<Side, SummaryError> {
        use serde_json::Value;
        let ev = &doc["evald"];
        let testset_hash = ev["run"]["dataset_hash"]
            .as_str()
            .ok_or_else(|| field("evald.run.dataset_hash"))?
            .to_string();
        let mut classes: Vec<(u8, String)> = ev["classes"]
            .as_object()
            .ok_or_else(|| field("evald.classes"))?
            .iter()
            .map(|(l, n)| Some((l.parse::<u8>().ok()?, n.as_str()?.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| field("evald.classes"))?;
        classes.sort_by_key(|c| c.0);
        let pl = &ev["patient_level"];
        let (patient, calls) = if pl.is_null() {
            (None, BTreeMap::new())
        } else {
            let pc = pl["positive_class"]
                .as_u64()
                .and_then(|v| u8::try_from(v).ok())
                .ok_or_else(|| field("evald.patient_level.positive_class"))?;
            let mm3 = pl["min_positive_mm3"]
                .as_f64()
                .ok_or_else(|| field("evald.patient_level.min_positive_mm3"))?;
            let calls: BTreeMap<String, (bool, bool)> = pl["calls"]
                .as_array()
                .ok_or_else(|| field("evald.patient_level.calls"))?
                .iter()
                .map(|c| {
                    Some((
                        c["case"].as_str()?.to_string(),
                        (c["reference"].as_bool()?, c["prediction"].as_bool()?),
                    ))
                })
                .collect::<Option<_>>()
                .ok_or_else(|| field("evald.patient_level.calls"))?;
            (Some((pc, mm3)), calls)
        };
        let mut cases = Vec::new();
        for entry in doc["metric_per_case"]
            .as_array()
            .ok_or_else(|| field("metric_per_case"))?
        {
            let case = case_id(entry).ok_or_else(|| field("metric_per_case[].case"))?;
            let mut by_class = BTreeMap::new();
            for (l, m) in entry["metrics"]
                .as_object()
                .ok_or_else(|| field("metric_per_case[].metrics"))?
            {
                let label = l
                    .parse::<u8>()
                    .map_err(|_| field("metric_per_case[].metrics label"))?;
                let mut values = BTreeMap::new();
                for (k, v) in m
                    .as_object()
                    .ok_or_else(|| field("metric_per_case[].metrics"))?
                {
                    let metric = Metric::parse(k).ok_or_else(|| SummaryError::Metric {
                        case: case.clone(),
                        key: k.clone(),
                    })?;
                    let x = match v {
                        Value::Null => f64::NAN,
                        v => v
                            .as_f64()
                            .ok_or_else(|| field("metric_per_case[].metrics value"))?,
                    };
                    values.insert(metric, x);
                }
                by_class.insert(label, values);
            }
            cases.push(CaseValues {
                patient: calls.get(&case).copied(),
                case,
                classes: by_class,
            });
        }
        let failures = ev["failures"]
            .as_array()
            .ok_or_else(|| field("evald.failures"))?
            .iter()
            .map(|f| {
                let case = f["case"].as_str()?.to_string();
                let stage: Stage = serde_json::from_value(f["stage"].clone()).ok()?;
                Some((case, stage))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| field("evald.failures"))?;
        Ok(Side {
            name: name.into(),
            testset_hash,
            classes,
            patient,
            cases,
            failures,
        })
    }
}

/// A case failed in at least one of the two evaluations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedCase {
    /// Case id.
    pub case: String,
    /// Where it failed in the earlier evaluation (`None`: scored there).
    pub before: Option<Stage>,
    /// Where it failed in the later one.
    pub after: Option<Stage>,
}

/// The paired change of one metric of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricChange {
    /// Class label.
    pub label: u8,
    /// Class name.
    pub class: String,
    /// The metric.
    pub metric: Metric,
    /// Pairs with both values defined (what every number below is over).
    pub n: usize,
    /// Paired cases where either value is undefined (excluded).
    pub undefined: usize,
    /// Mean of the earlier values over the `n` pairs.
    pub mean_before: f64,
    /// Mean of the later values.
    pub mean_after: f64,
    /// Mean of `after - before`.
    pub mean_difference: f64,
    /// Paired percentile-bootstrap 95% CI of the mean difference (`None` below 2 pairs).
    pub ci95: Option<(f64, f64)>,
    /// Wilcoxon signed-rank test of the differences (`None` without pairs).
    pub wilcoxon: Option<Wilcoxon>,
    /// Per pair: (case, before, after).
    pub per_case: Vec<(String, f64, f64)>,
}

/// The paired change of the patient-level diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientChange {
    /// The class whose presence makes a patient positive.
    pub positive_class: u8,
    /// Paired reference-positive patients (what sensitivity is over).
    pub positives: u64,
    /// Paired reference-negative patients.
    pub negatives: u64,
    /// Sensitivity before, over the paired positives (NaN without any).
    pub sensitivity_before: f64,
    /// Sensitivity after.
    pub sensitivity_after: f64,
    /// Positives found only before, only after (the discordant pairs).
    pub sensitivity_discordant: (u64, u64),
    /// McNemar's exact p on those.
    pub sensitivity_p: f64,
    /// Specificity before, over the paired negatives.
    pub specificity_before: f64,
    /// Specificity after.
    pub specificity_after: f64,
    /// Negatives called right only before, only after.
    pub specificity_discordant: (u64, u64),
    /// McNemar's exact p on those.
    pub specificity_p: f64,
    /// Paired cases whose reference call differs between the two (left out; it can only
    /// happen when the task's positive threshold changed, as the test set is the same).
    pub reference_disagrees: Vec<String>,
}

/// A paired comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The earlier evaluation.
    pub before: String,
    /// The later one.
    pub after: String,
    /// The test-set content hash both scored.
    pub testset_hash: String,
    /// Cases scored in both.
    pub paired_cases: usize,
    /// Cases failed in either (not paired), with each side's stage.
    pub failed: Vec<FailedCase>,
    /// Cases scored in one and missing from the other (not paired).
    pub scored_in_one_only: Vec<String>,
    /// Per class (task order) and metric ([`COMPARED`] order): the changes computed.
    pub metrics: Vec<MetricChange>,
    /// The patient-level change, when both have the same patient-level definition.
    pub patient: Option<PatientChange>,
}

impl Comparison {
    /// The change of `metric` for class `label`.
    pub fn change(&self, label: u8, metric: Metric) -> Option<&MetricChange> {
        self.metrics
            .iter()
            .find(|m| m.label == label && m.metric == metric)
    }
}

/// The comparison with another evaluation, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Against {
    /// Paired.
    Paired(Box<Comparison>),
    /// Not paired, and why (other test-set content, no per-case values kept).
    Unpaired {
        /// The other evaluation.
        against: String,
        /// One sentence.
        reason: String,
    },
}

impl Against {
    /// The other evaluation's name.
    pub fn against(&self) -> &str {
        match self {
            Against::Paired(c) => &c.before,
            Against::Unpaired { against, .. } => against,
        }
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Compare `after` with `before` (differences are `after - before`); see the module
/// documentation for what pairs.
pub fn compare(before: &Side, after: &Side) -> Against {
    if before.testset_hash.is_empty() || before.testset_hash != after.testset_hash {
        return Against::Unpaired {
            against: before.name.clone(),
            reason: format!(
                "not compared as paired: {} was scored on other test-set content (test set {}, \
                 this one {})",
                before.name,
                short(&before.testset_hash),
                short(&after.testset_hash)
            ),
        };
    }
    let b: BTreeMap<&str, &CaseValues> =
        before.cases.iter().map(|c| (c.case.as_str(), c)).collect();
    let a: BTreeMap<&str, &CaseValues> = after.cases.iter().map(|c| (c.case.as_str(), c)).collect();
    let bf: BTreeMap<&str, Stage> = before
        .failures
        .iter()
        .map(|(c, s)| (c.as_str(), *s))
        .collect();
    let af: BTreeMap<&str, Stage> = after
        .failures
        .iter()
        .map(|(c, s)| (c.as_str(), *s))
        .collect();
    let all: BTreeSet<&str> = b
        .keys()
        .chain(a.keys())
        .chain(bf.keys())
        .chain(af.keys())
        .copied()
        .collect();
    let mut paired = Vec::new();
    let mut failed = Vec::new();
    let mut one_only = Vec::new();
    for case in all {
        match (b.get(case), a.get(case)) {
            (Some(x), Some(y)) => paired.push((case, *x, *y)),
            _ if bf.contains_key(case) || af.contains_key(case) => failed.push(FailedCase {
                case: case.to_string(),
                before: bf.get(case).copied(),
                after: af.get(case).copied(),
            }),
            _ => one_only.push(case.to_string()),
        }
    }
    let mut metrics = Vec::new();
    for (label, class) in &after.classes {
        if !before.classes.iter().any(|(l, _)| l == label) {
            continue;
        }
        for metric in COMPARED {
            let value = |c: &CaseValues| c.classes.get(label).and_then(|m| m.get(&metric)).copied();
            // A metric not computed on either side (surface distances off) is not compared.
            if !paired
                .iter()
                .any(|(_, x, y)| value(x).is_some() && value(y).is_some())
            {
                continue;
            }
            let mut per_case = Vec::new();
            let mut undefined = 0;
            for (case, x, y) in &paired {
                match (value(x), value(y)) {
                    (Some(u), Some(v)) if u.is_finite() && v.is_finite() => {
                        per_case.push((case.to_string(), u, v));
                    }
                    _ => undefined += 1,
                }
            }
            let n = per_case.len();
            let d: Vec<f64> = per_case.iter().map(|(_, u, v)| v - u).collect();
            let mean = |it: &mut dyn Iterator<Item = f64>| {
                if n == 0 {
                    f64::NAN
                } else {
                    it.sum::<f64>() / n as f64
                }
            };
            metrics.push(MetricChange {
                label: *label,
                class: class.clone(),
                metric,
                n,
                undefined,
                mean_before: mean(&mut per_case.iter().map(|p| p.1)),
                mean_after: mean(&mut per_case.iter().map(|p| p.2)),
                mean_difference: mean(&mut d.iter().copied()),
                ci95: stats::bootstrap_mean_ci(
                    &d,
                    0.95,
                    stats::BOOTSTRAP_RESAMPLES,
                    stats::BOOTSTRAP_SEED,
                ),
                wilcoxon: stats::wilcoxon(&d, false),
                per_case,
            });
        }
    }
    let patient = match (before.patient, after.patient) {
        (Some(p), Some(q)) if p == q => Some(patient_change(p.0, &paired)),
        _ => None,
    };
    Against::Paired(Box::new(Comparison {
        before: before.name.clone(),
        after: after.name.clone(),
        testset_hash: after.testset_hash.clone(),
        paired_cases: paired.len(),
        failed,
        scored_in_one_only: one_only,
        metrics,
        patient,
    }))
}

fn patient_change(
    positive_class: u8,
    paired: &[(&str, &CaseValues, &CaseValues)],
) -> PatientChange {
    let (mut pos, mut neg) = (0u64, 0u64);
    let (mut tp_b, mut tp_a, mut tn_b, mut tn_a) = (0u64, 0u64, 0u64, 0u64);
    let (mut sens_d, mut spec_d) = ((0u64, 0u64), (0u64, 0u64));
    let mut disagrees = Vec::new();
    for (case, x, y) in paired {
        let (Some((rb, qb)), Some((ra, qa))) = (x.patient, y.patient) else {
            continue;
        };
        if rb != ra {
            disagrees.push(case.to_string());
            continue;
        }
        // Right = the call equals the reference.
        let (ok_b, ok_a) = (qb == rb, qa == ra);
        let (total, right_b, right_a, disc) = if rb {
            (&mut pos, &mut tp_b, &mut tp_a, &mut sens_d)
        } else {
            (&mut neg, &mut tn_b, &mut tn_a, &mut spec_d)
        };
        *total += 1;
        *right_b += u64::from(ok_b);
        *right_a += u64::from(ok_a);
        match (ok_b, ok_a) {
            (true, false) => disc.0 += 1,
            (false, true) => disc.1 += 1,
            _ => {}
        }
    }
    let rate = |k: u64, n: u64| {
        if n == 0 {
            f64::NAN
        } else {
            k as f64 / n as f64
        }
    };
    PatientChange {
        positive_class,
        positives: pos,
        negatives: neg,
        sensitivity_before: rate(tp_b, pos),
        sensitivity_after: rate(tp_a, pos),
        sensitivity_discordant: sens_d,
        sensitivity_p: stats::mcnemar_exact(sens_d.0, sens_d.1),
        specificity_before: rate(tn_b, neg),
        specificity_after: rate(tn_a, neg),
        specificity_discordant: spec_d,
        specificity_p: stats::mcnemar_exact(spec_d.0, spec_d.1),
        reference_disagrees: disagrees,
    }
}

/// A signed number with `d` decimals (`+0.021`, `-1.20`), "n/a" when undefined.
pub fn signed(v: f64, d: usize) -> String {
    if v.is_finite() {
        format!("{v:+.d$}")
    } else {
        "n/a".into()
    }
}

/// A p-value for people: three decimals, `p < 0.001` below that, "n/a" when undefined.
pub fn p_text(p: Option<f64>) -> String {
    match p {
        Some(p) if p.is_finite() && p < 0.001 => "p < 0.001".into(),
        Some(p) if p.is_finite() => format!("p = {p:.3}"),
        _ => "p n/a".into(),
    }
}

/// Decimals a metric is shown with (distances in mm: 2).
pub fn decimals(metric: Metric) -> usize {
    if metric.is_distance() {
        2
    } else {
        3
    }
}

/// One line: `nodule Dice +0.021 (95% CI +0.008 to +0.034), p = 0.003, 300 paired cases`.
pub fn change_line(m: &MetricChange) -> String {
    let d = decimals(m.metric);
    let unit = if m.metric.is_distance() { " mm" } else { "" };
    let ci = match m.ci95 {
        Some((lo, hi)) => format!(" (95% CI {} to {})", signed(lo, d), signed(hi, d)),
        None => String::new(),
    };
    let mut line = format!(
        "{} {} {}{unit}{ci}, {}, {} paired case{}",
        m.class,
        m.metric,
        signed(m.mean_difference, d),
        p_text(m.wilcoxon.and_then(|w| w.p)),
        m.n,
        if m.n == 1 { "" } else { "s" }
    );
    if m.undefined > 0 {
        line.push_str(&format!(
            " ({} with an undefined value left out)",
            m.undefined
        ));
    }
    line
}

/// The stated methods, for `summary.json` and the report.
pub const METHODS: &str = "paired over cases scored in both evaluations (same test-set content hash); difference = this submission - the other; mean difference with a paired percentile bootstrap 95% CI (2000 resamples of the per-case differences, SplitMix64 with a fixed seed, numpy-linear percentiles 2.5/97.5); two-sided Wilcoxon signed-rank p as scipy.stats.wilcoxon(after, before) in scipy 1.17 defaults: zero_method='wilcox' (zero differences dropped), average ranks for ties, correction=False, method='auto' (exact distribution for n <= 50 without zeros or ties; all 2^n sign flips for n <= 13 with zeros or ties; otherwise the normal approximation with tie-corrected variance); undefined when every difference is zero; patient level: McNemar exact (binomial, two-sided, as statsmodels mcnemar(exact=True)) on the discordant patients, sensitivity over the reference positives, specificity over the reference negatives";

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str, dice: f64, patient: Option<(bool, bool)>) -> CaseValues {
        CaseValues {
            case: id.into(),
            classes: BTreeMap::from([(1, BTreeMap::from([(Metric::Dice, dice)]))]),
            patient,
        }
    }

    fn side(name: &str, hash: &str, cases: Vec<CaseValues>, failures: Vec<(&str, Stage)>) -> Side {
        Side {
            name: name.into(),
            testset_hash: hash.into(),
            classes: vec![(1, "nodule".into())],
            patient: Some((1, 10.0)),
            cases,
            failures: failures.into_iter().map(|(c, s)| (c.into(), s)).collect(),
        }
    }

    #[test]
    fn other_test_set_content_is_never_paired() {
        let a = side("v1", "aaaa", vec![case("c1", 0.5, None)], vec![]);
        let b = side("v2", "bbbb", vec![case("c1", 0.6, None)], vec![]);
        let Against::Unpaired { against, reason } = compare(&a, &b) else {
            panic!("paired across test sets");
        };
        assert_eq!(against, "v1");
        assert!(reason.contains("other test-set content"), "{reason}");
        let empty = side("v1", "", vec![], vec![]);
        assert!(matches!(
            compare(&empty, &side("v2", "", vec![], vec![])),
            Against::Unpaired { .. }
        ));
    }

    #[test]
    fn failed_and_undefined_cases_are_listed_not_paired() {
        let before = side(
            "v1",
            "h",
            vec![
                case("c1", 0.5, Some((true, false))),
                case("c2", 0.6, Some((true, true))),
                case("c3", f64::NAN, Some((false, false))),
                case("c5", 0.9, Some((false, true))),
            ],
            vec![("c4", Stage::Timeout)],
        );
        let after = side(
            "v2",
            "h",
            vec![
                case("c1", 0.7, Some((true, true))),
                case("c2", 0.65, Some((true, true))),
                case("c3", 0.2, Some((false, false))),
                case("c4", 0.8, Some((false, false))),
            ],
            vec![("c5", Stage::Inference)],
        );
        let Against::Paired(c) = compare(&before, &after) else {
            panic!("same test set");
        };
        assert_eq!(c.paired_cases, 3);
        assert_eq!(
            c.failed,
            vec![
                FailedCase {
                    case: "c4".into(),
                    before: Some(Stage::Timeout),
                    after: None
                },
                FailedCase {
                    case: "c5".into(),
                    before: None,
                    after: Some(Stage::Inference)
                },
            ]
        );
        let m = c.change(1, Metric::Dice).unwrap();
        assert_eq!((m.n, m.undefined), (2, 1));
        // (0.7 - 0.5 + 0.65 - 0.6) / 2
        assert!((m.mean_difference - 0.125).abs() < 1e-12);
        assert_eq!(
            m.wilcoxon.unwrap().p,
            Some(0.5),
            "exact, n = 2: scipy gives 0.5"
        );
        let p = c.patient.as_ref().unwrap();
        assert_eq!((p.positives, p.negatives), (2, 1));
        assert_eq!(p.sensitivity_discordant, (0, 1));
        assert_eq!((p.sensitivity_before, p.sensitivity_after), (0.5, 1.0));
        assert_eq!(p.sensitivity_p, 1.0);
        assert!(
            change_line(m).starts_with("nodule Dice +0.125 (95% CI "),
            "{}",
            change_line(m)
        );
        assert!(change_line(m)
            .ends_with("p = 0.500, 2 paired cases (1 with an undefined value left out)"));
    }

    #[test]
    fn case_values_round_trip_through_json_with_undefined_values() {
        let c = case("c1", f64::NAN, Some((true, false)));
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"Dice\":null"), "{j}");
        let back: CaseValues = serde_json::from_str(&j).unwrap();
        assert!(back.classes[&1][&Metric::Dice].is_nan());
        assert_eq!(back.patient, Some((true, false)));
    }
}
