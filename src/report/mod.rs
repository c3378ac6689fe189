//! The Excel report (`report.xlsx`): what a radiologist-statistician opens first.
//!
//! Sheets, in order:
//! - **Summary**: who and what was evaluated, the headline per class (mean Dice, IoU, HD95,
//!   NSD with 95% CIs), the full statistics table, patient-level diagnosis, per-slice
//!   tallies, the conventions used, and the Dice box/strip plot ([`crate::plot`]);
//! - **Charts**: native Excel charts (Dice per case sorted, Dice histogram, Dice against
//!   reference volume) and, to their right, the numbers they draw;
//! - **Cases**: one row per case x class with every `METRICS.md` key (same names as
//!   `summary.json`);
//! - **Slices**: per-slice counts, Dice and IoU, written in constant-memory mode (row by row,
//!   streamed to a temporary file) so a 300-case CT test set stays fast and small;
//! - **Lesions**: one row per lesion (reference and predicted components);
//! - **Confusion**: the voxel confusion matrix with class names, its row shares, and the
//!   patient-level 2x2 with every patient's call;
//! - **Failures**: cases that could not be scored;
//! - **Run**: versions, config digest, devices, timings, dataset hash.
//!
//! Invariants: undefined numbers are empty cells (never 0 and never the text "NAN"); the
//! workbook holds no formulas (every number is a value computed once, in Rust, equal to
//! `summary.json`); the file is replaced atomically and an earlier report is kept under a
//! timestamped name, never overwritten.

mod charts;
mod sheets;
mod slices;
mod style;

use std::path::{Path, PathBuf};

use rust_xlsxwriter::{DocProperties, Workbook, Worksheet, XlsxError};

use crate::evaluation::Evaluation;

/// The sheet added after [`SHEETS`] when the evaluation has a comparison with the
/// vendor's previous submission (the numbers of `summary.json`'s `evald.comparison`).
pub const COMPARE_SHEET: &str = "Compare";

/// Sheet names, in workbook order.
pub const SHEETS: [&str; 8] = [
    "Summary",
    "Charts",
    "Cases",
    "Slices",
    "Lesions",
    "Confusion",
    "Failures",
    "Run",
];

/// Writing the report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// rust_xlsxwriter refused something.
    #[error("{path}: {source}")]
    Xlsx {
        /// The report file.
        path: PathBuf,
        /// The writer's error.
        #[source]
        source: XlsxError,
    },
    /// Creating, writing, keeping or renaming a file failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Write the workbook to `path` atomically: it is built into a temporary file in the same
