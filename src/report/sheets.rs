//! The table sheets: Summary, Cases, Lesions, Confusion, Failures, Run. Every number comes
//! from the [`Evaluation`] through the same accessors `summary.json` uses
//! ([`class_value`], the aggregate [`Stats`](crate::metrics::aggregate::Stats)), so the two
//! outputs cannot disagree.

use rust_xlsxwriter::{Image, Worksheet, XlsxError};

use super::style::{self, color_scale, header, key_values, num, Styles};
use crate::evaluation::Evaluation;
use crate::metrics::aggregate::{class_value, Metric, Stats};

/// Per case x class values of every computed key, shared by Cases and Charts.
pub(crate) struct CaseTable {
    /// Metrics computed for at least one case and class, in report order.
    pub keys: Vec<Metric>,
    /// (case index, class index, value per key).
    pub rows: Vec<(usize, usize, Vec<Option<f64>>)>,
    /// Whether any class has lesion detection.
    pub lesions: bool,
}

impl CaseTable {
    pub fn new(eval: &Evaluation) -> Self {
        let keys: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|&k| {
                eval.cases
                    .iter()
                    .any(|c| c.classes.iter().any(|m| class_value(m, k).is_some()))
            })
            .collect();
        let mut rows = Vec::new();
        for (i, c) in eval.cases.iter().enumerate() {
            for (j, m) in c.classes.iter().enumerate() {
                rows.push((i, j, keys.iter().map(|&k| class_value(m, k)).collect()));
            }
        }
        let lesions = eval
            .cases
            .iter()
            .any(|c| c.classes.iter().any(|m| m.lesions.is_some()));
        CaseTable {
            keys,
            rows,
            lesions,
        }
    }

    /// Column of `key` in the table's values, if computed.
    pub fn key_index(&self, key: Metric) -> Option<usize> {
        self.keys.iter().position(|&k| k == key)
    }
}

fn mean_of(eval: &Evaluation, label: u8, key: Metric) -> Option<&Stats> {
    eval.summary.per_class.get(&label)?.get(&key)
}

