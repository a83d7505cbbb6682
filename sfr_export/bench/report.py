"""The benchmark's outputs: a markdown table, the JSON report and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import atomic_path, atomic_write_text
from ..errors import ArtifactError
from .core import BenchReport


def markdown_table(report: BenchReport) -> str:
    lines = ["| backend | batch | seq | tokens/s | p50 ms | p99 ms | x torch fp32 | peak RSS MB | model MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.results:
        if "cells" not in r:
            lines.append(f"| {r['candidate']} | failed: {r.get('error', '?')[:80]} |||||||")
            continue
        for c in r["cells"]:
            sp = c.get("speedup_vs_torch_fp32")
            lines.append(f"| {r['candidate']} | {c['batch']} | {c['seq']} | {c['tokens_per_s']:,.0f} | {c['p50_ms']:.2f} | "
                         f"{c['p99_ms']:.2f} | {'' if sp is None else f'{sp:.2f}'} | {r['peak_rss_mb']:.0f} | "
                         f"{r['model_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def write_outputs(report: BenchReport, json_path: Path, png_path: Path | None) -> None:
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if png_path is not None:
        plot(report, png_path)


def plot(report: BenchReport, path: Path) -> None:
    from .._optional import require

    matplotlib = require("matplotlib", purpose="the benchmark plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if "cells" in r]
    if not ok:
        raise ArtifactError("no candidate produced results to plot")
    labels = [f"b{c['batch']}/s{c['seq']}" for c in ok[0]["cells"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, len(labels) * 1.4), 4.8),
                                   gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(r["cells"]))]
        ax1.bar(xs, [c["tokens_per_s"] for c in r["cells"]], width, label=r["candidate"])
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right")
    ax1.set_ylabel("tokens/s (higher is better)")
    ax1.set_yscale("log")
    ax1.set_title(f"{report.model}: throughput by batch/sequence (ratios matter, not absolutes)")
    ax1.legend(fontsize=8)
    ax2.bar([r["candidate"] for r in ok], [r["peak_rss_mb"] for r in ok], color="gray")
    ax2.set_ylabel("peak RSS MB (own process)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
