"""Stage 2: export the backbone + pooling + L2 norm to ONNX, then validate it against PyTorch.

The graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic ``batch`` and ``sequence``) and returns
``sentence_embedding`` (float32 [batch, dim]). Export runs in a subprocess (``torch.onnx.export(dynamo=True)``) so its
memory comes back; validation runs in the same worker, reusing the loaded model.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, ExportValidationError, UserInputError
from ..artifact import ArtifactRecord, StageRecord
from ..spec import ModelSpec
from ..artifact import Precision
from .common import progress, run_worker, worker_main

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf caps one file at 2 GiB; stay well below


@dataclass(frozen=True)
class OnnxIOSpec:
    """The contract of an exported embedding graph (optimum-style export spec)."""

    inputs: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=lambda: {
        "input_ids": ("int64", ("batch", "sequence")),
        "attention_mask": ("int64", ("batch", "sequence")),
    })
    output_name: str = "sentence_embedding"
    output_dtype: str = "float32"

    def check(self, model_path: Path, dim: int | None = None) -> None:
        import onnx

        m = onnx.load(str(model_path), load_external_data=False)
        names = {1: "float32", 7: "int64", 10: "float16"}
        got_inputs = [i.name for i in m.graph.input]
        if got_inputs != list(self.inputs):
            raise ExportValidationError(f"exported inputs are {got_inputs}, expected {list(self.inputs)}")
        for inp in m.graph.input:
            dtype, axes = self.inputs[inp.name]
            t = inp.type.tensor_type
            if names.get(t.elem_type) != dtype:
                raise ExportValidationError(f"input {inp.name} has elem_type {t.elem_type}, expected {dtype}")
            dims = t.shape.dim
            if len(dims) != len(axes) or any(d.dim_value for d in dims):
                raise ExportValidationError(f"input {inp.name} must have dynamic axes {axes}, got {[d.dim_param or d.dim_value for d in dims]}")
        outs = [o.name for o in m.graph.output]
        if outs != [self.output_name]:
            raise ExportValidationError(f"exported outputs are {outs}, expected ['{self.output_name}']")
        t = m.graph.output[0].type.tensor_type
        if names.get(t.elem_type) != self.output_dtype:
            raise ExportValidationError(f"output has elem_type {t.elem_type}, expected {self.output_dtype}")
        if dim is not None and len(t.shape.dim) == 2 and t.shape.dim[1].dim_value not in (0, dim):
            raise ExportValidationError(f"output dim is {t.shape.dim[1].dim_value}, expected {dim}")


@dataclass(frozen=True)
class ExportConfig:
    precision: Precision = Precision.FP32
    opset: int = 18
    validate: bool = True
    low_memory: str = "auto"  # auto | on | off: build the graph on the meta device and stream weights in
    min_cosine: float | None = None  # default per precision: fp32 0.99999, fp16 0.9995

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(str(getattr(self.precision, "value", self.precision))))
        if self.precision is Precision.INT8:
            raise UserInputError("export writes fp32 or fp16 ONNX; int8 comes from `sfr-export calibrate` (or build --precision int8)")
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
# The wrapper traced into the graph
# ------------------------------------------------------------------------------------------------------------------
def make_wrapper(backbone: Any, spec: ModelSpec) -> Any:
    import torch

    from ..pooling import pool_and_normalize

    class EmbeddingWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool_and_normalize(hidden, attention_mask, spec.pooling, spec.normalize)

    return EmbeddingWrapper().eval()


def norms_to_fp32(model: Any) -> int:
    """Run every RMSNorm/LayerNorm in float32 inside an fp16 model (inputs upcast, outputs cast back)."""
    import torch

    count = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm")):
            mod.float()

            def pre(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
                _m._sfr_in_dtype = args[0].dtype
                return (args[0].float(), *args[1:])

            def post(_m: Any, _args: Any, out: Any) -> Any:
                return out.to(_m._sfr_in_dtype)

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
            count += 1
    return count


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


def compare_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    cand = cand / np.maximum(np.linalg.norm(cand, axis=1, keepdims=True), 1e-12)
    return (ref * cand).sum(axis=1)


def validate_onnx(onnx_path: Path, torch_runner: Any, tokenizer: Any, spec: ModelSpec, *, threshold: float,
                  sliding_window: int | None, session_config: dict[str, str] | None = None) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on one mixed-length batch, right- and left-padded."""
    from ..runtime.ort_runner import OrtRunner
    from ..tokenization import TextTokenizer

    texts = validation_texts(spec, sliding_window)
    results: dict[str, Any] = {"threshold": threshold, "texts": len(texts)}
    worst: tuple[float, str, str] = (2.0, "", "")
    with OrtRunner(onnx_path, session_config=session_config) as ort_runner:
        for side in ("right", "left"):
            tt = TextTokenizer(tokenizer, spec.replace(padding_side=side))
            seqs = tt.encode(texts).ids
            ids, mask = tt.pad(seqs)
            cos = compare_rows(torch_runner.infer(ids, mask), ort_runner.infer(ids, mask))
            results[f"{side}_padding"] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                                          "lengths": [len(s) for s in seqs]}
            i = int(cos.argmin())
            if cos[i] < worst[0]:
                worst = (float(cos[i]), texts[i], side)
    results["min_cosine"] = worst[0]
    if worst[0] < threshold or not np.isfinite(worst[0]):
        raise ExportValidationError(
            f"ONNX output disagrees with PyTorch: min cosine {worst[0]:.6f} < {threshold} "
            f"on input {worst[1][:60]!r}… ({worst[2]} padding)", worst_text=worst[1], min_cosine=worst[0])
    return results


