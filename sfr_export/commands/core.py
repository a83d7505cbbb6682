"""Core commands: export, build, inspect, embed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserInputError


def _progress_ctx():
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..cli import console

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[stage]}[/] {task.description}"), TimeElapsedColumn(),
                    console=console, transient=True)


MODEL_HELP = "Hub id, local dir, or demo:tiny-mistral | demo:minilm | demo:smollm2"


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        model: str = typer.Option("Salesforce/SFR-Embedding-Mistral", "--model", "-m", help=MODEL_HELP),
        output: Path = typer.Option(..., "--output", "-o", help="Output dir (one model per dir)."),
        precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 | fp16"),
        revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
        dtype: str = typer.Option("float32", help="Reference dtype for the torch backend: float32|float16|bfloat16."),
        opset: int = typer.Option(23, help="ONNX opset (>= 23: fused Attention)."),
        low_memory: str = typer.Option("auto", help="auto | on | off: meta-device graph + streamed weights."),
        no_validate: bool = typer.Option(False, "--no-validate", help="Skip the post-export check against PyTorch."),
        trust_remote_code: bool = typer.Option(False, help="Allow model repos to run their own code (off by default)."),
        force: bool = typer.Option(False, help="Redo even if the manifest says it is up to date."),
    ) -> None:
        """Export a model to a validated ONNX file with pooling and L2 normalisation in the graph."""
        from ..models.loading import resolve_model, torch_dtype
        from ..stages.common import Precision
        from ..cli import print_json
        from ..stages.common import prepare_output
        from ..stages.export import ExportConfig, run_export

        torch_dtype(dtype)
        cfg = ExportConfig(precision=Precision.parse(precision), opset=opset, validate=not no_validate, low_memory=low_memory)
        resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        prepare_output(output, resolved, dtype=dtype)  # refuses another model's dir before any work starts
        with _progress_ctx() as prog:
            task = prog.add_task("starting", stage=f"export:{cfg.precision.value}", total=None)
            rec = run_export(output, resolved, cfg, force=force,
                             on_progress=lambda msg: prog.update(task, description=msg))
            prog.update(task, description="done")
        from ..pipeline import stage_summary

        print_json(stage_summary(rec))

    @app.command()
    def build(
        model: str = typer.Option("Salesforce/SFR-Embedding-Mistral", "--model", "-m", help=MODEL_HELP),
        output: Path = typer.Option(..., "--output", "-o", help="Output dir (one model per dir)."),
        precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 | fp16 | int8"),
        revision: Optional[str] = typer.Option(None, help="Hub revision."),
        low_memory: str = typer.Option("auto", help="auto | on | off"),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the quick fidelity verification."),
        trust_remote_code: bool = typer.Option(False, help="Allow model repos to run their own code."),
        force: bool = typer.Option(False, help="Redo every stage."),
    ) -> None:
        """Run the whole pipeline (export, then the stages the precision needs), resuming finished stages."""
        from ..cli import print_json
        from ..models.loading import resolve_model
        from ..pipeline import BuildConfig, build as run_build, stage_summary
        from ..stages.common import Precision, prepare_output
        from ..stages.export import ExportConfig

        cfg = BuildConfig(precision=Precision.parse(precision), force=force, verify=not no_verify,
                          export=ExportConfig(low_memory=low_memory))
        resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        prepare_output(output, resolved)  # refuses another model's dir before any work starts
        with _progress_ctx() as prog:
            tasks: dict[str, int] = {}

            def on_progress(stage: str, msg: str) -> None:
                if stage not in tasks:
                    tasks[stage] = prog.add_task(msg, stage=stage, total=None)
                prog.update(tasks[stage], description=msg)

            records = run_build(output, resolved, cfg, on_progress=on_progress)
        print_json([stage_summary(r) for r in records])

    @app.command()
    def inspect(directory: Path = typer.Argument(..., help="An sfr-export output dir."),
                verify: bool = typer.Option(True, help="Also check every artifact's sha256.")) -> None:
        """Print the manifest (and verify checksums)."""
        from ..cli import print_json
        from ..manifest import Manifest

        m = Manifest.load(directory)
        if verify:
            for name in m.data.get("stages", {}):
                m.verify_stage(name)
        print_json(m.data)

    @app.command()
    def embed(
        directory: Path = typer.Argument(..., help="An sfr-export output dir."),
        texts: list[str] = typer.Argument(..., help="Texts to embed."),
        backend: str = typer.Option("onnxruntime", help="onnxruntime | torch | tensorrt | auto"),
        variant: Optional[str] = typer.Option(None, help="ONNX variant: fp32 | fp16 | int8 | ..."),
        prompt: Optional[str] = typer.Option(None, help="Prompt name or task (queries get its instruction)."),
        similarity: bool = typer.Option(False, "--similarity", "-s", help="Print the cosine-similarity matrix instead."),
        dims: int = typer.Option(8, help="How many leading dimensions to print per embedding."),
    ) -> None:
        """Embed texts for a quick look."""
        import numpy as np

        from ..runtime import Embedder

        if not texts:
            raise UserInputError("give at least one text")
        emb = Embedder.from_artifact(directory, backend=backend, variant=variant)
        vecs = emb.encode(texts, prompt=prompt)
        if similarity:
            sims = vecs @ vecs.T
            typer.echo(json.dumps({"backend": emb.info, "similarity": np.round(sims, 4).tolist()}))
        else:
            typer.echo(json.dumps({"backend": emb.info, "dim": int(vecs.shape[1]),
                                  "embeddings": [np.round(v[:dims], 5).tolist() for v in vecs]}))