/// The Summary sheet.
pub(crate) fn summary(
    ws: &mut Worksheet,
    eval: &Evaluation,
    png: Option<&[u8]>,
    st: &Styles,
) -> Result<(), XlsxError> {
    let m = &eval.meta;
    ws.set_column_width(0, 26)?;
    for c in 1..16 {
        ws.set_column_width(c, 12.5)?;
    }
    ws.set_landscape();
    ws.set_print_fit_to_pages(1, 0);
    ws.write_string_with_format(0, 0, format!("evald report: {}", eval.who()), &st.title)?;
    let na = || "n/a".to_string();
    let rows: Vec<(&str, String)> = vec![
        ("Task", m.task.clone()),
        ("Vendor", m.vendor.clone().unwrap_or_else(na)),
        ("Submission", m.submission.clone().unwrap_or_else(na)),
        ("Model sha256", m.model_sha256.clone().unwrap_or_else(na)),
        (
            "Cases",
            format!(
                "{} scored, {} failed, {} in the test set",
                eval.cases.len(),
                eval.failures.len(),
                eval.total_cases()
            ),
        ),
        ("Evaluated", format!("{} to {}", m.started, m.finished)),
        ("Test set (content hash)", m.dataset_hash.clone()),
        ("evald", m.evald_version.clone()),
    ];
    let mut rows = rows;
    if let Some(why) = &m.stopped_early {
        rows.push(("STOPPED EARLY", why.clone()));
    }
    key_values(ws, 2, &rows, st)?;
    ws.write_string_with_format(
        11,
        0,
        "Empty cells are undefined values (e.g. Dice when both masks are empty); they are excluded from every mean. No formulas: all numbers equal summary.json.",
        &st.note,
    )?;
    if let Some(png) = png {
        let img = Image::new_from_buffer(png)?
            .set_scale_width(0.5)
            .set_scale_height(0.5)
            .set_alt_text("Dice per case, box and strip plot per class");
        ws.insert_image_with_offset(1, 8, &img, 10, 0)?;
    }

    // Headline per class.
    let mut r = 17u32;
    ws.write_string_with_format(
        r,
        0,
        "Headline per class (mean over cases, 95% bootstrap CI of the mean)",
        &st.subtitle,
    )?;
    r += 1;
    let head_keys = [
        (Metric::Dice, false),
        (Metric::IoU, false),
        (Metric::Hd95, true),
        (Metric::Nsd, false),
    ];
    let mut cols = vec!["Class", "Label", "Cases"];
    let names: Vec<String> = head_keys
        .iter()
        .flat_map(|(k, mm)| {
            let unit = if *mm { " (mm)" } else { "" };
            [
                format!("{k}{unit}"),
                format!("{k} CI low"),
                format!("{k} CI high"),
            ]
        })
        .collect();
    cols.extend(names.iter().map(String::as_str));
    cols.push("Dice undefined");
    header(ws, r, 0, &cols, st)?;
    let first = r + 1;
    for c in &eval.spec.classes {
        r += 1;
        ws.write_string(r, 0, &c.name)?;
        ws.write_number(r, 1, c.label)?;
        let dice = mean_of(eval, c.label, Metric::Dice);
        num(ws, r, 2, dice.map(|s| s.n as f64), &st.int)?;
        for (i, &(k, _)) in head_keys.iter().enumerate() {
            let s = mean_of(eval, c.label, k);
            let f = st.for_key(k);
            let col = 3 + 3 * i as u16;
            num(ws, r, col, s.map(|s| s.mean), f)?;
            num(ws, r, col + 1, s.map(|s| s.ci95_low), f)?;
            num(ws, r, col + 2, s.map(|s| s.ci95_high), f)?;
        }
        num(ws, r, 15, dice.map(|s| s.n_nan as f64), &st.int)?;
    }
    if eval.spec.classes.len() > 1 {
        r += 1;
        ws.write_string_with_format(r, 0, "foreground mean", &st.key)?;
        for (i, &(k, _)) in head_keys.iter().enumerate() {
            let v = eval.summary.foreground_mean.get(&k).copied();
            num(ws, r, 3 + 3 * i as u16, v, st.for_key(k))?;
        }
    }
    color_scale(ws, first, r, 3)?;

    // Full statistics.
    r += 3;
    ws.write_string_with_format(
        r,
        0,
        "Statistics per class and metric over cases (undefined values counted, then excluded)",
        &st.subtitle,
    )?;
    r += 1;
    header(
        ws,
        r,
        0,
        &[
            "Class",
            "Label",
            "Metric",
            "n",
            "n undefined",
            "mean",
            "std",
            "median",
            "p25",
            "p75",
            "min",
            "max",
            "CI95 low",
            "CI95 high",
        ],
        st,
    )?;
    for c in &eval.spec.classes {
        let Some(by_key) = eval.summary.per_class.get(&c.label) else {
            continue;
        };
        for key in Metric::ALL {
            let Some(s) = by_key.get(&key) else { continue };
            r += 1;
            ws.write_string(r, 0, &c.name)?;
            ws.write_number(r, 1, c.label)?;
            stats_row(ws, r, key, s, st)?;
        }
    }
    // Each case's mean over classes, then statistics over cases: the same block as
    // summary.json's `statistics.foreground`. No label: it is not a class.
    for key in Metric::ALL {
        let Some(s) = eval.summary.foreground.get(&key) else {
            continue;
        };
        r += 1;
        ws.write_string_with_format(r, 0, "foreground", &st.key)?;
        stats_row(ws, r, key, s, st)?;
    }

    // Patient level.
    r += 3;
    ws.write_string_with_format(r, 0, "Patient-level diagnosis", &st.subtitle)?;
    r += 1;
    if let Some(p) = &eval.summary.patient {
        ws.write_string(
            r,
            0,
            format!(
                "positive = {} ({}) present with at least {} mm³",
                eval.class_name(p.positive_class),
                p.positive_class,
                p.min_positive_mm3
            ),
        )?;
        r += 1;
        header(
            ws,
            r,
            0,
            &[
                "Patients",
                "TP",
                "FP",
                "FN",
                "TN",
                "Sensitivity",
                "Specificity",
                "PPV",
                "NPV",
                "Accuracy",
            ],
            st,
        )?;
        r += 1;
        ws.write_number_with_format(r, 0, f64::from(p.tp + p.fp + p.fn_ + p.tn), &st.int)?;
        for (i, v) in [p.tp, p.fp, p.fn_, p.tn].into_iter().enumerate() {
            ws.write_number_with_format(r, 1 + i as u16, f64::from(v), &st.int)?;
        }
        for (i, v) in [p.sensitivity, p.specificity, p.ppv, p.npv, p.accuracy]
            .into_iter()
            .enumerate()
        {
            num(ws, r, 5 + i as u16, Some(v), &st.frac)?;
        }
    } else {
        ws.write_string_with_format(
            r,
            0,
            "not computed (the task names no positive_class)",
            &st.note,
        )?;
    }

    // Slice tallies.
    r += 3;
    ws.write_string_with_format(r, 0, "Axial slices per class", &st.subtitle)?;
    r += 1;
    header(
        ws,
        r,
        0,
        &[
            "Class",
            "Label",
            "Slices",
            "With reference",
            "With prediction",
            "FP only",
            "FN only",
        ],
        st,
    )?;
    for c in &eval.spec.classes {
        let Some(t) = eval.summary.slices.get(&c.label) else {
            continue;
        };
        r += 1;
        ws.write_string(r, 0, &c.name)?;
        ws.write_number(r, 1, c.label)?;
        for (i, v) in [
            t.slices,
            t.with_reference,
            t.with_prediction,
            t.fp_only,
            t.fn_only,
        ]
        .into_iter()
        .enumerate()
        {
            ws.write_number_with_format(r, 2 + i as u16, v as f64, &st.int)?;
        }
    }

    // Conventions.
    r += 3;
    ws.write_string_with_format(r, 0, "Conventions used", &st.subtitle)?;
    let conv = crate::evaluation::summary::conventions(eval);
    if let Some(obj) = conv.as_object() {
        for (k, v) in obj {
            r += 1;
            ws.write_string_with_format(r, 0, k, &st.key)?;
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            ws.write_string(r, 1, text)?;
        }
    }
    Ok(())
}

