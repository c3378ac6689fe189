//! The Slices sheet, written in constant-memory mode: rows go straight to a temporary file
//! in order (case, class, slice), so 300 cases x 300 slices x classes cost a few MB of disk
//! and almost no memory.
//!
//! A slice where neither the reference nor the prediction has the class is not listed: its
//! Dice is undefined and the row would say nothing (the Summary's slice tallies still count
//! it). The sheet stops at Excel's row limit with a note saying how much was left out.

use rust_xlsxwriter::{Worksheet, XlsxError};

use super::style::{color_scale, header, num, Styles};
use crate::evaluation::Evaluation;

/// Excel's last row index.
const MAX_ROW: u32 = 1_048_575;

/// Write the sheet (the worksheet must be a constant-memory one).
pub(crate) fn slices(ws: &mut Worksheet, eval: &Evaluation, st: &Styles) -> Result<(), XlsxError> {
    let cols = [
        "case", "class", "label", "slice", "TP", "FP", "FN", "Dice", "IoU",
    ];
    ws.set_column_width(0, 18)?;
    ws.set_column_width(1, 12)?;
    for c in 2..cols.len() as u16 {
        ws.set_column_width(c, 10)?;
    }
    header(ws, 0, 0, &cols, st)?;
    let mut r = 0u32;
    let mut left_out = 0u64;
    if !eval.spec.per_slice {
        ws.write_string_with_format(1, 0, "Per-slice metrics were off for this run.", &st.note)?;
        return Ok(());
    }
    for case in &eval.cases {
        for (ci, per_slice) in case.slices.iter().enumerate() {
            let Some(class) = eval.spec.classes.get(ci) else {
                continue;
            };
            for (z, s) in per_slice.iter().enumerate() {
                if s.tp + s.fp + s.fn_ == 0 {
                    continue;
                }
                if r + 1 >= MAX_ROW {
                    left_out += 1;
                    continue;
                }
                r += 1;
                ws.write_string(r, 0, &case.case)?;
                ws.write_string(r, 1, &class.name)?;
                ws.write_number(r, 2, class.label)?;
                ws.write_number(r, 3, z as f64)?;
                ws.write_number_with_format(r, 4, s.tp, &st.int)?;
                ws.write_number_with_format(r, 5, s.fp, &st.int)?;
                ws.write_number_with_format(r, 6, s.fn_, &st.int)?;
                num(ws, r, 7, Some(s.dice()), &st.frac)?;
                num(ws, r, 8, Some(s.iou()), &st.frac)?;
            }
        }
    }
    let last = r;
    if left_out > 0 {
        r += 1;
        ws.write_string_with_format(
            r,
            0,
            format!("{left_out} more slices left out: Excel's row limit. summary.json and the Summary sheet's tallies count all."),
            &st.note,
        )?;
    } else if r == 0 {
        ws.write_string_with_format(
            1,
            0,
            "No slice has the class in the reference or the prediction.",
            &st.note,
        )?;
    }
    ws.set_freeze_panes(1, 0)?;
    if last > 0 {
        ws.autofilter(0, 0, last, cols.len() as u16 - 1)?;
        color_scale(ws, 1, last, 7)?;
        color_scale(ws, 1, last, 8)?;
    }
    Ok(())
}
