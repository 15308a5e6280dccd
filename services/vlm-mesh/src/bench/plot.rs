//! A small hand-written SVG line chart (no plotting dependency): axes, ticks, axis labels, a title
//! and a legend; enough for a benchmark figure that opens in any browser.

use std::fmt::Write;

/// One line of a chart: a label for the legend, a CSS colour and one y value per x.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub ys: &'a [f64],
}

/// A line chart of `series` over `xs`.
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// x values, increasing; each gets a tick labelled with its value.
    pub xs: &'a [f64],
    /// Place x on a log2 scale (for 1, 2, 4, 8, 16…); needs every x > 0.
    pub log2_x: bool,
    pub series: &'a [Series<'a>],
}

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 75.0;
const BOTTOM: f64 = 60.0;

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over [0, max].
fn tick_step(max: f64, target: f64) -> f64 {
    let raw = max / target;
    let mag = 10f64.powf(raw.log10().floor());
    // A little slack so that 5.000000001 (rounding) still counts as 5.
    let norm = raw / mag * (1.0 - 1e-9);
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick label: no trailing zeros, at most 2 decimals.
fn fmt_num(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl LineChart<'_> {
    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let xmap = |x: f64| if self.log2_x { x.log2() } else { x };
        let (x0, x1) = match (self.xs.first(), self.xs.last()) {
            (Some(&a), Some(&b)) if xmap(b) > xmap(a) => (xmap(a), xmap(b)),
            (Some(&a), _) => (xmap(a) - 1.0, xmap(a) + 1.0),
            _ => (0.0, 1.0),
        };
        // A margin on both sides, so the end points stand clear of the axis.
        let pad = (x1 - x0) * 0.05;
        let (x0, x1) = (x0 - pad, x1 + pad);
        let px = |x: f64| LEFT + (xmap(x) - x0) / (x1 - x0) * pw;
        let ymax_data = self
            .series
            .iter()
            .flat_map(|s| s.ys.iter().copied())
            .filter(|y| y.is_finite())
            .fold(0.0f64, f64::max);
        let ymax_data = if ymax_data > 0.0 { ymax_data } else { 1.0 };
        let step = tick_step(ymax_data * 1.05, 6.0);
        let ymax = (ymax_data * 1.05 / step).ceil() * step;
        let py = |y: f64| TOP + ph - y / ymax * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
            W / 2.0,
            escape(self.title)
        );
        // Horizontal grid lines and y ticks.
        let mut y = 0.0;
        while y <= ymax + step * 1e-9 {
            let yy = py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 8.0,
                yy + 4.0,
                fmt_num(y)
            );
            y += step;
        }
        // x ticks, one per x value.
        for &x in self.xs {
            let xx = px(x);
            let _ = writeln!(
                s,
                r#"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="black"/>"#,
                TOP + ph,
                TOP + ph + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph + 20.0,
                fmt_num(x)
            );
        }
        // Axes and their labels.
        let _ = writeln!(
            s,
            r#"<path d="M{LEFT} {TOP} V{:.1} H{:.1}" fill="none" stroke="black"/>"#,
            TOP + ph,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 15.0,
            escape(self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            escape(self.y_label)
        );
        // The series: a polyline and a marker per point.
        for series in self.series {
            let points: Vec<(f64, f64)> = self
                .xs
                .iter()
                .zip(series.ys)
                .filter(|(_, y)| y.is_finite())
                .map(|(&x, &y)| (px(x), py(y)))
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                series.color
            );
            for (x, y) in points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{}"/>"#,
                    series.color
                );
            }
        }
        // Legend: one row under the title, outside the plot area so it hides no data.
        let widths: Vec<f64> = self
            .series
            .iter()
            .map(|s| 34.0 + s.label.chars().count() as f64 * 7.0 + 16.0)
            .collect();
        let mut lx = (W - widths.iter().sum::<f64>()) / 2.0;
        let ly = 52.0;
        for (series, w) in self.series.iter().zip(&widths) {
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"/>"#,
                lx,
                ly - 4.0,
                lx + 20.0,
                ly - 4.0,
                series.color
            );
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"/>"#,
                lx + 10.0,
                ly - 4.0,
                series.color
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
                lx + 26.0,
                escape(series.label)
            );
            lx += w;
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(1000.0, 6.0), 200.0);
        assert_eq!(tick_step(0.3, 6.0), 0.05);
        assert_eq!(fmt_num(200.0), "200");
        assert_eq!(fmt_num(0.05), "0.05");
    }

    #[test]
    fn svg_has_axes_ticks_and_legend() {
        let svg = LineChart {
            title: "t <1>",
            x_label: "x",
            y_label: "y",
            xs: &[1.0, 2.0, 4.0],
            log2_x: true,
            series: &[
                Series {
                    label: "a",
                    color: "red",
                    ys: &[1.0, 2.0, 3.0],
                },
                Series {
                    label: "b",
                    color: "blue",
                    ys: &[1.0, f64::NAN, 1.5],
                },
            ],
        }
        .to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // 5 data points (the NaN one is skipped) and a marker per legend entry.
        assert_eq!(svg.matches("<circle").count(), 7);
        assert!(svg.contains(">4</text>"), "an x tick per value");
    }
}
