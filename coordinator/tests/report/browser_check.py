"""Opens a shardmerge report.html in headless Chromium (Playwright) and checks it against
report.json: the plots render as SVG, the page logs no console error and raises nothing, and
every figure on the page (each element with data-metric and data-value) equals report.json's.

usage: browser_check.py REPORT_DIR CHROMIUM_EXECUTABLE
Prints `browser check: N figures match, S svg, C points` and exits 0, or the problems and 1.
"""
import json
import os
import sys

from playwright.sync_api import sync_playwright


def lookup(rep, scope, name, metric, subject):
    entries = {
        "total": [rep["total"]],
        "kind": rep["kinds"],
        "layer": rep["layers"],
        "tensor": rep["tensors"],
    }[scope]
    entry = next(e for e in entries if e["name"] == name)
    if metric in ("norm", "norm_ratio"):
        i = rep["models"].index(subject)
    elif metric in ("cosine", "sign_agreement"):
        i = [f"{a}|{b}" for a, b in rep["pairs"]].index(subject)
    elif metric == "conflict_rate":
        i = [repr_density(d) for d in rep["densities"]].index(subject)
    elif metric in ("distance", "distance_ratio"):
        i = rep["distance_points"].index(subject)
    else:
        raise KeyError(metric)
    return entry[metric][i]


def repr_density(d):
    # Rust writes 0.5 as "0.5" and 1e-3 as "0.001": the shortest round trip, never exponents
    s = repr(float(d))
    return s[:-2] if s.endswith(".0") else s


def main():
    folder, chromium = sys.argv[1], sys.argv[2]
    with open(os.path.join(folder, "report.json")) as f:
        rep = json.load(f)
    problems, logs = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: logs.append((m.type, m.text)))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto("file://" + os.path.abspath(os.path.join(folder, "report.html")))
        page.wait_for_load_state("load")
        svgs = page.locator("svg").count()
        plots = page.locator("svg.plot").count()
        heat = page.locator("svg.heatmap rect[data-value]").count()
        points = page.locator("svg.plot circle[data-value]").count()
        lines = page.locator("svg.plot polyline").count()
        # what a reader sees: each plot has a visible size
        sizes = page.eval_on_selector_all(
            "svg", "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
        )
        cells = page.eval_on_selector_all(
            "[data-metric][data-value]",
            "els => els.map(e => [e.dataset.scope, e.dataset.name, e.dataset.metric, e.dataset.subject, e.dataset.value])",
        )
        browser.close()
    errors = [t for kind, t in logs if kind in ("error", "warning")]
    problems += [f"console: {t}" for t in errors]
    problems += [f"fetched {u}" for u in requests if not u.startswith("file://")]
    want_plots = 1 + (len(rep["pairs"]) > 0) + (len(rep["densities"]) > 0)
    want_plots += len(rep.get("distance_points", [])) > 0
    if plots != want_plots:
        problems.append(f"{plots} line plots, expected {want_plots}")
    if len(rep["models"]) >= 2 and heat != len(rep["pairs"]) * 2:
        problems.append(f"heatmap has {heat} cells with figures, expected {len(rep['pairs']) * 2}")
    if points == 0 or lines == 0:
        problems.append(f"plots without points ({points}) or lines ({lines})")
    problems += [f"svg of size {w}x{h}" for w, h in sizes if w <= 0 or h <= 0]
    for scope, name, metric, subject, value in cells:
        want = lookup(rep, scope, name, metric, subject)
        got = None if value == "" else float(value)
        if got != want:
            problems.append(f"{scope} {name} {metric} {subject}: page {value!r}, json {want!r}")
    if len(cells) == 0:
        problems.append("no figures on the page")
    if problems:
        print("\n".join(problems[:50]))
        print(f"browser check: {len(problems)} problems")
        sys.exit(1)
    print(f"browser check: {len(cells)} figures match, {svgs} svg, {points} points")


main()
