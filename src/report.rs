//! The Excel report (placeholder: one Summary sheet; the full workbook is issue 4's).

use std::path::Path;

use rust_xlsxwriter::Workbook;

use crate::evaluation::Evaluation;

/// Writing the report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// rust_xlsxwriter refused something.
    #[error("{path}: {source}")]
    Xlsx {
        /// The report file.
        path: std::path::PathBuf,
        /// The writer's error.
        #[source]
        source: rust_xlsxwriter::XlsxError,
    },
}

/// Write the workbook to `path`.
///
/// # Errors
/// [`ReportError`] naming the file.
pub fn write(eval: &Evaluation, path: &Path) -> Result<(), ReportError> {
    let err = |source| ReportError::Xlsx {
        path: path.to_path_buf(),
        source,
    };
    let mut wb = Workbook::new();
    let ws = wb.add_worksheet().set_name("Summary").map_err(err)?;
    ws.write(0, 0, "class").map_err(err)?;
    ws.write(0, 1, "mean Dice").map_err(err)?;
    for (i, c) in eval.spec.classes.iter().enumerate() {
        let mean = eval
            .summary
            .per_class
            .get(&c.label)
            .and_then(|m| m.get("Dice"))
            .map_or(f64::NAN, |s| s.mean);
        ws.write(i as u32 + 1, 0, &c.name).map_err(err)?;
        ws.write(i as u32 + 1, 1, mean).map_err(err)?;
    }
    wb.save(path).map_err(err)
}