/// folder, flushed, and renamed over `path`. A report already at `path` is kept as
/// `<stem>-<its modification time, UTC>.xlsx` beside it (hard link, so `path` never
/// disappears in between).
///
/// Blocking and CPU-bound (seconds for a 300-case test set): from async code, call it in
/// `spawn_blocking`.
///
/// # Errors
/// [`ReportError`] naming the file; on error `path` is untouched.
pub fn write(eval: &Evaluation, path: &Path) -> Result<(), ReportError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| ReportError::Io {
            path: p,
            what,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("creating the folder", dir))?;
    let mut wb = build(eval).map_err(|source| ReportError::Xlsx {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tmp =
        crate::files::output_temp_in(dir).map_err(io("creating a temporary file", dir))?;
    let tmp_path = tmp.path().to_path_buf();
    {
        let mut out = std::io::BufWriter::new(tmp.as_file_mut());
        wb.save_to_writer(&mut out)
            .map_err(|source| ReportError::Xlsx {
                path: tmp_path.clone(),
                source,
            })?;
        // Explicitly: a BufWriter dropped with an error (disk full) would hide it, and a
        // truncated workbook would be renamed into place.
        std::io::Write::flush(&mut out).map_err(io("writing", &tmp_path))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(io("flushing", &tmp_path))?;
    if let Some(kept) = keep_previous(path)? {
        tracing::info!(report = %path.display(), previous = %kept.display(), "kept the previous report");
    }
    tmp.persist(path)
        .map_err(|e| io("renaming the new report into place", path)(e.error))?;
    // Make the rename durable too (a crash right after must not bring back the old name).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The history name for a report last modified at `mtime`: `report-20261126T101500Z.xlsx`.
fn history_name(path: &Path, mtime: std::time::SystemTime, n: u32) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or_else(|| "xlsx".into(), |s| s.to_string_lossy().into_owned());
    let ts = chrono::DateTime::<chrono::Utc>::from(mtime).format("%Y%m%dT%H%M%SZ");
    let suffix = if n == 0 {
        String::new()
    } else {
        format!("-{n}")
    };
    path.with_file_name(format!("{stem}-{ts}{suffix}.{ext}"))
}

/// Keep the report at `path` (if any) under a history name that does not exist yet.
fn keep_previous(path: &Path) -> Result<Option<PathBuf>, ReportError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReportError::Io {
                path: path.to_path_buf(),
                what: "looking at the previous report",
                source,
            })
        }
    };
    let mtime = meta
        .modified()
        .unwrap_or_else(|_| std::time::SystemTime::now());
    for n in 0..1000 {
        let kept = history_name(path, mtime, n);
        match std::fs::hard_link(path, &kept) {
            Ok(()) => return Ok(Some(kept)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // Filesystems without hard links (some network shares): copy instead; the
            // original stays in place until the rename, so nothing is lost on failure.
            Err(_) if !kept.exists() => {
                std::fs::copy(path, &kept).map_err(|source| ReportError::Io {
                    path: kept.clone(),
                    what: "keeping the previous report",
                    source,
                })?;
                return Ok(Some(kept));
            }
            Err(_) => continue,
        }
    }
    Err(ReportError::Io {
        path: path.to_path_buf(),
        what: "keeping the previous report",
        source: std::io::Error::other("1000 history names for the same second are taken"),
    })
}

fn named(name: &str) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(name)?;
    Ok(ws)
}

