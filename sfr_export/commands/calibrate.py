"""``sfr-export calibrate DIR``: int8 Q/DQ (TensorRT form) + CPU int8 form from the dir's fp32 ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._ui import print_json, run_with_spinner


def calibrate(
    directory: Path = typer.Argument(..., help="An sfr-export output dir holding export:fp32."),
    recipe: str = typer.Option("default", help="Shipped recipe name or a recipe TOML path."),
    data: Optional[Path] = typer.Option(None, help="Your own JSONL (text, task, optional instruction) instead of a recipe."),
    method: str = typer.Option("minmax", help="Activation range method: minmax | percentile | entropy."),
    percentile: float = typer.Option(99.999, help="Percentile for --method percentile."),
    smoothquant: str = typer.Option("off", help="off | auto (per-group alpha search) | an alpha in [0, 1]."),
    target_cosine: Optional[float] = typer.Option(None, help="Required mean cosine vs fp32; fail (no artifact) if unreachable."),
    target_p1: float = typer.Option(0.98, help="Required 1st-percentile cosine."),
    target_spearman: float = typer.Option(0.3, help="Allowed |delta STS Spearman| in points on held-out pairs."),
    max_float_fraction: float = typer.Option(0.25, help="At most this share of MatMuls may stay float."),
    no_w8a8: bool = typer.Option(False, "--no-w8a8", help="Weight-only int8 everywhere (no activation Q/DQ)."),
    no_cpu_form: bool = typer.Option(False, "--no-cpu-form", help="Skip the CPU int8 form."),
    samples: Optional[int] = typer.Option(None, help="Calibration texts (overrides the recipe)."),
    holdout: Optional[int] = typer.Option(None, help="Held-out texts (overrides the recipe)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (overrides the recipe)."),
    pairs: Optional[int] = typer.Option(None, help="Use only the first N held-out scored STS pairs (default: all)."),
    reference_dtype: str = typer.Option("auto", help="Torch model for calibration and the reference: float32 | "
                                        "bfloat16 | auto (bf16 above 8 GiB of fp32 weights)."),
    rotation: str = typer.Option("auto", help="Online rotations of the linear inputs: auto (last-token models: the "
                                 "Q/DQ form and the CPU form's folded candidate) | on (every model, and the CPU "
                                 "form's rotated candidate too) | off; see docs/int8.md."),
    prefix_float: Optional[int] = typer.Option(None, help="W8A8: keep the first N positions' activations float "
                                               "(default: 1 when the Q/DQ form is rotated, else 0)."),
    pooled_float: bool = typer.Option(True, help="W8A8, last-token models: keep each text's pooled row's "
                                      "activations float (one float MatMul on B rows per linear)."),
    weight_rounding: str = typer.Option("gptq", help="int8 weights of the Q/DQ form and the folded CPU form: gptq "
                                        "(error-compensated on the calibration texts) | nearest."),
    force: bool = typer.Option(False, help="Redo even if up to date."),
) -> None:
    """Calibrate on task-mixed data and write int8 ONNX variants ("int8": Q/DQ, "int8-cpu": CPU contrib ops)."""
    from ..stages.calibrate import CalibrateConfig, run_calibrate
    from ..stages.common import writer_lock

    cfg = CalibrateConfig(recipe=recipe, data=str(data) if data else None, method=method, percentile=percentile,
                          smoothquant=smoothquant, target_cosine=target_cosine, target_p1=target_p1,
                          target_spearman_delta=target_spearman, max_float_fraction=max_float_fraction,
                          w8a8=not no_w8a8, cpu_form=not no_cpu_form, samples=samples, holdout=holdout, seed=seed,
                          pairs=pairs, reference_dtype=reference_dtype, rotation=rotation,
                          prefix_float=prefix_float, pooled_float=pooled_float, weight_rounding=weight_rounding)
    with writer_lock(directory):
        recs = run_with_spinner("calibrate", lambda say: run_calibrate(directory, cfg, force=force, on_progress=say))
    print_json([{"stage": r.name, "status": r.status, "reason": r.reason, "artifacts": [a.path for a in r.artifacts],
                 "fidelity": r.figures.get("fidelity"), "modes": r.figures.get("mixed_precision", {}).get("modes")}
                for r in recs])


COMMANDS = {"calibrate": calibrate}
