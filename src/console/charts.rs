//! Chart geometry for server-drawn SVG: the numbers only. The templates draw the shapes and
//! escape every label, so no chart library and no script are needed to see a chart.

/// One point of a time series, where it lands in the drawing.
pub struct Point {
    pub x: f64,
    pub y: f64,
    /// The bucket's start (RFC 3339), as the API gave it.
    pub period: String,
    pub value: i64,
    /// How the value reads to a person.
    pub label: String,
}

/// A tick on an axis.
pub struct Tick {
    pub at: f64,
    pub label: String,
    /// `start`, `middle` or `end`: the ends of an axis keep their labels inside the drawing.
    pub anchor: &'static str,
}

fn tick(at: f64, label: String) -> Tick {
    Tick { at, label, anchor: "middle" }
}

/// A time series as a line over a baseline, with its points (for titles and tests).
pub struct Series {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub bottom: f64,
    pub points: Vec<Point>,
    /// The `points` attribute of the polyline.
    pub line: String,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub max: i64,
}

const W: f64 = 640.0;
const H: f64 = 200.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 24.0;

/// A "nice" ceiling for an axis: 1, 2 or 5 times a power of ten.
fn nice_ceiling(max: i64) -> i64 {
    if max <= 0 {
        return 1;
    }
    let mut step = 1i64;
    while step.saturating_mul(10) <= max {
        step = step.saturating_mul(10);
    }
    for m in [1, 2, 5, 10] {
        if step.saturating_mul(m) >= max {
            return step.saturating_mul(m);
        }
    }
    step.saturating_mul(10)
}

/// Lays out `(period, where in the range 0..=1, value)` oldest first; `fmt` writes a value for
/// people; `ticks` label the time axis at fixed places of the range. A bucket sits at its time,
/// so gaps in the data show as gaps in time.
pub fn series(data: &[(String, f64, i64)], fmt: impl Fn(i64) -> String, ticks: &[(f64, String)]) -> Series {
    series_up_to(data, fmt, ticks, data.iter().map(|(_, _, v)| *v).max().unwrap_or(0))
}

/// As [`series`], on an axis that reaches at least `top` (so several series share one scale).
fn series_up_to(data: &[(String, f64, i64)], fmt: impl Fn(i64) -> String, ticks: &[(f64, String)], top: i64) -> Series {
    let max = nice_ceiling(top);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x_at = |f: f64| LEFT + plot_w * f.clamp(0.0, 1.0);
    let y_of = |v: i64| TOP + plot_h - plot_h * (v as f64 / max as f64);
    let points: Vec<Point> = data
        .iter()
        .map(|(period, at, value)| Point {
            x: round(x_at(*at)),
            y: round(y_of(*value)),
            period: period.clone(),
            value: *value,
            label: fmt(*value),
        })
        .collect();
    let line = points.iter().map(|p| format!("{},{}", p.x, p.y)).collect::<Vec<_>>().join(" ");
    let y_ticks = (0..=4).map(|k| tick(round(y_of(max * k / 4)), fmt(max * k / 4))).collect();
    let last = ticks.len().saturating_sub(1);
    let x_ticks = ticks
        .iter()
        .enumerate()
        .map(|(i, (at, label))| Tick {
            at: round(x_at(*at)),
            label: label.clone(),
            anchor: if i == 0 {
                "start"
            } else if i == last {
                "end"
            } else {
                "middle"
            },
        })
        .collect();
    Series { width: W, height: H, left: LEFT, bottom: H - BOTTOM, points, line, y_ticks, x_ticks, max }
}

/// A named series of `(period, where in the range 0..=1, value)`.
pub type NamedSeries = (String, Vec<(String, f64, i64)>);

/// One named line of a chart with several.
pub struct Line {
    pub name: String,
    /// Which of the palette's colours (0 to 5, repeating).
    pub colour: usize,
    pub line: String,
    pub points: Vec<Point>,
}

/// Several time series on one scale (e.g. one per model), with a legend.
pub struct MultiSeries {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub bottom: f64,
    pub lines: Vec<Line>,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub max: i64,
}

/// Lays out `(name, points)` as [`series`] does each, all on the scale of the largest value.
pub fn multi(data: &[NamedSeries], fmt: impl Fn(i64) -> String, ticks: &[(f64, String)]) -> MultiSeries {
    let top = data.iter().flat_map(|(_, pts)| pts.iter().map(|(_, _, v)| *v)).max().unwrap_or(0);
    let axes = series_up_to(&[], &fmt, ticks, top);
    let lines = data
        .iter()
        .enumerate()
        .map(|(i, (name, pts))| {
            let s = series_up_to(pts, &fmt, ticks, top);
            Line { name: name.clone(), colour: i % 6, line: s.line, points: s.points }
        })
        .collect();
    MultiSeries {
        width: axes.width,
        height: axes.height,
        left: axes.left,
        bottom: axes.bottom,
        lines,
        y_ticks: axes.y_ticks,
        x_ticks: axes.x_ticks,
        max: axes.max,
    }
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// One horizontal bar.
pub struct Bar {
    pub label: String,
    pub value: i64,
    pub value_label: String,
    pub y: f64,
    pub width: f64,
    /// An optional second share of the bar (e.g. the failed part of tool calls), in units.
    pub part: f64,
}

pub struct Bars {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub bars: Vec<Bar>,
}

const BAR_H: f64 = 22.0;
const BAR_LEFT: f64 = 180.0;
const BAR_W: f64 = 360.0;

/// Bars for `(label, value, part, value_label)`, longest first as given.
pub fn bars(rows: Vec<(String, i64, i64, String)>) -> Bars {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let bars: Vec<Bar> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (label, value, part, value_label))| Bar {
            label,
            value,
            value_label,
            y: i as f64 * (BAR_H + 6.0),
            width: round(BAR_W * value as f64 / max as f64),
            part: round(BAR_W * part as f64 / max as f64),
        })
        .collect();
    let height = (bars.len() as f64 * (BAR_H + 6.0)).max(BAR_H);
    Bars { width: BAR_LEFT + BAR_W + 220.0, height, left: BAR_LEFT, bars }
}

