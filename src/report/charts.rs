//! The Charts sheet: native Excel charts (they stay live and zoomable in Excel, unlike a
//! picture) and, to their right, the numbers they draw:
//! - Dice distribution: a histogram from precomputed 0.05-wide bins, one series per class
//!   (Excel's own histogram type is a "chartex" part rust_xlsxwriter does not write);
//! - Dice against reference volume (ml): a scatter, one series per class, to see whether
//!   small structures fail;
//! - Dice per case, sorted: one column chart per class, worst cases at the right.
//!
//! Undefined Dice values are left out of every chart (they have no position on the axis);
//! the Summary counts them.

use crate::metrics::aggregate::Metric;
use rust_xlsxwriter::{
    Chart, ChartFormat, ChartLine, ChartMarker, ChartMarkerType, ChartSolidFill, ChartType, Color,
    Worksheet, XlsxError,
};

use super::sheets::CaseTable;
use super::style::{header, Styles};
use crate::evaluation::Evaluation;

/// First column of the chart data (charts sit in the columns before it).
pub(crate) const DATA_COL: u16 = 14;
/// Histogram bins over [0, 1].
pub(crate) const BINS: usize = 20;
const SHEET: &str = "Charts";
/// Chart size in pixels, and the rows one chart takes (default row height 20 px).
const CHART_W: u32 = 820;
const CHART_H: u32 = 320;
const CHART_ROWS: u32 = 17;

fn color(i: usize) -> Color {
    let c = crate::plot::class_color(i);
    Color::RGB((u32::from(c.0) << 16) | (u32::from(c.1) << 8) | u32::from(c.2))
}

fn fill(i: usize) -> ChartFormat {
    let mut f = ChartSolidFill::new();
    f.set_color(color(i));
    let mut fmt = ChartFormat::new();
    fmt.set_solid_fill(&f);
    fmt
}

/// Bin index of a Dice value in [0, 1] (1.0 goes into the last bin).
pub(crate) fn bin_of(d: f64) -> usize {
    ((d * BINS as f64).floor() as usize).min(BINS - 1)
}

/// (reference volume, Dice) of every case with a defined Dice, per class.
fn scatter_points(eval: &Evaluation, t: &CaseTable) -> Vec<Vec<(String, f64, f64)>> {
    let mut out = vec![Vec::new(); eval.spec.classes.len()];
    let (Some(di), Some(vi)) = (t.key_index(Metric::Dice), t.key_index(Metric::VolRefMl)) else {
        return out;
    };
    for (ci, ki, vals) in &t.rows {
        if let (Some(d), Some(v)) = (vals[di], vals[vi]) {
            if d.is_finite() && v.is_finite() {
                out[*ki].push((eval.cases[*ci].case.clone(), v, d));
            }
        }
    }
    out
}