# ------------------------------------------------------------------------------------------------------------------
# Worker (subprocess)
# ------------------------------------------------------------------------------------------------------------------
def _export_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..models import load_backbone, load_tokenizer
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
        backbone = None
    else:
        progress("loading weights")
        backbone = load_backbone(model_dir, dtype="float32")
        if cfg.precision is Precision.FP16:
            backbone = backbone.half()
            norms_to_fp32(backbone)
        wrapper = make_wrapper(backbone, spec)
        ids = torch.full((2, 8), 5, dtype=torch.long)
        mask = torch.ones_like(ids)
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("sequence")
        progress("tracing with torch.onnx.export(dynamo=True)")
        prog = torch.onnx.export(wrapper, (ids, mask), input_names=["input_ids", "attention_mask"],
                                 output_names=["sentence_embedding"], opset_version=cfg.opset,
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                                 dynamo=True, optimize=True, verbose=False)
        param_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        external = param_bytes > EXTERNAL_DATA_THRESHOLD
        progress("writing ONNX" + (" with external data" if external else ""))
        prog.save(str(onnx_path), external_data=external)
        del prog
        info = {"external_data": external}
    export_seconds = time.time() - t0
    OnnxIOSpec().check(onnx_path)
    result: dict[str, Any] = {"export_seconds": export_seconds, "low_memory": low_memory, **info}
    if cfg.validate:
        progress("validating against PyTorch (mixed lengths, left and right padding)")
        tok = load_tokenizer(model_dir)
        # fp32: the exported backbone is the reference; fp16: free it before loading the fp32 reference.
        reuse = backbone if cfg.precision is Precision.FP32 else None
        if reuse is None and not low_memory:
            del wrapper, backbone
            import gc

            gc.collect()
        ref = TorchRunner(model_dir, spec, dtype="float32", model=reuse)
        ref.activate()
        sliding = getattr(ref.model.config, "sliding_window", None)
        result["validation"] = validate_onnx(onnx_path, ref, tok, spec, threshold=cfg.threshold, sliding_window=sliding)
    return result


def onnx_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def run_export(root: Path, model: Any, config: ExportConfig, *, force: bool = False,
               on_progress: Any = None) -> StageRecord:
    """Export ``model`` (a ResolvedModel) into ``root/onnx/<precision>/`` and record it in the manifest."""
    from .common import prepare_output

    root = Path(root)
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
    arts = [ArtifactRecord.of(root, p, "onnx" if p.suffix == ".onnx" else "onnx-data") for p in onnx_files(final_dir)]
    rec = StageRecord(stage="export", name=name, config={**config.to_dict(), "variant": variant}, artifacts=arts,
                      figures=result)
    manifest.record(rec)
    return rec


if __name__ == "__main__":
    worker_main(_export_job)