/// Build the whole workbook in memory (the Slices sheet streams to a temporary file).
///
/// # Errors
/// The writer's error (row limits, names).
pub fn build(eval: &Evaluation) -> Result<Workbook, XlsxError> {
    let st = style::Styles::new();
    let mut wb = Workbook::new();
    // Zip level 3 instead of 6: with 180,000 Slices rows measured 5.0 s / 7.5 MB against
    // 6.6-8.7 s / 6.3 MB (busy 2-core VM); writing time matters more than 1 MB.
    wb.set_zip_compression_level(3);
    let who = eval.who();
    let mut props = DocProperties::new()
        .set_title(format!("evald report: {who}"))
        .set_subject("Segmentation model evaluation")
        .set_author("evald")
        .set_comment("Numbers equal summary.json; empty cells are undefined values.")
        .set_custom_property("task", eval.meta.task.as_str())
        .set_custom_property("evald_version", eval.meta.evald_version.as_str());
    if let Some(sha) = &eval.meta.model_sha256 {
        props = props.set_custom_property("model_sha256", sha.as_str());
    }
    wb.set_properties(&props);
    let png = match crate::plot::dice_png(eval) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "report without the Dice plot");
            None
        }
    };
    let cases = sheets::CaseTable::new(eval);

    let mut ws = named(SHEETS[0])?;
    sheets::summary(&mut ws, eval, png.as_deref(), &st)?;
    ws.set_active(true);
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[1])?;
    charts::charts(&mut ws, eval, &cases, &st)?;
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[2])?;
    sheets::cases(&mut ws, eval, &cases, &st)?;
    wb.push_worksheet(ws);

    let mut ws = wb.new_worksheet_with_constant_memory()?;
    ws.set_name(SHEETS[3])?;
    slices::slices(&mut ws, eval, &st)?;
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[4])?;
    sheets::lesions(&mut ws, eval, &st)?;
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[5])?;
    sheets::confusion(&mut ws, eval, &st)?;
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[6])?;
    sheets::failures(&mut ws, eval, &st)?;
    wb.push_worksheet(ws);

    let mut ws = named(SHEETS[7])?;
    sheets::run(&mut ws, eval, &st)?;
    wb.push_worksheet(ws);

    if let Some(against) = &eval.comparison {
        let mut ws = named(COMPARE_SHEET)?;
        sheets::compare(&mut ws, against, &st)?;
        wb.push_worksheet(ws);
    }
    Ok(wb)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Compare sheet's numbers are summary.json's `evald.comparison` numbers, read back
    /// from the written file.
    #[test]
    fn the_compare_sheet_says_what_summary_json_says() {
        use std::collections::BTreeMap;

        use calamine::{Data, Reader};

        use crate::evaluation::compare::{compare, CaseValues, Side};
        use crate::metrics::aggregate::Metric;

        let side = |name: &str, dice: &[f64]| Side {
            name: name.into(),
            testset_hash: "h".into(),
            classes: vec![(1, "nodule".into())],
            patient: Some((1, 10.0)),
            cases: dice
                .iter()
                .enumerate()
                .map(|(i, &d)| CaseValues {
                    case: format!("c{i}"),
                    classes: BTreeMap::from([(
                        1,
                        BTreeMap::from([(Metric::Dice, d), (Metric::IoU, d / (2.0 - d))]),
                    )]),
                    patient: Some((i % 2 == 0, i % 3 == 0)),
                })
                .collect(),
            failures: vec![],
        };
        let before = side("v1", &[0.5, 0.61, 0.7, 0.82, 0.4, 0.9]);
        let after = side("v2", &[0.55, 0.6, 0.78, 0.83, 0.52, 0.91]);
        let spec = crate::metrics::EvalSpec::for_classes(&[(1, "nodule")]);
        let mut eval = Evaluation::new(spec, vec![], vec![], Default::default());
        eval.comparison = Some(compare(&before, &after));
        let want = crate::evaluation::summary::comparison_json(eval.comparison.as_ref());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.xlsx");
        write(&eval, &path).unwrap();
        let mut wb: calamine::Xlsx<_> = calamine::open_workbook(&path).unwrap();
        assert!(wb.sheet_names().contains(&COMPARE_SHEET.to_string()));
        let range = wb.worksheet_range(COMPARE_SHEET).unwrap();
        let f = |c: &Data| match c {
            Data::Float(x) => *x,
            other => panic!("not a number: {other:?}"),
        };
        let mut seen = 0;
        for row in range.rows() {
            let (Some(Data::String(class)), Some(Data::String(metric))) = (row.first(), row.get(1))
            else {
                continue;
            };
            if class != "nodule" {
                continue;
            }
            let m = &want["metrics"]["1"][metric.as_str()];
            assert_eq!(f(&row[2]), m["n"].as_f64().unwrap());
            assert_eq!(f(&row[4]), m["mean_before"].as_f64().unwrap());
            assert_eq!(f(&row[5]), m["mean_after"].as_f64().unwrap());
            assert_eq!(f(&row[6]), m["mean_difference"].as_f64().unwrap());
            assert_eq!(f(&row[7]), m["ci95"][0].as_f64().unwrap());
            assert_eq!(f(&row[8]), m["ci95"][1].as_f64().unwrap());
            assert_eq!(f(&row[9]), m["wilcoxon"]["p"].as_f64().unwrap());
            seen += 1;
        }
        assert_eq!(seen, 2, "Dice and IoU rows");
        let sens = range
            .rows()
            .find(|r| r.first() == Some(&Data::String("sensitivity".into())))
            .expect("patient-level rows");
        let p = &want["patient_level"];
        assert_eq!(f(&sens[2]), p["sensitivity_before"].as_f64().unwrap());
        assert_eq!(f(&sens[3]), p["sensitivity_after"].as_f64().unwrap());
        assert_eq!(f(&sens[6]), p["sensitivity_mcnemar_p"].as_f64().unwrap());
    }

    #[test]
    fn history_names_are_sortable_and_distinct() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let p = Path::new("/x/report.xlsx");
        assert_eq!(
            history_name(p, t, 0),
            Path::new("/x/report-20261118T110640Z.xlsx")
        );
        assert_eq!(
            history_name(p, t, 2),
            Path::new("/x/report-20261118T110640Z-2.xlsx")
        );
    }
}
