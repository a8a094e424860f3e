//! `report.html`: one self-contained page (inline CSS and SVG, no script, nothing fetched) with
//! per-layer line plots of the norm ratios, cosines and conflict rates, a heatmap of the
//! pairwise cosines, and tables. Every plotted point and table cell carries its figure in
//! `data-scope`, `data-name`, `data-metric`, `data-subject` and `data-value` (the number as
//! `report.json` has it, empty when undefined), so a test can check the page against the JSON.

use std::fmt::Write;

use super::{Entry, Report};

const PALETTE: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];
const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;\
font-size:12px;text-align:right}th{background:#f4f4f4;white-space:nowrap}td.l{text-align:left}\
svg{display:block;margin:1em 0}.legend{font-size:12px}";

/// HTML text with `&`, `<`, `>` and quotes escaped.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A figure as `data-value` holds it: the shortest text that reads back as the same f64.
fn val(x: f64) -> String {
    if x.is_finite() {
        x.to_string()
    } else {
        String::new()
    }
}

/// A figure as shown: 4 significant decimals, `–` when undefined.
fn show(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "–".into()
    }
}

fn data(scope: &str, name: &str, metric: &str, subject: &str, x: f64) -> String {
    format!(
        "data-scope=\"{scope}\" data-name=\"{}\" data-metric=\"{metric}\" data-subject=\"{}\" data-value=\"{}\"",
        esc(name),
        esc(subject),
        val(x)
    )
}

/// The last component of a model path (its label on the page).
fn short(m: &str) -> &str {
    m.trim_end_matches('/').rsplit('/').next().unwrap_or(m)
}

/// One series of a line plot: its label, the figure's subject, and a value per layer.
struct Series {
    label: String,
    subject: String,
    values: Vec<f64>,
}

/// A per-layer line plot of `metric` (one line per series).
fn line_plot(title: &str, metric: &str, layers: &[&Entry], series: &[Series]) -> String {
    let (w, h, l, r, t, b) = (640.0, 260.0, 60.0, 150.0, 30.0, 40.0);
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|x| x.is_finite())
        .collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let n = layers.len().max(2) - 1;
    let x = |i: usize| l + (w - l - r) * i as f64 / n as f64;
    let y = |v: f64| t + (h - t - b) * (hi - v) / (hi - lo);
    let mut s = format!(
        "<svg class=\"plot\" data-metric=\"{metric}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">\
<text x=\"{l}\" y=\"18\" font-size=\"14\">{}</text>\
<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"#888\"/>",
        esc(title),
        h - b,
        w - r,
        h - b,
        h - b
    );
    for (v, at) in [(hi, t), (lo, h - b)] {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            l - 4.0,
            at + 3.0,
            show(v)
        );
    }
    for (i, e) in layers.iter().enumerate() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            x(i),
            h - b + 14.0,
            e.layer.unwrap_or(0)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">layer</text>",
        (l + w - r) / 2.0,
        h - 6.0
    );
    for (k, se) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let pts: Vec<String> = se
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| format!("{:.2},{:.2}", x(i), y(v)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        for (i, &v) in se.values.iter().enumerate() {
            if v.is_finite() {
                let _ = write!(s, "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"2.5\" fill=\"{c}\" {}><title>{}: {}</title></circle>", x(i), y(v), data("layer", &layers[i].name, metric, &se.subject, v), esc(&se.label), show(v));
            }
        }
        let ly = t + 14.0 * k as f64;
        let _ = write!(s, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"3\" fill=\"{c}\"/><text class=\"legend\" x=\"{}\" y=\"{}\">{}</text>", w - r + 8.0, ly, w - r + 22.0, ly + 4.0, esc(&se.label));
    }
    s + "</svg>\n"
}

