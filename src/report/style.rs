//! Cell formats and the few writing helpers every sheet shares. The one rule they enforce:
//! an undefined number (NaN, or a metric that was not computed) is an empty cell, never a
//! 0, never Excel's "NAN" text, so averages and filters in Excel stay right.

use crate::metrics::aggregate::Metric;
use rust_xlsxwriter::{
    Color, ConditionalFormat3ColorScale, Format, FormatAlign, FormatBorder, Worksheet, XlsxError,
};

/// Formats used across the workbook.
pub(crate) struct Styles {
    pub title: Format,
    pub subtitle: Format,
    pub header: Format,
    pub key: Format,
    pub wrap: Format,
    pub note: Format,
    /// Dice, IoU, NSD and other fractions: 4 decimals.
    pub frac: Format,
    /// Distances in mm.
    pub mm: Format,
    /// Volumes in ml.
    pub ml: Format,
    /// Counts.
    pub int: Format,
    /// Rates shown as percentages.
    pub pct: Format,
    /// Signed relative differences.
    pub signed_pct: Format,
    /// Seconds.
    pub secs: Format,
}

impl Styles {
    pub fn new() -> Self {
        let header_bg = Color::RGB(0xDD_E6_F0);
        Styles {
            title: Format::new().set_bold().set_font_size(16),
            subtitle: Format::new().set_bold().set_font_size(12),
            header: Format::new()
                .set_bold()
                .set_background_color(header_bg)
                .set_border_bottom(FormatBorder::Thin)
                .set_text_wrap()
                .set_align(FormatAlign::Top),
            key: Format::new().set_bold(),
            wrap: Format::new().set_text_wrap().set_align(FormatAlign::Top),
            note: Format::new()
                .set_italic()
                .set_font_color(Color::RGB(0x55_55_55)),
            frac: Format::new().set_num_format("0.0000"),
            mm: Format::new().set_num_format("0.00"),
            ml: Format::new().set_num_format("0.000"),
            int: Format::new().set_num_format("#,##0"),
            pct: Format::new().set_num_format("0.0%"),
            signed_pct: Format::new().set_num_format("+0.0%;-0.0%;0.0%"),
            secs: Format::new().set_num_format("0.00"),
        }
    }

    /// The number format of a per-class metric.
    pub fn for_key(&self, key: Metric) -> &Format {
        use Metric::*;
        match key {
            TP | FP | FN | TN | NPred | NRef | LesionTP | LesionFP | LesionFN => &self.int,
            VolRefMl | VolPredMl => &self.ml,
            RelVolDiff => &self.signed_pct,
            k if k.is_distance() => &self.mm,
            _ => &self.frac,
        }
    }
}

/// Write a number, or nothing when it is undefined (NaN, infinite or absent).
pub(crate) fn num(
    ws: &mut Worksheet,
    row: u32,
    col: u16,
    v: Option<f64>,
    fmt: &Format,
) -> Result<(), XlsxError> {
    match v {
        Some(x) if x.is_finite() => {
            ws.write_number_with_format(row, col, x, fmt)?;
        }
        _ => {}
    }
    Ok(())
}

/// A header row from `col` on.
pub(crate) fn header(
    ws: &mut Worksheet,
    row: u32,
    col: u16,
    names: &[&str],
    st: &Styles,
) -> Result<(), XlsxError> {
    for (i, n) in names.iter().enumerate() {
        ws.write_string_with_format(row, col + i as u16, *n, &st.header)?;
    }
    Ok(())
}

/// `key: value` rows (bold key) from `row` on; returns the next free row.
pub(crate) fn key_values(
    ws: &mut Worksheet,
    row: u32,
    rows: &[(&str, String)],
    st: &Styles,
) -> Result<u32, XlsxError> {
    for (i, (k, v)) in rows.iter().enumerate() {
        let r = row + i as u32;
        ws.write_string_with_format(r, 0, *k, &st.key)?;
        ws.write_string(r, 1, v)?;
    }
    Ok(row + rows.len() as u32)
}

/// A red (low) - yellow - green (high) scale over a column range, Excel's default stops
/// (lowest, 50th percentile, highest): a case that is bad relative to the others stands out.
pub(crate) fn color_scale(
    ws: &mut Worksheet,
    first_row: u32,
    last_row: u32,
    col: u16,
) -> Result<(), XlsxError> {
    if last_row >= first_row {
        let cf = ConditionalFormat3ColorScale::new()
            .set_minimum_color(Color::RGB(0xF8_69_6B))
            .set_midpoint_color(Color::RGB(0xFF_EB_84))
            .set_maximum_color(Color::RGB(0x63_BE_7B));
        ws.add_conditional_format(first_row, col, last_row, col, &cf)?;
    }
    Ok(())
}

/// Is this metric a score where higher is better in [0, 1] (gets a colour scale)?
pub(crate) fn is_scored_fraction(key: Metric) -> bool {
    key.is_score()
}
