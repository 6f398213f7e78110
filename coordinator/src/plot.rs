//! The loss and validation-accuracy chart `coordinator status --plot FILE` writes (SVG, drawn
//! with `plotters`): steps on the x axis, the training loss on the left axis, the validation
//! accuracy (0..1) on the right one, ticks, axis labels and a legend.

use plotters::prelude::*;

const LOSS: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const ACCURACY: RGBColor = RGBColor(0x2e, 0x86, 0xc1);

/// The chart of `points` as an SVG document.
pub fn plot_svg(points: &[proto::HistoryPoint]) -> anyhow::Result<String> {
    let mut svg = String::new();
    draw(points, &mut svg).map_err(|e| anyhow::anyhow!("cannot draw the chart: {e}"))?;
    Ok(svg)
}

fn draw(
    points: &[proto::HistoryPoint],
    svg: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    let max_step = points.iter().map(|p| p.step).max().unwrap_or(0).max(1);
    let max_loss = points
        .iter()
        .map(|p| p.loss)
        .filter(|l| l.is_finite())
        .fold(0.0f64, f64::max);
    let max_loss = if max_loss > 0.0 { max_loss * 1.05 } else { 1.0 };
    let root = SVGBackend::with_string(svg, (800, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training loss and validation accuracy", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(0u64..max_step, 0f64..max_loss)?
        .set_secondary_coord(0u64..max_step, 0f64..1f64);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("training loss")
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("validation accuracy")
        .draw()?;
    let loss = points
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| (p.step, p.loss));
    chart
        .draw_series(LineSeries::new(loss, LOSS.stroke_width(2)))?
        .label("training loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], LOSS.stroke_width(2)));
    let accuracy = points
        .iter()
        .filter_map(|p| Some((p.step, p.validation_accuracy?)));
    chart
        .draw_secondary_series(LineSeries::new(accuracy, ACCURACY.stroke_width(2)))?
        .label("validation accuracy")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], ACCURACY.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_axes_labels_a_legend_and_both_series() {
        let points: Vec<proto::HistoryPoint> = (0..=20)
            .map(|step| proto::HistoryPoint {
                step,
                loss: 2.3 / (1.0 + step as f64),
                validation_accuracy: (step % 10 == 0).then_some(0.1 + 0.04 * step as f64),
            })
            .collect();
        let svg = plot_svg(&points).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in ["step", "training loss", "validation accuracy"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        // One polyline per series (the legend's samples are paths too).
        assert!(svg.matches("<polyline").count() >= 2, "{svg}");
        // An empty history still gives a chart (with its axes), not an error.
        assert!(plot_svg(&[]).unwrap().contains("step"));
    }
}
