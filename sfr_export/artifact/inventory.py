"""``Artifact``: one answer to "what is in this output dir and what can run it here".

The Embedder, verify and bench all ask it: which ONNX variants exist, which (backend, variant) candidates are
runnable on this machine and why not otherwise, and in which order ``auto`` prefers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._optional import available
from ..errors import ArtifactError
from ..spec import ModelSpec
from .enums import Backend, Precision, StageKind, Status, Variant
from .layout import SPEC_FILE
from .manifest import Manifest, StageRecord

# ``auto`` on CPU prefers fidelity (fp32 first); on a CUDA provider speed (fp16 first).
CPU_ORDER = (Variant.FP32, Variant.FP16, Variant.INT8_CPU, Variant.INT8)
CUDA_ORDER = (Variant.FP16, Variant.FP32, Variant.INT8)
# verify and bench list candidates in this order
LIST_ORDER = (Variant.FP32, Variant.FP16, Variant.INT8, Variant.INT8_CPU)
REFERENCE_PRECISION = {"float32": Precision.FP32, "bfloat16": Precision.FP16, "float16": Precision.FP16}


@dataclass(frozen=True)
class Candidate:
    """One way to run the artifact: a backend, the ONNX variant it reads (None for torch/TensorRT), a precision."""

    backend: Backend
    variant: Variant | None
    precision: Precision

    @property
    def name(self) -> str:
        """The name users type after ``--candidates``: torch, fp32, fp16, int8, int8-cpu, tensorrt."""
        return self.variant.value if self.variant else self.backend.value


def load_spec(root: Path) -> ModelSpec:
    p = Path(root) / SPEC_FILE
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {SPEC_FILE}: run `sfr-export export --force` to restore it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {p}: {exc}") from None
    try:
        return ModelSpec.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{p} is corrupt ({exc}): run `sfr-export export --force` to restore it") from None


class Artifact:
    """An output dir opened read-only: its manifest, spec and inventory."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.root = manifest.root

    @classmethod
    def open(cls, root: str | Path) -> "Artifact":
        return cls(Manifest.load(Path(root)))

    def spec(self) -> ModelSpec:
        return load_spec(self.root)

    def verify_base(self) -> None:
        self.manifest.verify_base()

    # ---- inventory ---------------------------------------------------------------------------------------
    def variants(self) -> dict[Variant, StageRecord]:
        """Every usable stage that wrote an ONNX model, by variant, in LIST_ORDER."""
        found: dict[Variant, StageRecord] = {}
        for rec in self.manifest.stages.values():
            if rec.variant is not None and rec.usable and rec.files("onnx"):
                found[rec.variant] = rec
        return {v: found[v] for v in LIST_ORDER if v in found}

    def engine(self) -> StageRecord | None:
        return self.manifest.stage(StageKind.ENGINE.value)

    def torch_model_dir(self) -> Path | None:
        local = self.manifest.model.get("local_dir")
        return Path(local) if local and Path(local).is_dir() else None

    def reference_precision(self) -> Precision:
        return REFERENCE_PRECISION.get(str(self.manifest.data.get("reference_dtype", "float32")), Precision.FP32)

    def engine_precision(self) -> Precision:
        rec = self.engine()
        return Precision.parse(rec.config.get("precision", "fp16")) if rec else Precision.FP16

    def tensorrt_unavailable(self) -> str | None:
        """Why a TensorRT engine cannot run here, or None when it can."""
        rec = self.engine()
        if rec is None:
            return "no TensorRT engine in the artifact (run `sfr-export engine` on a GPU machine)"
        if rec.status is not Status.OK:
            return f"the engine stage was {rec.status.value}: {rec.reason or 'no reason recorded'}"
        if not (available("tensorrt") or available("tensorrt_lean")):
            return "TensorRT is not installed (pip install 'sfr-export[gpu]')"
        return None

    def preferred_variant(self, *, cuda: bool) -> Variant:
        have = self.variants()
        if not have:
            raise ArtifactError(f"{self.root} has no ONNX model: run `sfr-export export` first")
        return next((v for v in (CUDA_ORDER if cuda else CPU_ORDER) if v in have), next(iter(have)))

    def candidates(self, *, runnable_only: bool = False) -> list[Candidate]:
        """torch (if the model dir is there), every ONNX variant, TensorRT (if an engine is recorded)."""
        out = []
        if self.torch_model_dir() is not None:
            out.append(Candidate(Backend.TORCH, None, self.reference_precision()))
        out += [Candidate(Backend.ONNXRUNTIME, v, v.precision) for v in self.variants()]
        if self.engine() is not None and not (runnable_only and self.tensorrt_unavailable()):
            out.append(Candidate(Backend.TENSORRT, None, self.engine_precision()))
        return out

    def resolve(self, name: str) -> Candidate | str:
        """The candidate called ``name`` (torch, tensorrt or a variant), or why it cannot run here."""
        if name == Backend.TORCH.value:
            if self.torch_model_dir() is None:
                return f"the torch model dir {self.manifest.model.get('local_dir')} is gone"
            return Candidate(Backend.TORCH, None, self.reference_precision())
        if name == Backend.TENSORRT.value:
            why = self.tensorrt_unavailable()
            return why if why else Candidate(Backend.TENSORRT, None, self.engine_precision())
        have = self.variants()
        for v in have:
            if v.value == name:
                return Candidate(Backend.ONNXRUNTIME, v, v.precision)
        return f"no '{name}' ONNX variant in the artifact (have: {', '.join(v.value for v in have) or 'none'})"

    def model_bytes(self, cand: Candidate) -> int:
        if cand.backend is Backend.TORCH:
            d = self.torch_model_dir()
            return sum(p.stat().st_size for p in d.glob("*.safetensors")) if d else 0
        rec = self.engine() if cand.backend is Backend.TENSORRT else self.variants().get(cand.variant)  # type: ignore[arg-type]
        kinds = ("engine",) if cand.backend is Backend.TENSORRT else ("onnx", "onnx-data")
        return sum(a.bytes for a in rec.artifacts if a.kind in kinds) if rec else 0