/// The Cases sheet: one row per case x class.
pub(crate) fn cases(
    ws: &mut Worksheet,
    eval: &Evaluation,
    t: &CaseTable,
    st: &Styles,
) -> Result<(), XlsxError> {
    let mut cols: Vec<&str> = vec!["case", "class", "label"];
    cols.extend(t.keys.iter().map(|k| k.key()));
    let lesion_extra = ["LesionPrecision", "LesionRecall", "LesionMeanMatchedDice"];
    if t.lesions {
        cols.extend(lesion_extra);
    }
    let first_file_col = cols.len() as u16;
    cols.extend(["reference_file", "prediction_file", "note"]);
    header(ws, 0, 0, &cols, st)?;
    ws.set_row_height(0, 30)?;
    ws.set_column_width(0, 18)?;
    ws.set_column_width(1, 12)?;
    ws.set_column_width(2, 6)?;
    for i in 3..first_file_col {
        ws.set_column_width(i, 11)?;
    }
    ws.set_column_width(first_file_col, 40)?;
    ws.set_column_width(first_file_col + 1, 40)?;
    ws.set_column_width(first_file_col + 2, 30)?;
    let mut r = 0u32;
    for (ci, ki, vals) in &t.rows {
        r += 1;
        let case = &eval.cases[*ci];
        let class = &eval.spec.classes[*ki];
        ws.write_string(r, 0, &case.case)?;
        ws.write_string(r, 1, &class.name)?;
        ws.write_number(r, 2, class.label)?;
        for (i, (k, v)) in t.keys.iter().zip(vals).enumerate() {
            num(ws, r, 3 + i as u16, *v, st.for_key(*k))?;
        }
        if t.lesions {
            let l = case.classes[*ki].lesions.as_ref();
            let base = 3 + t.keys.len() as u16;
            num(ws, r, base, l.map(|l| l.precision), &st.frac)?;
            num(ws, r, base + 1, l.map(|l| l.recall), &st.frac)?;
            num(ws, r, base + 2, l.map(|l| l.mean_matched_dice), &st.frac)?;
        }
        ws.write_string(r, first_file_col, case.reference_file.display().to_string())?;
        ws.write_string(
            r,
            first_file_col + 1,
            case.prediction_file.display().to_string(),
        )?;
        let mut notes: Vec<String> = case.reoriented.iter().cloned().collect();
        if !case.unevaluated.is_empty() {
            notes.push(format!(
                "outside the task's classes, scored as background: {}",
                case.unevaluated
                    .iter()
                    .map(|u| u.describe())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !notes.is_empty() {
            ws.write_string(r, first_file_col + 2, notes.join("; "))?;
        }
    }
    ws.set_freeze_panes(1, 2)?;
    ws.autofilter(0, 0, r.max(1), cols.len() as u16 - 1)?;
    for (i, k) in t.keys.iter().enumerate() {
        if style::is_scored_fraction(*k) {
            color_scale(ws, 1, r, 3 + i as u16)?;
        }
    }
    if t.lesions {
        color_scale(ws, 1, r, 3 + t.keys.len() as u16 + 2)?;
    }
    Ok(())
}

/// The Lesions sheet: one row per lesion.
pub(crate) fn lesions(ws: &mut Worksheet, eval: &Evaluation, st: &Styles) -> Result<(), XlsxError> {
    let cols = [
        "case",
        "class",
        "label",
        "source",
        "lesion",
        "volume_ml",
        "matched_with",
        "Dice",
        "centroid_x",
        "centroid_y",
        "centroid_z",
    ];
    header(ws, 0, 0, &cols, st)?;
    ws.set_column_width(0, 18)?;
    ws.set_column_width(1, 12)?;
    ws.set_column_width(3, 11)?;
    for c in 4..cols.len() as u16 {
        ws.set_column_width(c, 11)?;
    }
    let mut r = 0u32;
    for case in &eval.cases {
        for m in &case.classes {
            let Some(l) = &m.lesions else { continue };
            for row in &l.lesions {
                r += 1;
                ws.write_string(r, 0, &case.case)?;
                ws.write_string(r, 1, eval.class_name(m.label))?;
                ws.write_number(r, 2, m.label)?;
                ws.write_string(r, 3, row.source)?;
                ws.write_number(r, 4, row.id)?;
                num(ws, r, 5, Some(row.volume_ml), &st.ml)?;
                if let Some(w) = row.matched_with {
                    ws.write_number(r, 6, w)?;
                }
                num(ws, r, 7, Some(row.dice), &st.frac)?;
                for (i, v) in row.centroid_vox.iter().enumerate() {
                    num(ws, r, 8 + i as u16, Some(*v), &st.mm)?;
                }
            }
        }
    }
    ws.set_freeze_panes(1, 0)?;
    if r == 0 {
        let why = if eval.spec.classes.iter().any(|c| c.lesion) {
            "No lesion (connected component) in any reference or prediction."
        } else {
            "Lesion-wise detection is off: the task names no lesion_classes."
        };
        ws.write_string_with_format(1, 0, why, &st.note)?;
    } else {
        ws.autofilter(0, 0, r, cols.len() as u16 - 1)?;
        color_scale(ws, 1, r, 7)?;
    }
    Ok(())
}

/// The Confusion sheet: voxel C x C (+ row shares) and the patient-level 2x2.
pub(crate) fn confusion(
    ws: &mut Worksheet,
    eval: &Evaluation,
    st: &Styles,
) -> Result<(), XlsxError> {
    let labels: Vec<u8> = std::iter::once(0).chain(eval.spec.labels()).collect();
    let k = labels.len();
    let name = |l: u8| {
        if l == 0 {
            "background / other".to_string()
        } else {
            eval.class_name(l)
        }
    };
    ws.set_column_width(0, 30)?;
    for c in 1..=k.max(4) as u16 {
        ws.set_column_width(c, 16)?;
    }
    ws.write_string_with_format(
        0,
        0,
        format!(
            "Voxel confusion matrix: rows = reference, columns = prediction, summed over {} scored cases",
            eval.cases.len()
        ),
        &st.subtitle,
    )?;
    let matrix = &eval.summary.confusion;
    let block = |ws: &mut Worksheet, top: u32, share: bool| -> Result<u32, XlsxError> {
        ws.write_string_with_format(top, 0, "reference \\ prediction", &st.header)?;
        for (j, &l) in labels.iter().enumerate() {
            ws.write_string_with_format(top, 1 + j as u16, name(l), &st.header)?;
        }
        for (i, &l) in labels.iter().enumerate() {
            let r = top + 1 + i as u32;
            ws.write_string_with_format(r, 0, name(l), &st.key)?;
            let row = matrix.get(i * k..(i + 1) * k).unwrap_or(&[]);
            let total: u64 = row.iter().sum();
            for (j, &v) in row.iter().enumerate() {
                if share {
                    let s = (total > 0).then(|| v as f64 / total as f64);
                    num(ws, r, 1 + j as u16, s, &st.pct)?;
                } else {
                    ws.write_number_with_format(r, 1 + j as u16, v as f64, &st.int)?;
                }
            }
        }
        Ok(top + 1 + k as u32)
    };
    let end = block(ws, 2, false)?;
    ws.write_string_with_format(
        end + 1,
        0,
        "Share of each reference class's voxels (row sums = 100%)",
        &st.subtitle,
    )?;
    let end = block(ws, end + 2, true)?;
    let mut r = end + 2;
    ws.write_string_with_format(r, 0, "Patient-level diagnosis", &st.subtitle)?;
    r += 1;
    let Some(p) = &eval.summary.patient else {
        ws.write_string_with_format(
            r,
            0,
            "not computed (the task names no positive_class)",
            &st.note,
        )?;
        return Ok(());
    };
    ws.write_string(
        r,
        0,
        format!(
            "positive = {} present with at least {} mm³",
            eval.class_name(p.positive_class),
            p.min_positive_mm3
        ),
    )?;
    r += 1;
    header(
        ws,
        r,
        0,
        &[
            "reference \\ prediction",
            "predicted positive",
            "predicted negative",
        ],
        st,
    )?;
    ws.write_string_with_format(r + 1, 0, "reference positive", &st.key)?;
    ws.write_number_with_format(r + 1, 1, f64::from(p.tp), &st.int)?;
    ws.write_number_with_format(r + 1, 2, f64::from(p.fn_), &st.int)?;
    ws.write_string_with_format(r + 2, 0, "reference negative", &st.key)?;
    ws.write_number_with_format(r + 2, 1, f64::from(p.fp), &st.int)?;
    ws.write_number_with_format(r + 2, 2, f64::from(p.tn), &st.int)?;
    r += 4;
    for (k, v) in [
        ("Sensitivity", p.sensitivity),
        ("Specificity", p.specificity),
        ("PPV", p.ppv),
        ("NPV", p.npv),
        ("Accuracy", p.accuracy),
    ] {
        ws.write_string_with_format(r, 0, k, &st.key)?;
        num(ws, r, 1, Some(v), &st.frac)?;
        r += 1;
    }
    r += 1;
    header(
        ws,
        r,
        0,
        &[
            "case",
            "reference positive",
            "predicted positive",
            "outcome",
        ],
        st,
    )?;
    for (case, re, pr) in &p.calls {
        r += 1;
        ws.write_string(r, 0, case)?;
        ws.write_boolean(r, 1, *re)?;
        ws.write_boolean(r, 2, *pr)?;
        let outcome = match (re, pr) {
            (true, true) => "TP",
            (false, true) => "FP",
            (true, false) => "FN",
            (false, false) => "TN",
        };
        ws.write_string(r, 3, outcome)?;
    }
    Ok(())
}

/// The Failures sheet.
pub(crate) fn failures(
    ws: &mut Worksheet,
    eval: &Evaluation,
    st: &Styles,
) -> Result<(), XlsxError> {
    header(ws, 0, 0, &["case", "stage", "reason", "attempts"], st)?;
    ws.set_column_width(0, 18)?;
    ws.set_column_width(1, 12)?;
    ws.set_column_width(2, 100)?;
    ws.set_column_width(3, 9)?;
    ws.set_freeze_panes(1, 0)?;
    if eval.failures.is_empty() {
        ws.write_string_with_format(1, 0, "No case failed.", &st.note)?;
        return Ok(());
    }
    for (i, f) in eval.failures.iter().enumerate() {
        let r = 1 + i as u32;
        ws.write_string(r, 0, &f.case)?;
        ws.write_string(r, 1, f.stage.as_str())?;
        ws.write_string_with_format(r, 2, &f.reason, &st.wrap)?;
        ws.write_number(r, 3, f.attempts)?;
    }
    ws.autofilter(0, 0, eval.failures.len() as u32, 3)?;
    Ok(())
}

/// The Run sheet: provenance and timings.
pub(crate) fn run(ws: &mut Worksheet, eval: &Evaluation, st: &Styles) -> Result<(), XlsxError> {
    let m = &eval.meta;
    let na = || "n/a".to_string();
    ws.set_column_width(0, 26)?;
    ws.set_column_width(1, 70)?;
    ws.write_string_with_format(0, 0, "Run", &st.title)?;
    let rows: Vec<(&str, String)> = vec![
        ("evald version", m.evald_version.clone()),
        ("model format", m.model_format.clone().unwrap_or_else(na)),
        ("runtime", m.runtime.clone().unwrap_or_else(na)),
        ("task", m.task.clone()),
        ("vendor", m.vendor.clone().unwrap_or_else(na)),
        ("submission", m.submission.clone().unwrap_or_else(na)),
        (
            "submission folder",
            m.submission_dir
                .as_ref()
                .map_or_else(na, |p| p.display().to_string()),
        ),
        ("model sha256", m.model_sha256.clone().unwrap_or_else(na)),
        ("reference labels", m.labels_dir.display().to_string()),
        ("inputs", m.inputs_dir.display().to_string()),
        ("test set content hash", m.dataset_hash.clone()),
        (
            "devices",
            if m.devices.is_empty() {
                na()
            } else {
                m.devices.join(", ")
            },
        ),
        ("config digest", m.config_digest.clone().unwrap_or_else(na)),
        ("started", m.started.clone()),
        ("finished", m.finished.clone()),
        ("cases scored", eval.cases.len().to_string()),
        ("cases failed", eval.failures.len().to_string()),
        (
            "stopped early",
            m.stopped_early.clone().unwrap_or_else(|| "no".into()),
        ),
    ];
    let mut r = key_values(ws, 2, &rows, st)?;
    r += 1;
    ws.write_string_with_format(r, 0, "Timings per stage", &st.subtitle)?;
    r += 1;
    header(ws, r, 0, &["stage", "seconds"], st)?;
    for (stage, secs) in &m.timings {
        r += 1;
        ws.write_string(r, 0, stage)?;
        num(ws, r, 1, Some(*secs), &st.secs)?;
    }
    Ok(())
}

/// One row of the statistics table from column 2 on: metric key, counts, then the
/// statistics in the key's number format.
fn stats_row(
    ws: &mut Worksheet,
    r: u32,
    key: Metric,
    s: &Stats,
    st: &Styles,
) -> Result<(), XlsxError> {
    let f = st.for_key(key);
    ws.write_string(r, 2, key.key())?;
    ws.write_number_with_format(r, 3, s.n as f64, &st.int)?;
    ws.write_number_with_format(r, 4, s.n_nan as f64, &st.int)?;
    for (i, v) in [
        s.mean,
        s.std,
        s.median,
        s.p25,
        s.p75,
        s.min,
        s.max,
        s.ci95_low,
        s.ci95_high,
    ]
    .into_iter()
    .enumerate()
    {
        num(ws, r, 5 + i as u16, Some(v), f)?;
    }
    Ok(())
}

/// The Compare sheet: the paired comparison with the previous submission, the numbers of
/// `summary.json`'s `evald.comparison` (one row per class and metric; the patient level;
/// the cases failed in either). Written only when there is a comparison.
pub(crate) fn compare(
    ws: &mut Worksheet,
    against: &crate::evaluation::compare::Against,
    st: &Styles,
) -> Result<(), XlsxError> {
    use crate::evaluation::compare::{Against, METHODS};
    ws.set_column_width(0, 16)?;
    ws.set_column_width(1, 10)?;
    ws.write_string_with_format(0, 0, "Paired comparison", &st.title)?;
    let c = match against {
        Against::Unpaired { against, reason } => {
            ws.write_string(2, 0, format!("against {against}"))?;
            ws.write_string_with_format(3, 0, reason, &st.note)?;
            return Ok(());
        }
        Against::Paired(c) => c,
    };
    let rows: Vec<(&str, String)> = vec![
        ("this submission", c.after.clone()),
        ("against", c.before.clone()),
        ("test set content hash", c.testset_hash.clone()),
        ("paired cases", c.paired_cases.to_string()),
    ];
    let mut r = key_values(ws, 2, &rows, st)?;
    ws.write_string_with_format(r, 0, METHODS, &st.note)?;
    r += 2;
    header(
        ws,
        r,
        0,
        &[
            "class",
            "metric",
            "n",
            "undefined",
            "mean before",
            "mean after",
            "mean difference",
            "CI95 low",
            "CI95 high",
            "Wilcoxon p",
            "Wilcoxon method",
        ],
        st,
    )?;
    let table = r;
    for m in &c.metrics {
        r += 1;
        let fmt = if m.metric.is_distance() {
            &st.mm
        } else {
            &st.frac
        };
        ws.write_string(r, 0, &m.class)?;
        ws.write_string(r, 1, m.metric.key())?;
        ws.write_number_with_format(r, 2, m.n as f64, &st.int)?;
        ws.write_number_with_format(r, 3, m.undefined as f64, &st.int)?;
        num(ws, r, 4, Some(m.mean_before), fmt)?;
        num(ws, r, 5, Some(m.mean_after), fmt)?;
        num(ws, r, 6, Some(m.mean_difference), fmt)?;
        num(ws, r, 7, m.ci95.map(|c| c.0), fmt)?;
        num(ws, r, 8, m.ci95.map(|c| c.1), fmt)?;
        num(ws, r, 9, m.wilcoxon.and_then(|w| w.p), &st.frac)?;
        if let Some(w) = m.wilcoxon {
            let method = match w.method {
                crate::stats::WilcoxonMethod::Exact => "exact",
                crate::stats::WilcoxonMethod::Permutation => "permutation",
                crate::stats::WilcoxonMethod::Asymptotic => "asymptotic",
            };
            ws.write_string(r, 10, method)?;
        }
    }
    if r > table {
        ws.autofilter(table, 0, r, 10)?;
    }
    if let Some(p) = &c.patient {
        r += 2;
        ws.write_string_with_format(r, 0, "Patient level", &st.subtitle)?;
        r += 1;
        header(
            ws,
            r,
            0,
            &[
                "",
                "patients",
                "before",
                "after",
                "right only before",
                "right only after",
                "McNemar exact p",
            ],
            st,
        )?;
        let lines = [
            (
                "sensitivity",
                p.positives,
                p.sensitivity_before,
                p.sensitivity_after,
                p.sensitivity_discordant,
                p.sensitivity_p,
            ),
            (
                "specificity",
                p.negatives,
                p.specificity_before,
                p.specificity_after,
                p.specificity_discordant,
                p.specificity_p,
            ),
        ];
        for (name, n, b, a, d, pv) in lines {
            r += 1;
            ws.write_string(r, 0, name)?;
            ws.write_number_with_format(r, 1, n as f64, &st.int)?;
            num(ws, r, 2, Some(b), &st.pct)?;
            num(ws, r, 3, Some(a), &st.pct)?;
            ws.write_number_with_format(r, 4, d.0 as f64, &st.int)?;
            ws.write_number_with_format(r, 5, d.1 as f64, &st.int)?;
            num(ws, r, 6, Some(pv), &st.frac)?;
        }
    }
    r += 2;
    ws.write_string_with_format(r, 0, "Cases failed in either (not paired)", &st.subtitle)?;
    r += 1;
    header(ws, r, 0, &["case", "before", "after"], st)?;
    if c.failed.is_empty() {
        ws.write_string_with_format(r + 1, 0, "None.", &st.note)?;
    }
    for f in &c.failed {
        r += 1;
        ws.write_string(r, 0, &f.case)?;
        ws.write_string(
            r,
            1,
            f.before.map_or("scored", crate::evaluation::Stage::as_str),
        )?;
        ws.write_string(
            r,
            2,
            f.after.map_or("scored", crate::evaluation::Stage::as_str),
        )?;
    }
    Ok(())
}
