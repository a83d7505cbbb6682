"""The TensorRT engine's on-disk format: optimization-profile shape ranges, the JSON sidecar that travels with
every plan, and the check that a plan can run on this TensorRT and GPU (pure Python; no TensorRT needed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EngineError, UserInputError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic axis of an optimization profile: min <= opt <= max, all >= 1."""

    min: int
    opt: int
    max: int
    name: str = "dim"

    def __post_init__(self) -> None:
        vals = (self.min, self.opt, self.max)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in vals):
            raise UserInputError(f"{self.name} profile values must be integers, got {vals}")
        if self.min < 1:
            raise UserInputError(f"{self.name} profile min must be >= 1, got {self.min}")
        if not self.min <= self.opt <= self.max:
            raise UserInputError(f"{self.name} profile must satisfy MIN <= OPT <= MAX, got {self.min},{self.opt},{self.max}")

    @classmethod
    def parse(cls, text: str, *, name: str) -> "ShapeRange":
        """``"1,8,32"`` -> ShapeRange(1, 8, 32); a single value ``"8"`` means a static axis (8,8,8)."""
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise UserInputError(f"--{name} takes MIN,OPT,MAX (e.g. 1,8,32), got {text!r}")
        try:
            lo, opt, hi = (int(p) for p in parts)
        except ValueError:
            raise UserInputError(f"--{name} takes integers MIN,OPT,MAX, got {text!r}") from None
        return cls(lo, opt, hi, name=name)

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


def default_batch() -> ShapeRange:
    return ShapeRange(1, 8, 32, name="batch")


def default_seq(max_length: int) -> ShapeRange:
    """Sequence profile from the model spec: up to ``max_length``, tuned for typical sentence lengths."""
    hi = int(max_length)
    return ShapeRange(1, min(128, hi), hi, name="seq")


@dataclass
class EngineSidecar:
    trt_version: str
    gpu_name: str
    compute_capability: str
    profiles: dict[str, list[list[int]]]
    precision: str
    source_onnx: str
    source_onnx_sha256: str
    build_seconds: float
    built_at: float
    version_compatible: bool = False
    lean_runtime_excluded: bool = False
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    output: str = OUTPUT_NAME
    sidecar_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> "EngineSidecar":
        if not Path(path).is_file():
            raise EngineError(f"engine sidecar {path} is missing: rebuild with `sfr-export engine`")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise EngineError(f"engine sidecar {path} is corrupt ({exc}): rebuild with `sfr-export engine`") from exc

    def batch_range(self) -> ShapeRange:
        lo, opt, hi = (s[0] for s in self.profiles[self.inputs[0]])
        return ShapeRange(lo, opt, hi, name="batch")

    def seq_range(self) -> ShapeRange:
        lo, opt, hi = (s[1] for s in self.profiles[self.inputs[0]])
        return ShapeRange(lo, opt, hi, name="seq")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_compatibility(sidecar: EngineSidecar, *, trt_version: str, gpu_name: str, compute_capability: str) -> list[str]:
    """Raise EngineError if this engine cannot run on this TensorRT / GPU; return non-fatal warnings.

    A plain engine runs only on the exact TensorRT version that built it. A version-compatible engine runs on the
    same major version at an equal or later release. Engines are tied to the GPU's compute capability; a different
    GPU model with the same compute capability runs, possibly slower (a warning).
    """
    rebuild = "rebuild it on this machine with `sfr-export engine DIR`"
    built, running = _version_tuple(sidecar.trt_version), _version_tuple(trt_version)
    if sidecar.version_compatible:
        if built[:1] != running[:1] or running < built:
            raise EngineError(f"engine was built (version-compatible) with TensorRT {sidecar.trt_version}; it needs "
                              f"TensorRT {built[0]}.x >= {sidecar.trt_version}, this is {trt_version}: {rebuild}")
    elif built != running:
        raise EngineError(f"engine was built with TensorRT {sidecar.trt_version}, this is TensorRT {trt_version}: {rebuild}")
    if sidecar.compute_capability != compute_capability:
        raise EngineError(f"engine was built for compute capability {sidecar.compute_capability} ({sidecar.gpu_name}), "
                          f"this GPU is {gpu_name} ({compute_capability}): {rebuild}")
    warnings = []
    if sidecar.gpu_name != gpu_name:
        warnings.append(f"engine was built on {sidecar.gpu_name}, running on {gpu_name} (same compute capability "
                        f"{compute_capability}): it runs, but tactics were timed on the other GPU")
    return warnings