/// Write the sheet.
pub(crate) fn charts(
    ws: &mut Worksheet,
    eval: &Evaluation,
    t: &CaseTable,
    st: &Styles,
) -> Result<(), XlsxError> {
    let classes = &eval.spec.classes;
    let nc = classes.len();
    ws.write_string_with_format(0, 0, "Charts", &st.title)?;
    ws.write_string_with_format(
        1,
        0,
        "Undefined Dice values (both masks empty) are not drawn. The numbers each chart draws are in the columns to the right.",
        &st.note,
    )?;
    let points = scatter_points(eval, t);

    // --- data ---
    // Sorted Dice per class: (case, Dice) column pairs.
    let mut sorted: Vec<Vec<(String, f64)>> = points
        .iter()
        .map(|p| p.iter().map(|(c, _, d)| (c.clone(), *d)).collect())
        .collect();
    for s in &mut sorted {
        s.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    }
    let mut col = DATA_COL;
    let mut sorted_cols = Vec::new();
    for (i, c) in classes.iter().enumerate() {
        header(
            ws,
            0,
            col,
            &[
                &format!("{} case", c.name),
                &format!("{} Dice (sorted)", c.name),
            ],
            st,
        )?;
        for (r, (case, d)) in sorted[i].iter().enumerate() {
            ws.write_string(1 + r as u32, col, case)?;
            ws.write_number_with_format(1 + r as u32, col + 1, *d, &st.frac)?;
        }
        ws.set_column_width(col, 16)?;
        sorted_cols.push(col);
        col += 2;
    }
    // Histogram: bin label, bin low, bin high, one count column per class.
    col += 1;
    let hist_col = col;
    let mut hist_head = vec!["Dice bin".to_string(), "from".into(), "to".into()];
    hist_head.extend(classes.iter().map(|c| format!("{} cases", c.name)));
    header(
        ws,
        0,
        hist_col,
        &hist_head.iter().map(String::as_str).collect::<Vec<_>>(),
        st,
    )?;
    let mut counts = vec![[0u32; BINS]; nc];
    for (i, p) in points.iter().enumerate() {
        for (_, _, d) in p {
            counts[i][bin_of(*d)] += 1;
        }
    }
    for b in 0..BINS {
        let (lo, hi) = (b as f64 / BINS as f64, (b + 1) as f64 / BINS as f64);
        let r = 1 + b as u32;
        // Bins are [lo, hi), the last one [0.95, 1.00] (see `bin_of`).
        ws.write_string(r, hist_col, format!("{lo:.2}\u{2013}{hi:.2}"))?;
        ws.write_number_with_format(r, hist_col + 1, lo, &st.frac)?;
        ws.write_number_with_format(r, hist_col + 2, hi, &st.frac)?;
        for (i, c) in counts.iter().enumerate() {
            ws.write_number(r, hist_col + 3 + i as u16, c[b])?;
        }
    }
    ws.set_column_width(hist_col, 13)?;
    col = hist_col + 3 + nc as u16 + 1;
    // Scatter: (VolRef_ml, Dice) pairs per class.
    let mut scatter_cols = Vec::new();
    for (i, c) in classes.iter().enumerate() {
        header(
            ws,
            0,
            col,
            &[
                &format!("{} case", c.name),
                &format!("{} VolRef_ml", c.name),
                &format!("{} Dice", c.name),
            ],
            st,
        )?;
        for (r, (case, v, d)) in points[i].iter().enumerate() {
            let r = 1 + r as u32;
            ws.write_string(r, col, case)?;
            ws.write_number_with_format(r, col + 1, *v, &st.ml)?;
            ws.write_number_with_format(r, col + 2, *d, &st.frac)?;
        }
        ws.set_column_width(col, 16)?;
        scatter_cols.push(col + 1);
        col += 4;
    }

    // --- charts ---
    let mut row = 3u32;
    let any = points.iter().any(|p| !p.is_empty());
    if !any {
        ws.write_string_with_format(
            row,
            0,
            "No case has a defined Dice: nothing to chart.",
            &st.note,
        )?;
        return Ok(());
    }
    let mut hist = Chart::new(ChartType::Column);
    hist.title()
        .set_name("Dice distribution (cases per 0.05 bin)");
    for (i, c) in classes.iter().enumerate() {
        hist.add_series()
            .set_name(c.name.as_str())
            .set_categories((SHEET, 1, hist_col, BINS as u32, hist_col))
            .set_values((
                SHEET,
                1,
                hist_col + 3 + i as u16,
                BINS as u32,
                hist_col + 3 + i as u16,
            ))
            .set_format(&mut fill(i))
            .set_gap(15);
    }
    hist.x_axis().set_name("Dice");
    hist.y_axis().set_name("cases");
    hist.set_width(CHART_W).set_height(CHART_H);
    ws.insert_chart(row, 0, &hist)?;
    row += CHART_ROWS;

    let mut sc = Chart::new(ChartType::Scatter);
    sc.title().set_name("Dice vs reference volume");
    for (i, c) in classes.iter().enumerate() {
        let n = points[i].len() as u32;
        if n == 0 {
            continue;
        }
        let x = scatter_cols[i];
        let mut marker = ChartMarker::new();
        let mut line = ChartLine::new();
        line.set_color(color(i));
        let mut mf = fill(i);
        mf.set_border(&line);
        marker
            .set_type(ChartMarkerType::Circle)
            .set_size(6)
            .set_format(&mut mf);
        sc.add_series()
            .set_name(c.name.as_str())
            .set_categories((SHEET, 1, x, n, x))
            .set_values((SHEET, 1, x + 1, n, x + 1))
            .set_marker(&marker);
    }
    sc.x_axis().set_name("reference volume (ml)");
    sc.y_axis().set_name("Dice").set_min(0.0).set_max(1.0);
    sc.set_width(CHART_W).set_height(CHART_H);
    ws.insert_chart(row, 0, &sc)?;
    row += CHART_ROWS;

    for (i, c) in classes.iter().enumerate() {
        let n = sorted[i].len() as u32;
        if n == 0 {
            continue;
        }
        let x = sorted_cols[i];
        let mut ch = Chart::new(ChartType::Column);
        ch.title()
            .set_name(&format!("Dice per case, sorted: {}", c.name));
        ch.add_series()
            .set_name(c.name.as_str())
            .set_categories((SHEET, 1, x, n, x))
            .set_values((SHEET, 1, x + 1, n, x + 1))
            .set_format(&mut fill(i))
            .set_gap(30);
        ch.legend().set_hidden();
        ch.x_axis().set_name("case (best to worst)");
        ch.y_axis().set_name("Dice").set_min(0.0).set_max(1.0);
        ch.set_width(CHART_W).set_height(CHART_H);
        ws.insert_chart(row, 0, &ch)?;
        row += CHART_ROWS;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_zero_to_one_inclusive() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.049_999), 0);
        assert_eq!(bin_of(0.05), 1);
        assert_eq!(bin_of(0.999), BINS - 1);
        assert_eq!(bin_of(1.0), BINS - 1);
    }
}
