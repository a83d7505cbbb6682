"""Core commands: export, build, inspect, embed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..artifact import Backend, Precision, Variant
from ._ui import StageSpinners, print_json, progress_ctx, run_with_spinner

MODEL_HELP = "Hub id, local dir, or demo:tiny-mistral | demo:minilm | demo:smollm2"
DEFAULT_MODEL = "Salesforce/SFR-Embedding-Mistral"



def export(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output dir (one model per dir)."),
    precision: Precision = typer.Option(Precision.FP32, "--precision", "-p", case_sensitive=False,
                                        help="fp32 or fp16 (int8 comes from `calibrate` or `build`)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    dtype: str = typer.Option("float32", help="Reference dtype for the torch backend: float32|float16|bfloat16."),
    opset: int = typer.Option(23, help="ONNX opset (>= 23: fused Attention)."),
    low_memory: str = typer.Option("auto", help="auto | on | off: meta-device graph + streamed weights."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the post-export check against PyTorch."),
    trust_remote_code: bool = typer.Option(False, help="Allow model repos to run their own code (off by default)."),
    force: bool = typer.Option(False, help="Redo even if up to date; also restores spec.json and tokenizer/."),
) -> None:
    """Export a model to a validated ONNX file with pooling and L2 normalisation in the graph."""
    from ..models.loading import resolve_model, torch_dtype
    from ..pipeline import stage_summary
    from ..stages.common import prepare_output, writer_lock
    from ..stages.export import ExportConfig, run_export

    torch_dtype(dtype)
    cfg = ExportConfig(precision=precision, opset=opset, validate=not no_validate, low_memory=low_memory)
    resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
    with writer_lock(output):
        prepare_output(output, resolved, dtype=dtype, repair=force)  # refuses another model's dir before any work
        rec = run_with_spinner(f"export:{cfg.precision.value}",
                               lambda say: run_export(output, resolved, cfg, force=force, on_progress=say))
    print_json(stage_summary(rec))


def build(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output dir (one model per dir)."),
    precision: Precision = typer.Option(Precision.FP32, "--precision", "-p", case_sensitive=False,
                                        help="fp32 | fp16 | int8"),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    low_memory: str = typer.Option("auto", help="auto | on | off"),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the quick fidelity verification."),
    trust_remote_code: bool = typer.Option(False, help="Allow model repos to run their own code."),
    force: bool = typer.Option(False, help="Redo every stage."),
) -> None:
    """Run the whole pipeline (export, then the stages the precision needs), resuming finished stages."""
    from ..models.loading import resolve_model
    from ..pipeline import BuildConfig, build as run_build, stage_summary
    from ..stages.common import prepare_output, writer_lock
    from ..stages.export import ExportConfig

    cfg = BuildConfig(precision=precision, force=force, verify=not no_verify, export=ExportConfig(low_memory=low_memory))
    resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
    with writer_lock(output):
        prepare_output(output, resolved, repair=force)  # refuses another model's dir before any work starts
        with progress_ctx() as prog:
            records = run_build(output, resolved, cfg, on_progress=StageSpinners(prog))
    print_json([stage_summary(r) for r in records])


def inspect(directory: Path = typer.Argument(..., help="An sfr-export output dir."),
            verify: bool = typer.Option(True, help="Also check the sha256 of every recorded file.")) -> None:
    """Print the manifest; with --verify (the default) check every file it records."""
    from ..artifact import Manifest

    m = Manifest.load(directory)
    if verify:
        m.verify_base()
        for name in m.data.get("stages", {}):
            m.verify_stage(name)
    print_json(m.data)


def embed(
    directory: Path = typer.Argument(..., help="An sfr-export output dir."),
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    backend: Backend = typer.Option(Backend.ONNXRUNTIME, case_sensitive=False, help="Runner backend."),
    variant: Optional[Variant] = typer.Option(None, case_sensitive=False, help="ONNX variant (default: best on this machine)."),
    prompt: Optional[str] = typer.Option(None, help="Prompt name or task (queries get its instruction)."),
    similarity: bool = typer.Option(False, "--similarity", "-s", help="Print the cosine-similarity matrix instead."),
    dims: int = typer.Option(8, help="How many leading dimensions to print per embedding."),
) -> None:
    """Embed texts for a quick look."""
    import numpy as np

    from ..runtime import Embedder
    from ..tokenization import validate_texts

    validate_texts(texts)  # a bad text is refused before the model is loaded
    with Embedder.from_artifact(directory, backend=backend, variant=variant) as emb:
        vecs = emb.encode(texts, prompt=prompt)
        info = emb.info
    if similarity:
        typer.echo(json.dumps({"backend": info, "similarity": np.round(vecs @ vecs.T, 4).tolist()}))
    else:
        typer.echo(json.dumps({"backend": info, "dim": int(vecs.shape[1]),
                               "embeddings": [np.round(v[:dims], 5).tolist() for v in vecs]}))


COMMANDS = {"export": export, "build": build, "inspect": inspect, "embed": embed}
