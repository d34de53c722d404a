//! What `nbt top` draws: the table of runs, or one run's charts and events; the status bar; the
//! keys or the prompt.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Row, Table};
use ratatui::Frame;

use super::{App, Rates};
use crate::enforce::ledger::format_amount;
use crate::enforce::shaper::Direction;
use crate::run::sampling::measured_rate;
use crate::state::live::{LiveEvent, LiveRun};
use crate::telemetry::series::Series;
use crate::units::{format_rate, format_size};

const KEYS: &str = "q quit  ↑↓ select  Enter charts  Esc back  r egress rate  i ingress rate  \
                    s set  b top up  f fault";

pub(super) fn draw(frame: &mut Frame, app: &mut App) {
    let [main, status, keys] = Layout::vertical([
        Constraint::Min(0),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    match app.detail.is_some() {
        true => detail(frame, main, app),
        false => list(frame, main, app),
    }
    let style = match app.status.error {
        true => Style::default().fg(Color::Red),
        false => Style::default().fg(Color::Green),
    };
    frame.render_widget(
        Paragraph::new(app.status.text.as_str()).style(style),
        status,
    );
    let line = match &app.prompt {
        Some(prompt) => format!(
            "{} for {}: {}_",
            prompt.ask.label(),
            prompt.run,
            prompt.text
        ),
        None => KEYS.to_string(),
    };
    let style = Style::default().add_modifier(Modifier::REVERSED);
    frame.render_widget(Paragraph::new(line).style(style), keys);
}

/// A row per run.
fn list(frame: &mut Frame, area: Rect, app: &mut App) {
    let header = Row::new([
        "RUN", "COMMAND", "AGE", "MEMORY", "CPU", "EGRESS", "INGRESS", "BALANCE", "ENERGY",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = app
        .runs
        .iter()
        .map(|run| row(run, app.rates.get(&run.run).copied().unwrap_or_default()))
        .collect();
    let title = format!(" nbt top: {} run(s) ", app.runs.len());
    let table = Table::new(
        rows,
        [
            Constraint::Length(20),
            Constraint::Fill(1),
            Constraint::Length(7),
            Constraint::Length(21),
            Constraint::Length(11),
            Constraint::Length(19),
            Constraint::Length(19),
            Constraint::Length(10),
            Constraint::Length(16),
        ],
    )
    .header(header)
    .block(Block::bordered().title(title))
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(table, area, &mut app.table);
    if app.runs.is_empty() {
        let inner = Rect {
            y: area.y + 2,
            height: 1,
            x: area.x + 2,
            width: area.width.saturating_sub(4),
        };
        frame.render_widget(Paragraph::new("no live runs"), inner);
    }
}

/// A run's row: what it holds and uses now, against its limits.
fn row(run: &LiveRun, rates: Rates) -> Row<'static> {
    let get = |column: &str| run.latest.as_ref().and_then(|l| l.get(column).copied());
    let memory = match (get("memory_bytes"), get("memory_limit_bytes")) {
        (Some(used), Some(cap)) => format!("{} / {}", size(used), size(cap)),
        (Some(used), None) => size(used),
        _ => "-".into(),
    };
    let cpu = match (rates.cpu_cores, get("cpu_limit_cores")) {
        (Some(used), Some(cap)) => format!("{used:.2} / {cap:.2}"),
        (Some(used), None) => format!("{used:.2}"),
        (None, _) => "-".into(),
    };
    let net = |rate: Option<f64>, limit: Option<u64>| match (rate, limit) {
        (Some(rate), Some(limit)) => format!("{} / {}", measured_rate(rate), format_rate(limit)),
        (Some(rate), None) => measured_rate(rate),
        (None, Some(limit)) => format!("- / {}", format_rate(limit)),
        (None, None) => "-".into(),
    };
    let energy = match (get("joules"), rates.watts) {
        (Some(joules), Some(watts)) => format!("{joules:.1} J {watts:.1} W"),
        (Some(joules), None) => format!("{joules:.1} J"),
        _ => "-".into(),
    };
    let command = format!(
        "{}{}{}",
        if run.orphan { "ORPHAN " } else { "" },
        run.name
            .as_ref()
            .map(|n| format!("[{n}] "))
            .unwrap_or_default(),
        run.command.join(" ")
    );
    Row::new([
        run.run.clone(),
        command,
        age(run.seconds),
        memory,
        cpu,
        net(rates.egress_bits, run.net_limits.egress.rate_bits_per_sec),
        net(rates.ingress_bits, run.net_limits.ingress.rate_bits_per_sec),
        run.balance_micro
            .map(format_amount)
            .unwrap_or_else(|| "-".into()),
        energy,
    ])
}

fn size(bytes: f64) -> String {
    format_size(bytes.max(0.0) as u64)
}

/// `45s`, `12m05s`, `3h02m`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// One run: its limits, its charts, its events.
fn detail(frame: &mut Frame, area: Rect, app: &App) {
    let [head, grid] = Layout::vertical([Constraint::Length(4), Constraint::Min(0)]).areas(area);
    if let Some(run) = app.current() {
        let balance = run
            .balance_micro
            .map(|b| format!("   balance {}", format_amount(b)))
            .unwrap_or_default();
        let lines = vec![
            Line::from(format!(
                "{}   age {}   nbt pid {}{}",
                run.command.join(" "),
                age(run.seconds),
                run.nbt_pid,
                if run.orphan { "   ORPHAN" } else { "" }
            )),
            Line::from(format!(
                "egress {}   ingress {}{balance}",
                run.net_limits.egress.describe(Direction::Egress),
                run.net_limits.ingress.describe(Direction::Ingress),
            )),
        ];
        let sampled = app
            .live
            .as_ref()
            .and_then(|l| {
                l.series
                    .as_ref()?
                    .column("t_seconds")?
                    .into_iter()
                    .flatten()
                    .last()
            })
            .map(|t| format!(" (last sample at {t:.0}s) "))
            .unwrap_or_default();
        let label = run
            .name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let title = Line::from(format!(" {}{label} ", run.run));
        let block = Block::bordered()
            .title(title)
            .title(Line::from(sampled).right_aligned());
        frame.render_widget(Paragraph::new(lines).block(block), head);
    }
    let rows = Layout::vertical([Constraint::Ratio(1, 4); 4]).split(grid);
    let cells: Vec<Rect> = rows
        .iter()
        .flat_map(|row| {
            Layout::horizontal([Constraint::Ratio(1, 2); 2])
                .split(*row)
                .to_vec()
        })
        .collect();
    let empty = Series::new("", 1.0);
    let series = app
        .live
        .as_ref()
        .and_then(|l| l.series.as_ref())
        .unwrap_or(&empty);
    for (plot, cell) in plots(series).iter().zip(&cells) {
        chart(frame, *cell, plot);
    }
    let events = app.live.as_ref().map_or(&[][..], |l| &l.events[..]);
    events_panel(frame, cells[7], events);
}

/// One line of a chart: its name, its (t, value) points, its colour.
type PlotLine = (&'static str, Vec<(f64, f64)>, Color);

/// One chart: its lines over the run's time, and how a value reads.
struct Plot {
    title: String,
    lines: Vec<PlotLine>,
    format: fn(f64) -> String,
}

/// The charts of a run, from its live series.
fn plots(series: &Series) -> Vec<Plot> {
    let column = |name: &str| series.column(name).unwrap_or_default();
    let t = column("t_seconds");
    let gauge = |name: &str| points(&t, &column(name));
    let per_second = |name: &str, scale: f64| per_second(&t, &column(name), scale);
    let rate = |v: f64| measured_rate(v);
    let bytes = |v: f64| size(v);
    let cores = |v: f64| format!("{v:.2}");
    let money = |v: f64| format!("{v:.2}");
    let percent = |v: f64| format!("{:.0}%", v * 100.0);
    let watts = |v: f64| format!("{v:.1} W");
    let net = |direction: &str| Plot {
        title: format!("{direction} rate vs limit"),
        lines: vec![
            (
                "rate",
                per_second(&format!("{direction}_passed_bytes"), 8.0),
                Color::Cyan,
            ),
            (
                "limit",
                gauge(&format!("{direction}_rate_limit_bits_per_second")),
                Color::Red,
            ),
        ],
        format: rate,
    };
    vec![
        net("egress"),
        net("ingress"),
        Plot {
            title: "memory vs cap".into(),
            lines: vec![
                ("memory", gauge("memory_bytes"), Color::Cyan),
                ("cap", gauge("memory_limit_bytes"), Color::Red),
            ],
            format: bytes,
        },
        Plot {
            title: "CPU cores".into(),
            lines: vec![
                ("used", per_second("cpu_seconds", 1.0), Color::Cyan),
                ("limit", gauge("cpu_limit_cores"), Color::Red),
            ],
            format: cores,
        },
        Plot {
            title: "balance".into(),
            lines: vec![("balance", gauge("balance"), Color::Yellow)],
            format: money,
        },
        Plot {
            title: "pressure (PSI stall, some)".into(),
            lines: vec![
                ("cpu", per_second("psi_cpu_some_seconds", 1.0), Color::Cyan),
                (
                    "memory",
                    per_second("psi_memory_some_seconds", 1.0),
                    Color::Magenta,
                ),
                ("io", per_second("psi_io_some_seconds", 1.0), Color::Yellow),
            ],
            format: percent,
        },
        Plot {
            title: "power (d joules / dt)".into(),
            lines: vec![("power", per_second("joules", 1.0), Color::Green)],
            format: watts,
        },
    ]
}

/// (t, value) where both were measured.
fn points(t: &[Option<f64>], values: &[Option<f64>]) -> Vec<(f64, f64)> {
    t.iter()
        .zip(values)
        .filter_map(|(t, v)| Some(((*t)?, (*v)?)))
        .collect()
}

/// A counter's change per second between neighbouring samples, times `scale`, at the later one.
fn per_second(t: &[Option<f64>], values: &[Option<f64>], scale: f64) -> Vec<(f64, f64)> {
    points(t, values)
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            (
                w[1].0,
                (w[1].1 - w[0].1).max(0.0) * scale / (w[1].0 - w[0].0),
            )
        })
        .collect()
}

fn chart(frame: &mut Frame, area: Rect, plot: &Plot) {
    let all = || plot.lines.iter().flat_map(|(_, points, _)| points.iter());
    let latest: Vec<String> = plot
        .lines
        .iter()
        .filter_map(|(name, points, _)| {
            let (_, v) = points.last()?;
            Some(format!("{name} {}", (plot.format)(*v)))
        })
        .collect();
    let title = match latest.is_empty() {
        true => format!(" {}: not measured ", plot.title),
        false => format!(" {}: {} ", plot.title, latest.join(", ")),
    };
    let block = Block::bordered().title(title);
    if all().next().is_none() {
        frame.render_widget(block, area);
        return;
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (0.0f64, 0.0f64);
    for (x, y) in all() {
        (x0, x1) = (x0.min(*x), x1.max(*x));
        (y0, y1) = (y0.min(*y), y1.max(*y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let datasets = plot
        .lines
        .iter()
        .map(|(name, points, color)| {
            Dataset::default()
                .name(*name)
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::default().fg(*color))
                .data(points)
        })
        .collect();
    let chart = Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .bounds([x0, x1])
                .labels([format!("{x0:.0}s"), format!("{x1:.0}s")]),
        )
        .y_axis(
            Axis::default()
                .bounds([y0, y1])
                .labels([(plot.format)(y0), (plot.format)(y1)]),
        )
        // The title names each line with its colour's value: a legend would hide the top.
        .legend_position(None);
    frame.render_widget(chart, area);
}

/// The run's events so far, the latest at the bottom.
fn events_panel(frame: &mut Frame, area: Rect, events: &[LiveEvent]) {
    let room = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = events[events.len().saturating_sub(room)..]
        .iter()
        .map(|e| {
            let text = format!("{:>7.1}s  {}: {}", e.t, e.source, e.what);
            match &e.error {
                Some(err) => Line::styled(
                    format!("{text} FAILED: {err}"),
                    Style::default().fg(Color::Red),
                ),
                None => Line::from(text),
            }
        })
        .collect();
    let title = format!(" events ({}) ", events.len());
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_become_rates_between_samples() {
        let t = [Some(1.0), Some(2.0), None, Some(4.0)];
        let bytes = [Some(0.0), Some(1000.0), Some(5.0), Some(2000.0)];
        assert_eq!(
            per_second(&t, &bytes, 8.0),
            vec![(2.0, 8000.0), (4.0, 4000.0)]
        );
        assert_eq!(age(59.9), "59s");
        assert_eq!(age(125.0), "2m05s");
        assert_eq!(age(3.0 * 3600.0 + 120.0), "3h02m");
    }
}
