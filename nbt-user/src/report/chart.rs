//! Charts as SVG text, drawn with plotters' SVG backend: lines over the run's time (measured
//! values solid, limits dashed red), the run's events as numbered vertical markers, and bars
//! for the learning updates. plotters escapes the text it writes into the SVG.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Pixels of one chart.
pub const WIDTH: u32 = 620;
pub const HEIGHT: u32 = 300;

/// The colours of measured lines, in turn.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];
const LIMIT: RGBColor = RGBColor(214, 39, 40);
const EVENT: RGBColor = RGBColor(120, 120, 120);
const ACCEPTED: RGBColor = RGBColor(44, 160, 44);
const REJECTED: RGBColor = RGBColor(170, 170, 170);

/// One line: runs of points (a gap where nothing was measured, or no limit was in force).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    pub segments: Vec<Vec<(f64, f64)>>,
    /// A limit: drawn dashed, in red.
    pub limit: bool,
}

impl Line {
    pub fn points(&self) -> impl Iterator<Item = &(f64, f64)> {
        self.segments.iter().flatten()
    }
}

/// A chart over the run's time.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeChart {
    pub title: String,
    /// What the y axis counts, with its unit.
    pub y_label: String,
    pub lines: Vec<Line>,
    /// The run's length, the x axis' end.
    pub seconds: f64,
    /// Events: their time and their number in the event table.
    pub events: Vec<(f64, usize)>,
}

fn bounds<'a>(values: impl Iterator<Item = &'a f64>) -> (f64, f64) {
    let (mut low, mut high) = (0.0f64, 0.0f64);
    for v in values.filter(|v| v.is_finite()) {
        low = low.min(*v);
        high = high.max(*v);
    }
    if high - low < 1e-12 {
        high = low + 1.0;
    }
    let pad = (high - low) * 0.08;
    (if low < 0.0 { low - pad } else { 0.0 }, high + pad)
}

fn draw_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

fn new_area(out: &mut String) -> DrawingArea<SVGBackend<'_>, Shift> {
    SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area()
}

/// The chart as one `<svg>` element.
pub fn time_chart(chart: &TimeChart) -> Result<String> {
    let mut out = String::new();
    {
        let root = new_area(&mut out);
        root.fill(&WHITE).map_err(draw_error)?;
        let (low, high) = bounds(chart.lines.iter().flat_map(|l| l.points().map(|(_, y)| y)));
        let seconds = chart.seconds.max(1e-3);
        let mut ctx = ChartBuilder::on(&root)
            .margin(10)
            .caption(&chart.title, ("sans-serif", 17))
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..seconds, low..high)
            .map_err(draw_error)?;
        ctx.configure_mesh()
            .x_desc("seconds since the workload started")
            .y_desc(&chart.y_label)
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_error)?;
        for &(t, n) in &chart.events {
            let style = EVENT.stroke_width(1);
            ctx.draw_series(DashedLineSeries::new([(t, low), (t, high)], 4, 4, style))
                .map_err(draw_error)?;
            ctx.draw_series(std::iter::once(Text::new(
                format!("{n}"),
                (t, high),
                ("sans-serif", 12).into_font().color(&EVENT),
            )))
            .map_err(draw_error)?;
        }
        let mut colours = PALETTE.iter().cycle();
        for line in &chart.lines {
            let colour = if line.limit {
                LIMIT
            } else {
                *colours.next().expect("a cycle")
            };
            let style = colour.stroke_width(2);
            // The legend's entry comes from a series of its own, so that a line with nothing
            // drawn (a limit off the chart) is named too.
            ctx.draw_series(std::iter::empty::<PathElement<(f64, f64)>>())
                .map_err(draw_error)?
                .label(&line.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            for segment in line.segments.iter().filter(|s| !s.is_empty()) {
                if line.limit {
                    ctx.draw_series(DashedLineSeries::new(segment.iter().copied(), 8, 5, style))
                } else if segment.len() == 1 {
                    // A lone point is a dot: a line needs two.
                    ctx.draw_series(std::iter::once(Circle::new(segment[0], 3, style.filled())))
                } else {
                    ctx.draw_series(LineSeries::new(segment.iter().copied(), style))
                }
                .map_err(draw_error)?;
            }
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

/// One bar per learning update, green when accepted, grey when not, numbered as the table.
pub fn update_bars(title: &str, y_label: &str, bars: &[(f64, bool)]) -> Result<String> {
    let mut out = String::new();
    {
        let root = new_area(&mut out);
        root.fill(&WHITE).map_err(draw_error)?;
        let (low, high) = bounds(bars.iter().map(|(v, _)| v));
        let n = bars.len().max(1) as f64;
        let mut ctx = ChartBuilder::on(&root)
            .margin(10)
            .caption(title, ("sans-serif", 17))
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(0.5f64..n + 0.5, low..high)
            .map_err(draw_error)?;
        ctx.configure_mesh()
            .x_desc("update (as numbered in the table)")
            .y_desc(y_label)
            .x_labels(bars.len().clamp(2, 20))
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 {
                    format!("{}", x.round() as i64)
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_error)?;
        for (i, &(value, accepted)) in bars.iter().enumerate() {
            let x = i as f64 + 1.0;
            let colour = if accepted { ACCEPTED } else { REJECTED };
            ctx.draw_series(std::iter::once(Rectangle::new(
                [(x - 0.35, 0.0), (x + 0.35, value)],
                colour.filled(),
            )))
            .map_err(draw_error)?;
        }
        for (name, colour) in [("accepted", ACCEPTED), ("rejected", REJECTED)] {
            ctx.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                .map_err(draw_error)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_one_svg_with_its_lines_markers_and_escaped_text() {
        let chart = TimeChart {
            title: "Memory <&>".into(),
            y_label: "MiB".into(),
            lines: vec![
                Line {
                    name: "used".into(),
                    segments: vec![(0..50).map(|i| (i as f64 * 0.1, i as f64)).collect()],
                    limit: false,
                },
                Line {
                    name: "limit".into(),
                    segments: vec![vec![(0.0, 64.0), (5.0, 64.0)]],
                    limit: true,
                },
                // A limit with nothing to draw.
                Line {
                    name: "swap limit".into(),
                    segments: vec![],
                    limit: true,
                },
            ],
            seconds: 5.0,
            events: vec![(2.5, 1)],
        };
        let svg = time_chart(&chart).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.contains("Memory &lt;&amp;&gt;"), "{svg}");
        assert!(!svg.contains("Memory <&>"));
        // The legend names every line once, the one with nothing drawn too.
        for name in ["used", "limit", "swap limit"] {
            assert_eq!(
                svg.matches(&format!(">\n{name}\n</text>")).count(),
                1,
                "{name}: {svg}"
            );
        }
        // The measured line is one polyline of all its points.
        let longest = svg
            .split("<polyline")
            .skip(1)
            .map(|p| {
                p.split("points=\"")
                    .nth(1)
                    .unwrap_or("")
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .split(' ')
                    .count()
            })
            .max()
            .unwrap();
        assert!(longest >= 50, "{longest}");
    }

    #[test]
    fn bars_draw_with_no_updates_and_with_negative_ones() {
        assert!(update_bars("Δ", "loss", &[]).unwrap().contains("<svg"));
        let svg = update_bars("Δ", "loss", &[(0.01, true), (-0.002, false)]).unwrap();
        assert!(svg.matches("<rect").count() >= 3, "{svg}");
    }
}
