"""``report.html``: one self-contained page (inline CSS and SVG, no scripts, no external resources) with a cosine
histogram per candidate and per-task score bars (reference vs candidate, with the delta)."""

from __future__ import annotations

from html import escape
from typing import Any

_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2"]


def _histogram_svg(name: str, hist: dict[str, list[float]], width: int = 420, height: int = 160) -> str:
    counts = hist["counts"]
    edges = hist["edges"]
    top = max(max(counts), 1)
    pad_l, pad_b, pad_t = 40, 30, 20
    w = (width - pad_l - 10) / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - pad_b - pad_t) * c / top
        x = pad_l + i * w
        y = height - pad_b - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}" fill="#4c78a8">'
                    f"<title>[{edges[i]:.6f}, {edges[i + 1]:.6f}): {c}</title></rect>")
    axis = (f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 10}" y2="{height - pad_b}" stroke="#333"/>'
            f'<text x="{pad_l}" y="{height - 10}" font-size="11">{edges[0]:.6f}</text>'
            f'<text x="{width - 10}" y="{height - 10}" font-size="11" text-anchor="end">1.0</text>'
            f'<text x="{pad_l - 4}" y="{pad_t + 4}" font-size="11" text-anchor="end">{top}</text>')
    title = f'<text x="{pad_l}" y="14" font-size="12" font-weight="bold">{escape(name)}: cosine to reference</text>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="cosine histogram {escape(name)}">{title}{"".join(bars)}{axis}</svg>')


def _scores_svg(report: dict[str, Any], width: int = 760) -> str:
    evaluated = [c for c in report["candidates"] if c["status"] == "evaluated"]
    tasks = list(report["reference_scores"])
    series = [("reference", {t: report["reference_scores"][t]["main"] for t in tasks}, {})]
    for c in evaluated:
        series.append((c["name"], {r["task"]: r["candidate"] for r in c["tasks"]},
                       {r["task"]: r["delta"] for r in c["tasks"]}))
    row_h = 14 * len(series) + 16
    pad_l = 190
    height = row_h * len(tasks) + 40
    scale = (width - pad_l - 90) / 100.0
    parts = []
    for ti, task in enumerate(tasks):
        y0 = 10 + ti * row_h
        parts.append(f'<text x="4" y="{y0 + 12}" font-size="12">{escape(task)} '
                     f'({escape(report["reference_scores"][task]["main_metric"])})</text>')
        for si, (name, vals, deltas) in enumerate(series):
            if task not in vals:
                continue
            v = max(vals[task], 0.0)
            y = y0 + si * 14
            color = _COLORS[si % len(_COLORS)]
            label = f"{vals[task]:.2f}" + (f" ({deltas[task]:+.2f})" if task in deltas else "")
            parts.append(f'<rect x="{pad_l}" y="{y}" width="{v * scale:.1f}" height="12" fill="{color}">'
                         f"<title>{escape(name)}: {label}</title></rect>"
                         f'<text x="{pad_l + v * scale + 4:.1f}" y="{y + 10}" font-size="10">{escape(label)}</text>')
    legend = "".join(f'<rect x="{pad_l + i * 120}" y="{height - 20}" width="10" height="10" fill="{_COLORS[i % len(_COLORS)]}"/>'
                     f'<text x="{pad_l + i * 120 + 14}" y="{height - 11}" font-size="11">{escape(n)}</text>'
                     for i, (n, _, _) in enumerate(series))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="task scores">{"".join(parts)}{legend}</svg>')


def render_html(report: dict[str, Any], markdown: str) -> str:
    g = report["gate"]
    verdict = "PASS" if g["passed"] else "FAIL"
    color = "#2e7d32" if g["passed"] else "#c62828"
    hists = "".join(f'<figure>{_histogram_svg(c["name"], c["cosine"]["histogram"])}</figure>'
                    for c in report["candidates"] if c["status"] == "evaluated")
    skipped = "".join(f"<li><b>{escape(c['name'])}</b> skipped: {escape(c['reason'])}</li>"
                      for c in report["candidates"] if c["status"] != "evaluated")
    worst_rows = "".join(
        f"<tr><td>{escape(c['name'])}</td><td>{w['cosine']:.6f}</td><td>{escape(w['task'])}</td>"
        f"<td>{escape(w['side'])}</td><td>{escape(w['text'])}</td></tr>"
        for c in report["candidates"] if c["status"] == "evaluated" for w in c["cosine"]["worst"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sfr-export verify: {escape(str(report['artifact']['model_id']))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
.verdict{{color:#fff;background:{color};padding:.2em .6em;border-radius:4px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}}
figure{{display:inline-block;margin:0 1em 1em 0}}pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap}}</style>
</head><body>
<h1>Fidelity report <span class="verdict">{verdict}</span></h1>
<p>Model <code>{escape(str(report['artifact']['model_id']))}</code>, suite <code>{escape(report['suite']['name'])}</code>,
reference <code>{escape(report['reference']['name'])}</code>, created {escape(report['created'])}.</p>
{f"<p><b>{escape(g['reason'])}</b></p>" if g['reason'] else ""}
<h2>Embedding cosine to the reference</h2>{hists or "<p>No candidate was evaluated.</p>"}
{f"<ul>{skipped}</ul>" if skipped else ""}
<h2>Task scores (main metric, points; delta to the reference in brackets)</h2>{_scores_svg(report)}
<h2>Lowest-cosine inputs</h2><table><tr><th>candidate</th><th>cosine</th><th>task</th><th>side</th><th>text</th></tr>{worst_rows}</table>
<h2>Summary (report.md)</h2><pre>{escape(markdown)}</pre>
</body></html>
"""
