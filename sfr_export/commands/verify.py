"""``sfr-export verify``: fidelity of an output dir's candidates against the PyTorch reference, with a CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._ui import console, parse_csv, run_with_spinner


def verify(
    directory: Path = typer.Argument(..., help="An sfr-export output dir."),
    reference: Optional[str] = typer.Option(None, help="Reference backend: torch (default) or an ONNX variant."),
    candidates: Optional[str] = typer.Option(
        None, help="Comma list: fp32,fp16,int8,...,tensorrt, or onnx (every ONNX variant). Default: all present."),
    suite: Optional[str] = typer.Option(None, help="quick (shipped subsets; default) | full (../shared/data) | a suite TOML."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Root of MTEB-format task folders."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML here."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Default: DIR/reports/verify."),
    min_mean_cosine: Optional[float] = typer.Option(None, help="Gate: minimum mean cosine to the reference."),
    min_p1_cosine: Optional[float] = typer.Option(None, help="Gate: minimum 1st-percentile cosine."),
    max_delta: Optional[float] = typer.Option(None, help="Gate: maximum |score delta| per task, in points."),
    config: Optional[Path] = typer.Option(None, "--config", help=r"TOML with \[verify] and \[thresholds.<precision>] tables."),
    time_budget: Optional[float] = typer.Option(None, help="Seconds; tasks the reference cannot reach are dropped."),
    cache_dir: Optional[Path] = typer.Option(None, help="Reference-embedding cache (default ~/.cache/sfr-export)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference embeddings."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per batch (default 32)."),
) -> None:
    """Compare reference and candidates on MTEB subsets; write report.json/md/html; exit 1 when the gate fails."""
    from ..errors import FidelityGateError
    from ..eval.gate import ThresholdOverrides
    from ..stages.verify import VerifyConfig, run_verify

    overrides = ThresholdOverrides(min_mean_cosine=min_mean_cosine, min_p1_cosine=min_p1_cosine, max_delta=max_delta)
    given = {"suite": suite, "data_dir": data_dir, "reference": reference, "junit": junit,
             "report_dir": report_dir, "cache_dir": cache_dir, "time_budget_s": time_budget,
             "batch_size": batch_size, "overrides": overrides,
             "candidates": tuple(parse_csv(candidates, name="--candidates")) if candidates is not None else None,
             "cache": False if no_cache else None}
    cfg = (VerifyConfig.from_toml(config, **given) if config is not None
           else VerifyConfig(**{k: v for k, v in given.items() if v is not None}))
    result = run_with_spinner("verify", lambda say: run_verify(directory, cfg, raise_on_fail=False, on_progress=say))
    typer.echo(result.markdown)
    junit_note = f", junit: {result.paths['junit']}" if "junit" in result.paths else ""
    console.print(f"reports: {result.paths['md'].parent}{junit_note}")
    if not result.passed:
        raise FidelityGateError(result.report["gate"]["reason"])


COMMANDS = {"verify": verify}
