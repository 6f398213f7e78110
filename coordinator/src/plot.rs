//! The loss and validation-accuracy chart `coordinator status --plot FILE` writes.

/// An SVG chart of loss (left axis) and validation accuracy (right axis, 0..1) against steps.
pub fn plot_svg(points: &[proto::HistoryPoint]) -> String {
    let (w, h, m) = (800.0, 400.0, 50.0);
    let max_step = points.iter().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
    let max_loss = points
        .iter()
        .map(|p| p.loss)
        .filter(|l| l.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let x = |s: u64| m + (w - 2.0 * m) * s as f64 / max_step;
    let y = |v: f64, top: f64| h - m - (h - 2.0 * m) * (v / top).clamp(0.0, 1.0);
    let line = |pts: Vec<(f64, f64)>| {
        pts.iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let loss = line(
        points
            .iter()
            .filter(|p| p.loss.is_finite())
            .map(|p| (x(p.step), y(p.loss, max_loss)))
            .collect(),
    );
    let acc = line(
        points
            .iter()
            .filter(|p| p.validation_accuracy.is_finite())
            .map(|p| (x(p.step), y(p.validation_accuracy, 1.0)))
            .collect(),
    );
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">
<rect width="100%" height="100%" fill="white"/>
<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{m}" y1="{m}" x2="{m}" y2="{b}" stroke="black"/>
<line x1="{r}" y1="{m}" x2="{r}" y2="{b}" stroke="black"/>
<text x="{m}" y="30" font-family="sans-serif" font-size="14">Training loss (red, 0..{max_loss:.3}) and validation accuracy (blue, 0..1) by step (0..{max_step})</text>
<polyline fill="none" stroke="#c0392b" stroke-width="1.5" points="{loss}"/>
<polyline fill="none" stroke="#2e86c1" stroke-width="2" points="{acc}"/>
</svg>
"##,
        b = h - m,
        r = w - m,
    )
}