/// The heatmap of pairwise cosines of the whole model (1 on the diagonal).
fn heatmap(r: &Report) -> String {
    let m = r.models.len();
    let (cell, l, t) = (56.0, 110.0, 40.0);
    let size = l + cell * m as f64 + 10.0;
    let mut s = format!(
        "<svg class=\"heatmap\" data-metric=\"cosine\" width=\"{size}\" height=\"{}\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"4\" y=\"18\" font-size=\"14\">cosine of task vectors, whole model</text>",
        t + cell * m as f64 + 10.0
    );
    let pairs = r.pairs();
    for i in 0..m {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            l - 4.0,
            t + cell * (i as f64 + 0.5) + 4.0,
            esc(short(&r.models[i]))
        );
        for j in 0..m {
            let (x, y) = (l + cell * j as f64, t + cell * i as f64);
            let v = if i == j {
                None
            } else {
                let (a, b) = (i.min(j), i.max(j));
                pairs
                    .iter()
                    .position(|&p| p == (a, b))
                    .map(|k| (k, r.total.figures.cosines[k]))
            };
            let (fill, attrs, text) = match v {
                None => ("#eee".to_string(), String::new(), String::new()),
                Some((k, c)) => {
                    let (a, b) = pairs[k];
                    let subject = format!("{}|{}", r.models[a], r.models[b]);
                    (
                        colour(c),
                        data("total", &r.total.name, "cosine", &subject, c),
                        show(c),
                    )
                }
            };
            let _ = write!(s, "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"{fill}\" stroke=\"#fff\" {attrs}/><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{text}</text>", x + cell / 2.0, y + cell / 2.0 + 3.0);
        }
    }
    s + "</svg>\n"
}

/// Blue (-1) through white (0) to red (1).
fn colour(c: f64) -> String {
    if !c.is_finite() {
        return "#ccc".into();
    }
    let c = c.clamp(-1.0, 1.0);
    let fade = |x: f64| (255.0 * (1.0 - x.abs())).round() as u8;
    if c >= 0.0 {
        format!("rgb(255,{},{})", fade(c), fade(c))
    } else {
        format!("rgb({},{},255)", fade(c), fade(c))
    }
}

/// A table of entries: elements, norms and ratios, cosines, sign agreement, conflict rates.
fn table(r: &Report, scope: &str, entries: &[Entry]) -> String {
    let pairs = r.pairs();
    let pair_name = |&(i, j): &(usize, usize)| format!("{}|{}", r.models[i], r.models[j]);
    let mut s = String::from("<table><tr><th>name</th><th>elements</th>");
    for m in &r.models {
        let _ = write!(s, "<th>‖δ {0}‖</th><th>‖δ {0}‖/‖base‖</th>", esc(short(m)));
    }
    for &(i, j) in &pairs {
        let _ = write!(
            s,
            "<th>cos {0}·{1}</th><th>same sign {0}·{1}</th>",
            esc(short(&r.models[i])),
            esc(short(&r.models[j]))
        );
    }
    for d in &r.densities {
        let _ = write!(s, "<th>conflicts @{d}</th>");
    }
    for p in &r.distance_points {
        let _ = write!(
            s,
            "<th>‖{0} − base‖</th><th>‖{0} − base‖/‖base‖</th>",
            esc(p)
        );
    }
    s += "</tr>\n";
    for e in entries {
        let f = &e.figures;
        let cell = |metric: &str, subject: &str, x: f64| {
            format!(
                "<td {}>{}</td>",
                data(scope, &e.name, metric, subject, x),
                show(x)
            )
        };
        let _ = write!(
            s,
            "<tr><td class=\"l\">{}</td><td>{}</td>",
            esc(&e.name),
            f.elements
        );
        for (k, m) in r.models.iter().enumerate() {
            s += &cell("norm", m, f.norms[k]);
            s += &cell("norm_ratio", m, f.ratios[k]);
        }
        for (k, p) in pairs.iter().enumerate() {
            s += &cell("cosine", &pair_name(p), f.cosines[k]);
            s += &cell("sign_agreement", &pair_name(p), f.sign_agreement[k]);
        }
        for (k, d) in r.densities.iter().enumerate() {
            s += &cell("conflict_rate", &d.to_string(), f.conflict_rate[k]);
        }
        for (k, p) in r.distance_points.iter().enumerate() {
            s += &cell("distance", p, f.distances[k]);
            s += &cell("distance_ratio", p, f.distance_ratios[k]);
        }
        s += "</tr>\n";
    }
    s + "</table>\n"
}

