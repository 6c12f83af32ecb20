//! SVG plots (plotters' SVG backend only: nothing to compile for fonts or bitmaps; the browser
//! renders the text).

use plotters::prelude::*;

use crate::train::TrainRun;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 320;

/// Training loss per step (blue) and evaluation loss (orange dots joined by a line), with the
/// learning rate on a secondary axis (grey).
pub fn loss_plot_svg(run: &TrainRun) -> String {
    let mut svg = String::new();
    // Drawing into a String only fails on impossible geometry; show the message instead.
    if let Err(e) = draw_loss(run, &mut svg) {
        return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"40\"><text x=\"8\" y=\"24\">plot failed: {}</text></svg>", crate::display::escape_html(&e.to_string()));
    }
    svg
}

fn draw_loss<'a>(
    run: &TrainRun,
    svg: &'a mut String,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let train: Vec<(f64, f64)> = run
        .history
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let eval: Vec<(f64, f64)> = run
        .eval_losses()
        .into_iter()
        .map(|(s, l)| (s as f64, l))
        .collect();
    let lr: Vec<(f64, f64)> = run.history.iter().map(|r| (r.step as f64, r.lr)).collect();
    let max_step = run.total_steps.max(1) as f64;
    let losses = train.iter().chain(&eval).map(|p| p.1);
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        let pad = ((hi - lo) * 0.05).max(1e-3);
        ((lo - pad).max(0.0), hi + pad)
    } else {
        (0.0, 1.0)
    };
    let max_lr = lr.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-12) * 1.05;

    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..max_step, lo..hi)?
        .set_secondary_coord(0f64..max_step, 0f64..max_lr);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    chart
        .draw_secondary_series(LineSeries::new(lr, RGBColor(170, 170, 170).stroke_width(1)))?
        .label("lr")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RGBColor(170, 170, 170)));
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
    if !eval.is_empty() {
        let orange = RGBColor(230, 120, 20);
        chart
            .draw_series(LineSeries::new(eval.clone(), orange.stroke_width(2)))?
            .label("eval loss")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], orange));
        chart.draw_series(eval.into_iter().map(|p| Circle::new(p, 3, orange.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
