//! The Dice plot as a PNG: one box plot per class with every case drawn on top as a point
//! (a box/strip plot), for the Summary sheet of the report and inline in the email.
//!
//! The box uses the same quartiles as the report's statistics (numpy's linear
//! interpolation, [`percentile_sorted`]); whiskers reach the furthest case within 1.5 IQR
//! (Tukey), the cross marks the mean. Undefined Dice values (both masks empty) are not
//! drawn; their count is printed under the class name. Text is drawn with the bundled DejaVu
//! Sans (no system fonts, works headless).

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::evaluation::Evaluation;
use crate::metrics::aggregate::{class_value, percentile_sorted, Metric};

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Pixel size of the PNG (drawn at twice the size it is shown at, so it stays sharp on
/// high-density screens).
pub const SIZE: (u32, u32) = (1200, 560);

/// Class colours (colour-blind safe: Okabe-Ito).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
];

/// Colour of the `i`-th class in every plot and chart of a report.
pub fn class_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Drawing the plot failed.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The bundled font could not be registered (a corrupt build).
    #[error("plot: the bundled font is unusable")]
    Font,
    /// plotters refused to draw.
    #[error("plot: drawing failed: {0}")]
    Draw(String),
    /// PNG encoding failed.
    #[error("plot: PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
}

fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// Dice values of one class over the scored cases (NaN = undefined, kept for counting).
fn dice_of(eval: &Evaluation, class_index: usize) -> Vec<f64> {
    eval.cases
        .iter()
        .filter_map(|c| c.classes.get(class_index))
        .filter_map(|m| class_value(m, Metric::Dice))
        .collect()
}

/// A deterministic jitter in [-1, 1] for the `i`-th point (same picture for the same data).
fn jitter(i: usize) -> f64 {
    let mut z = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 29;
    (z % 20_001) as f64 / 10_000.0 - 1.0
}

/// The box/strip plot of Dice per class, as PNG bytes ([`SIZE`] pixels).
///
/// # Errors
/// [`PlotError`] when drawing or encoding fails (not expected with the bundled font).
pub fn dice_png(eval: &Evaluation) -> Result<Vec<u8>, PlotError> {
    register_font()?;
    let (w, h) = SIZE;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    draw(eval, &mut rgb, (w, h)).map_err(|e| PlotError::Draw(e.to_string()))?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

/// The Dice axis, with a little room so points at 0 and 1 are not cut by the frame.
const Y_RANGE: std::ops::Range<f64> = -0.02..1.02;

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(eval: &Evaluation, rgb: &mut [u8], size: (u32, u32)) -> DrawResult {
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let classes = &eval.spec.classes;
    let n = classes.len().max(1);
    let caption = format!(
        "Dice per case, by class: {} ({} of {} cases scored)",
        eval.who(),
        eval.cases.len(),
        eval.total_cases()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FAMILY, 30).into_font())
        .margin(24)
        .margin_bottom(8)
        .x_label_area_size(100)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), Y_RANGE)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(11)
        .y_desc("Dice")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FAMILY, 22).into_font())
        .axis_desc_style((FAMILY, 24).into_font())
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    let name_style = TextStyle::from((FAMILY, 24).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let note_style = TextStyle::from((FAMILY, 19).into_font())
        .color(&RGBColor(90, 90, 90))
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (ci, class) in classes.iter().enumerate() {
        let x = ci as f64;
        let color = class_color(ci);
        let all = dice_of(eval, ci);
        let mut v: Vec<f64> = all.iter().copied().filter(|d| !d.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        let undefined = all.len() - v.len();
        let (px, py) = chart.backend_coord(&(x, Y_RANGE.start));
        root.draw(&Text::new(
            class.name.clone(),
            (px, py + 12),
            name_style.clone(),
        ))?;
        // Two short lines under the name, so eight or more classes still fit side by side.
        let (line1, line2) = if v.is_empty() {
            (
                "no defined Dice".to_string(),
                format!("{undefined} undefined"),
            )
        } else {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let mut n = format!("n={}", v.len());
            if undefined > 0 {
                n.push_str(&format!(", {undefined} undefined"));
            }
            (format!("mean {mean:.3}"), n)
        };
        root.draw(&Text::new(line1, (px, py + 42), note_style.clone()))?;
        root.draw(&Text::new(line2, (px, py + 66), note_style.clone()))?;
        if v.is_empty() {
            continue;
        }
        let (q1, med, q3) = (
            percentile_sorted(&v, 25.0),
            percentile_sorted(&v, 50.0),
            percentile_sorted(&v, 75.0),
        );
        let iqr = q3 - q1;
        let lo = v
            .iter()
            .copied()
            .find(|&d| d >= q1 - 1.5 * iqr)
            .unwrap_or(q1);
        let hi = v
            .iter()
            .rev()
            .copied()
            .find(|&d| d <= q3 + 1.5 * iqr)
            .unwrap_or(q3);
        let half = 0.28;
        let edge = ShapeStyle::from(&RGBColor(60, 60, 60)).stroke_width(2);
        chart.draw_series([Rectangle::new(
            [(x - half, q1), (x + half, q3)],
            color.mix(0.18).filled(),
        )])?;
        chart.draw_series([Rectangle::new([(x - half, q1), (x + half, q3)], edge)])?;
        for (a, b) in [(lo, q1), (q3, hi)] {
            chart.draw_series([PathElement::new(vec![(x, a), (x, b)], edge)])?;
        }
        for y in [lo, hi] {
            chart.draw_series([PathElement::new(
                vec![(x - half / 2.0, y), (x + half / 2.0, y)],
                edge,
            )])?;
        }
        chart.draw_series([PathElement::new(
            vec![(x - half, med), (x + half, med)],
            ShapeStyle::from(&BLACK).stroke_width(4),
        )])?;
        chart.draw_series(v.iter().enumerate().map(|(i, &d)| {
            Circle::new(
                (x + 0.22 * jitter(i + 7919 * ci), d),
                5,
                color.mix(0.75).filled(),
            )
        }))?;
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        chart.draw_series([Cross::new(
            (x, mean),
            9,
            ShapeStyle::from(&BLACK).stroke_width(3),
        )])?;
    }
    if classes.is_empty() || eval.cases.is_empty() {
        let (w, h) = root.dim_in_pixel();
        root.draw(&Text::new(
            "no scored case",
            (w as i32 / 2, h as i32 / 2),
            TextStyle::from((FAMILY, 32).into_font()).pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_bounded_and_deterministic() {
        for i in 0..10_000 {
            let j = jitter(i);
            assert!((-1.0..=1.0).contains(&j), "{j}");
            assert_eq!(j, jitter(i));
        }
    }
}
