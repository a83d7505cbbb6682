"""Stage 2: export the backbone + pooling + L2 norm to ONNX, then validate it against PyTorch.

The graph (built in :mod:`sfr_export.stages.export_graph`, shared with the low-memory path) takes ``input_ids`` and
``attention_mask`` (int64, dynamic ``batch`` and ``sequence``) and returns ``sentence_embedding`` (float32
[batch, dim]); attention is one fused ONNX ``Attention`` node per layer (opset >= 23). The export also writes
``model.cpu.onnx``, the form ONNX Runtime's CPU provider runs (:mod:`sfr_export.stages.ort_attention`:
``GroupQueryAttention`` for causal models, ``MultiHeadAttention`` on its flash path for bidirectional encoders).
Export runs in a subprocess so its memory comes back; validation runs in the same worker, reusing the loaded model,
and batches long inputs by a token budget.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, ExportValidationError, UserInputError
from ..artifact import ArtifactRecord, StageRecord
from ..spec import ModelSpec
from ..artifact import Precision
from ..vectors import row_cosine
from .common import progress, run_worker, worker_main
from .export_graph import OnnxIOSpec, export_program, make_wrapper, norms_to_fp32

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "OnnxIOSpec", "make_wrapper", "norms_to_fp32", "run_export",
           "validate_onnx", "validation_texts"]

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf caps one file at 2 GiB; stay well below


@dataclass(frozen=True)
class ExportConfig:
    precision: Precision = Precision.FP32
    opset: int = 23  # the first opset with a fused Attention op; lower ones decompose it over L x L scores
    validate: bool = True
    cpu_form: bool = True  # also write model.cpu.onnx (GroupQueryAttention / MultiHeadAttention, ONNX Runtime CPU)
    low_memory: str = "auto"  # auto | on | off: build the graph on the meta device and stream weights in
    min_cosine: float | None = None  # default per precision: fp32 0.99999, fp16 0.9995

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.precision is Precision.INT8:
            raise UserInputError("export writes fp32 or fp16 ONNX; int8 comes from `sfr-export calibrate` (or build --precision int8)")
        if self.opset < 23:
            raise UserInputError(f"opset {self.opset} has no fused Attention op (attention would be MatMul/Softmax over "
                                 "L x L scores); use opset 23 or later")
        if self.low_memory not in ("auto", "on", "off"):
            raise UserInputError(f"low_memory must be auto, on or off, got {self.low_memory!r}")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise UserInputError(f"min_cosine must be in (0, 1], got {self.min_cosine}")

    @property
    def threshold(self) -> float:
        if self.min_cosine is not None:
            return self.min_cosine
        return 0.99999 if self.precision is Precision.FP32 else 0.9995

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d


# ------------------------------------------------------------------------------------------------------------------
# Validation inputs: mixed lengths, both padding sides, past the sliding window
# ------------------------------------------------------------------------------------------------------------------
_PASSAGE = ("The coronavirus spike protein binds the ACE2 receptor on the surface of human cells, which lets the "
            "virus enter the cell and replicate. Vaccines train the immune system to recognise this protein. ")


def validation_texts(spec: ModelSpec, sliding_window: int | None) -> list[str]:
    texts = [
        spec.format_query("how does the virus enter human cells?", "Given a query on COVID-19, retrieve documents that answer the query"),
        "A man is playing a guitar.",
        _PASSAGE,
        "Refund not showing up on my statement",
    ]
    words_needed = min(spec.max_length, (sliding_window or 0) + 48) if sliding_window else min(spec.max_length, 96)
    texts.append((_PASSAGE * (words_needed // 20 + 2)).strip())  # long enough to reach max_length or pass the window
    return texts


VALIDATION_TOKEN_BUDGET = 4096  # padded tokens per validation batch: a max-length input rides alone


def _embed(runner: Any, tt: Any, seqs: list[list[int]], token_budget: int) -> np.ndarray:
    from ..runtime.embedder import embed_batches
    from ..tokenization import length_batches

    batches = length_batches(seqs, tt, batch_size=len(seqs), max_batch_tokens=token_budget)
    return embed_batches(lambda b: runner.infer(b.input_ids, b.attention_mask), batches, len(seqs))


def validate_onnx(onnx_path: Path, torch_runner: Any, tokenizer: Any, spec: ModelSpec, *, threshold: float,
                  sliding_window: int | None, session_config: dict[str, str] | None = None,
                  cpu_form: Path | None = None, token_budget: int = VALIDATION_TOKEN_BUDGET) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on mixed lengths, right- and left-padded, batched by ``token_budget``.

    A causal graph (right padding only) gets the left-padded batch too: ONNX Runtime re-pads it (the runner reads
    the graph's padding side), so this checks that a left-padded batch is never silently wrong. ``cpu_form`` (the
    ONNX Runtime CPU form, ``model.cpu.onnx``) is held to the same threshold.
    """
    from .export_graph import META_PADDING, graph_metadata
    from ..runtime.ort_runner import OrtRunner
    from ..tokenization import TextTokenizer

    texts = validation_texts(spec, sliding_window)
    results: dict[str, Any] = {"threshold": threshold, "texts": len(texts), "token_budget": token_budget,
                               "graph_padding": graph_metadata(onnx_path).get(META_PADDING, "any")}
    forms = {"onnx": onnx_path, **({"onnx-cpu": cpu_form} if cpu_form is not None else {})}
    worst: tuple[float, str, str] = (2.0, "", "")
    refs = {}
    for side in ("right", "left"):
        tt = TextTokenizer(tokenizer, spec.replace(padding_side=side))
        seqs = tt.encode(texts).ids
        refs[side] = (tt, seqs, _embed(torch_runner, tt, seqs, token_budget))
    for kind, path in forms.items():  # one ONNX Runtime session (weights + arena) alive at a time
        with OrtRunner(path, session_config=session_config) as runner:
            for side, (tt, seqs, ref) in refs.items():
                cos = row_cosine(ref, _embed(runner, tt, seqs, token_budget))
                key = f"{side}_padding" if kind == "onnx" else f"cpu_form_{side}_padding"
                results[key] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                                "lengths": [len(s) for s in seqs]}
                i = int(cos.argmin())
                if not cos[i] >= worst[0]:
                    worst = (float(cos[i]), texts[i], f"{side} padding, {kind}")
    results["min_cosine"] = worst[0]
    if worst[0] < threshold or not np.isfinite(worst[0]):
        raise ExportValidationError(
            f"ONNX output disagrees with PyTorch: min cosine {worst[0]:.6f} < {threshold} "
            f"on input {worst[1][:60]!r}… ({worst[2]})", worst_text=worst[1], min_cosine=worst[0])
    return results