/// The plots of per-layer figures.
fn plots(r: &Report) -> String {
    let layers: Vec<&Entry> = r.layers.iter().collect();
    let per_layer =
        |get: &dyn Fn(&Entry) -> f64| layers.iter().map(|e| get(e)).collect::<Vec<f64>>();
    let norms: Vec<Series> = (0..r.models.len())
        .map(|k| Series {
            label: short(&r.models[k]).into(),
            subject: r.models[k].clone(),
            values: per_layer(&|e| e.figures.ratios[k]),
        })
        .collect();
    let cos: Vec<Series> = r
        .pairs()
        .iter()
        .enumerate()
        .map(|(k, &(i, j))| Series {
            label: format!("{}·{}", short(&r.models[i]), short(&r.models[j])),
            subject: format!("{}|{}", r.models[i], r.models[j]),
            values: per_layer(&|e| e.figures.cosines[k]),
        })
        .collect();
    let conf: Vec<Series> = r
        .densities
        .iter()
        .enumerate()
        .map(|(k, d)| Series {
            label: format!("density {d}"),
            subject: d.to_string(),
            values: per_layer(&|e| e.figures.conflict_rate[k]),
        })
        .collect();
    let dist: Vec<Series> = r
        .distance_points
        .iter()
        .enumerate()
        .map(|(k, p)| Series {
            label: p.clone(),
            subject: p.clone(),
            values: per_layer(&|e| e.figures.distance_ratios[k]),
        })
        .collect();
    let mut s = line_plot(
        "task-vector norm / base norm, per layer",
        "norm_ratio",
        &layers,
        &norms,
    );
    if !cos.is_empty() {
        s += &line_plot("cosine of task vectors, per layer", "cosine", &layers, &cos);
    }
    if !conf.is_empty() {
        s += &line_plot(
            "TIES sign-conflict rate after trimming, per layer",
            "conflict_rate",
            &layers,
            &conf,
        );
    }
    if !dist.is_empty() {
        s += &line_plot(
            "sweep points: distance from the base / base norm, per layer",
            "distance_ratio",
            &layers,
            &dist,
        );
    }
    s
}

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>shardmerge merge report</title><style>{STYLE}</style></head><body>\n<h1>Merge report</h1>\n<p>Task vectors δ = model − base, base <b>{}</b>; models: {}. Trim densities: {}.{}</p>\n",
        esc(&r.base),
        r.models.iter().map(|m| esc(m)).collect::<Vec<_>>().join(", "),
        if r.densities.is_empty() { "none".to_string() } else { r.densities.iter().map(f64::to_string).collect::<Vec<_>>().join(", ") },
        if r.points.is_empty() { String::new() } else { format!(" Sweep of {} points ({} measured against the base).", r.points.len(), r.distance_points.len()) }
    );
    s += "<h2>Per layer</h2>\n";
    s += &plots(r);
    if r.models.len() >= 2 {
        s += &heatmap(r);
    }
    s += "<h2>Whole model</h2>\n";
    s += &table(r, "total", std::slice::from_ref(&r.total));
    s += "<h2>By module kind</h2>\n";
    s += &table(r, "kind", &r.kinds);
    s += "<h2>By layer</h2>\n";
    s += &table(r, "layer", &r.layers);
    s += "<h2>By tensor</h2>\n";
    s += &table(r, "tensor", &r.tensors);
    s + "</body></html>\n"
}