/// One cell of the activity heatmap.
pub struct Cell {
    pub x: f64,
    pub y: f64,
    pub day: &'static str,
    pub hour: i64,
    pub requests: i64,
    /// 0 (none) to 5 (the busiest hour).
    pub level: i64,
}

pub struct Heatmap {
    pub cells: Vec<Cell>,
    pub days: Vec<Tick>,
    pub hours: Vec<Tick>,
    pub width: f64,
    pub height: f64,
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const CELL_W: f64 = 22.0;
const CELL_H: f64 = 18.0;
const HEAT_LEFT: f64 = 40.0;

/// A week of hours from `(ISO day 1-7, hour 0-23, requests)`, summed where repeated.
pub fn heatmap(data: &[(i64, i64, i64)]) -> Heatmap {
    let mut grid = [[0i64; 24]; 7];
    for (day, hour, n) in data {
        if (1..=7).contains(day) && (0..24).contains(hour) {
            grid[(*day - 1) as usize][*hour as usize] += *n;
        }
    }
    let max = grid.iter().flatten().copied().max().unwrap_or(0);
    let mut cells = Vec::with_capacity(7 * 24);
    for (d, row) in grid.iter().enumerate() {
        for (h, n) in row.iter().enumerate() {
            let level = if *n == 0 || max == 0 { 0 } else { 1 + (*n * 4 / max).min(4) };
            cells.push(Cell {
                x: HEAT_LEFT + h as f64 * CELL_W,
                y: 16.0 + d as f64 * CELL_H,
                day: DAYS[d],
                hour: h as i64,
                requests: *n,
                level,
            });
        }
    }
    let days = DAYS.iter().enumerate().map(|(d, l)| tick(16.0 + d as f64 * CELL_H + 13.0, (*l).into())).collect();
    let hours = (0..24).step_by(3).map(|h| tick(HEAT_LEFT + h as f64 * CELL_W + 2.0, format!("{h:02}"))).collect();
    Heatmap { cells, days, hours, width: HEAT_LEFT + 24.0 * CELL_W + 4.0, height: 16.0 + 7.0 * CELL_H + 4.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(130), 200);
        assert_eq!(nice_ceiling(5000), 5000);
        assert_eq!(nice_ceiling(5001), 10000);
    }

    #[test]
    fn the_biggest_value_reaches_highest_and_zero_sits_on_the_baseline() {
        let s = series(&[("a".into(), 0.0, 0), ("b".into(), 0.5, 50), ("c".into(), 1.0, 100)], |v| v.to_string(), &[]);
        assert_eq!(s.max, 100);
        assert_eq!(s.points[0].y, s.bottom);
        assert!(s.points[2].y < s.points[1].y && s.points[1].y < s.points[0].y);
        assert_eq!(s.points[2].y, TOP);
        assert!(s.points.windows(2).all(|w| w[0].x < w[1].x));
    }

    #[test]
    fn the_heatmap_sums_cells_and_grades_the_busiest_highest() {
        let h = heatmap(&[(1, 0, 2), (1, 0, 3), (7, 23, 10), (9, 99, 1000)]);
        assert_eq!(h.cells.len(), 7 * 24);
        let mon0 = &h.cells[0];
        assert_eq!((mon0.day, mon0.hour, mon0.requests), ("Mon", 0, 5));
        let sun23 = h.cells.last().unwrap();
        assert_eq!((sun23.requests, sun23.level), (10, 5));
        assert!(mon0.level > 0 && mon0.level < 5);
        assert!(h.cells.iter().filter(|c| c.requests == 0).all(|c| c.level == 0));
    }

    #[test]
    fn several_series_share_the_scale_of_the_largest() {
        let m = multi(
            &[
                ("a".into(), vec![("p".into(), 0.0, 50)]),
                ("b".into(), vec![("p".into(), 0.0, 100), ("q".into(), 1.0, 0)]),
            ],
            |v| v.to_string(),
            &[],
        );
        assert_eq!(m.max, 100);
        assert_eq!(m.lines.len(), 2);
        assert_eq!(m.lines[1].points[0].y, TOP);
        assert_eq!(m.lines[1].points[1].y, m.bottom);
        let half = m.bottom - (m.bottom - TOP) / 2.0;
        assert_eq!(m.lines[0].points[0].y, round(half));
        assert_eq!((m.lines[0].colour, m.lines[1].colour), (0, 1));
    }

    #[test]
    fn bars_scale_to_the_longest() {
        let b = bars(vec![("x".into(), 10, 0, "10".into()), ("y".into(), 5, 0, "5".into())]);
        assert_eq!(b.bars[0].width, BAR_W);
        assert_eq!(b.bars[1].width, BAR_W / 2.0);
    }
}