# ------------------------------------------------------------------------------------------------------------------
# Worker (subprocess)
# ------------------------------------------------------------------------------------------------------------------
def _export_in_memory(model_dir: Path, spec: ModelSpec, cfg: ExportConfig, onnx_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Load the weights, trace, save. Returns (backbone, plan, figures)."""
    from ..models import load_backbone

    progress("loading weights")
    backbone = load_backbone(model_dir, dtype="float32")
    if cfg.precision is Precision.FP16:
        backbone = backbone.half()
        norms_to_fp32(backbone)
    wrapper = make_wrapper(backbone, spec)
    progress(f"tracing with torch.onnx.export(dynamo=True), opset {cfg.opset}, {wrapper.plan.form.value} attention")
    prog = export_program(wrapper, OnnxIOSpec(), opset=cfg.opset, optimize=True)
    param_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = param_bytes > EXTERNAL_DATA_THRESHOLD
    progress("writing ONNX" + (" with external data" if external else ""))
    prog.save(str(onnx_path), external_data=external)
    del prog
    return backbone, wrapper.plan, {"external_data": external}


def _export_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..models import load_tokenizer
    from .ort_attention import cpu_form_op, write_cpu_form
    from ..runtime.torch_runner import TorchRunner

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ExportConfig(**{**job["config"], "precision": job["config"]["precision"]})
    spec = ModelSpec.from_dict(job["spec"])
    model_dir = Path(job["model_dir"])
    out_dir = Path(job["out_dir"])
    t0 = time.time()
    weights_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    scale = 0.5 if cfg.precision is Precision.FP16 else 1.0
    low_memory = cfg.low_memory == "on" or (cfg.low_memory == "auto" and weights_bytes * scale > 4e9)
    onnx_path = out_dir / "model.onnx"
    if low_memory:
        from .lowmem_export import export_low_memory

        progress("building the graph on the meta device (low-memory path)")
        info = export_low_memory(model_dir, spec, cfg, onnx_path)
        backbone, plan = None, plan_attention_from_dir(model_dir)
    else:
        backbone, plan, info = _export_in_memory(model_dir, spec, cfg, onnx_path)
    OnnxIOSpec().check(onnx_path)
    cpu_path = None
    if cfg.cpu_form and cpu_form_op(plan.form, plan.num_heads, plan.kv_heads):
        progress("writing the ONNX Runtime CPU form (com.microsoft attention)")
        cpu_path, _n = write_cpu_form(onnx_path, plan)
    export_seconds = time.time() - t0
    result: dict[str, Any] = {"export_seconds": export_seconds, "low_memory": low_memory, "attention": plan.to_dict(),
                              "cpu_form": cpu_path is not None, **info}
    if cfg.validate:
        progress("validating against PyTorch (mixed lengths, left and right padding, batched by tokens)")
        tok = load_tokenizer(model_dir)
        # fp32: the exported backbone is the reference; fp16: free it before loading the fp32 reference.
        reuse = backbone if cfg.precision is Precision.FP32 else None
        del backbone
        import gc

        gc.collect()
        ref = TorchRunner(model_dir, spec, dtype="float32", model=reuse)
        ref.activate()
        sliding = getattr(ref.model.config, "sliding_window", None)
        result["validation"] = validate_onnx(onnx_path, ref, tok, spec, threshold=cfg.threshold,
                                             sliding_window=sliding, cpu_form=cpu_path)
    return result


def plan_attention_from_dir(model_dir: Path) -> Any:
    """The attention plan of a model dir, from a weightless (meta-device) instance of its backbone."""
    import torch
    from transformers import AutoConfig, AutoModel

    from ..errors import ModelLoadError
    from .export_graph import plan_attention

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read {model_dir}/config.json: {str(exc).splitlines()[0][:200]}") from exc
    with torch.device("meta"):
        backbone = AutoModel.from_config(config, attn_implementation="sdpa")
    return plan_attention(backbone)


def with_graph_padding(model: Any) -> Any:
    """``model`` (a ResolvedModel) with the padding its exported graph will require recorded in the spec.

    Causal models export without a padding mask, so their artifacts pad right whatever the tokenizer config says.
    """
    import dataclasses

    plan = plan_attention_from_dir(Path(model.local_dir))
    if plan.padding_side == "right":
        if model.spec.padding_side != "right":
            log.info("the causal graph is exact for right padding only: the artifact pads right")
        return dataclasses.replace(model, spec=model.spec.replace(padding_side="right", graph_padding="right"))
    return dataclasses.replace(model, spec=model.spec.replace(graph_padding="any"))


def _artifact_kind(p: Path) -> str:
    from .ort_attention import CPU_FORM_NAME

    if p.name == CPU_FORM_NAME:
        return "onnx-cpu"  # the com.microsoft attention form the CPU provider runs (runtime.embedder picks it)
    return "onnx" if p.suffix == ".onnx" else "onnx-data"


def onnx_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def run_export(root: Path, model: Any, config: ExportConfig, *, force: bool = False,
               on_progress: Any = None) -> StageRecord:
    """Export ``model`` (a ResolvedModel) into ``root/onnx/<precision>/`` and record it in the manifest."""
    from .common import prepare_output

    root = Path(root)
    model = with_graph_padding(model)
    manifest = prepare_output(root, model)
    variant = config.precision.value
    name = f"export:{variant}"
    existing = manifest.stage(name)
    if existing is not None and not force and existing.config == {**config.to_dict(), "variant": variant}:
        try:
            manifest.verify_stage(name)
            log.info("%s is up to date (use --force to redo)", name)
            return existing
        except ArtifactError as exc:
            log.warning("re-exporting %s: %s", name, exc)
    final_dir = root / "onnx" / variant
    tmp_dir = root / "onnx" / f".{variant}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        job = {"config": config.to_dict(), "spec": model.spec.to_dict(), "model_dir": str(model.local_dir),
               "out_dir": str(tmp_dir)}
        result = run_worker("sfr_export.stages.export", job, log_path=root / "logs" / f"export-{variant}.log",
                            on_progress=on_progress)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp_dir.rename(final_dir)  # the .onnx and its .data move together
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    arts = [ArtifactRecord.of(root, p, _artifact_kind(p)) for p in onnx_files(final_dir)]
    rec = StageRecord(stage="export", name=name, config={**config.to_dict(), "variant": variant}, artifacts=arts,
                      figures=result)
    manifest.record(rec)
    return rec


if __name__ == "__main__":
    worker_main(_export_job)
