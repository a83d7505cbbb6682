"""``manifest.json``: one record per output dir of what was built, how, and with which checksums.

Every stage appends a ``StageRecord``. Artifacts are written atomically (temp file, then rename) and their sha256
is recorded; ``verify_artifact`` checks it on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ChecksumMismatchError, UserInputError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success its files replace ``final``'s contents (dir renamed in)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for dist in ("sfr-export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                 "tokenizers", "safetensors", "tensorrt", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class ArtifactRecord:
    path: str  # relative to the output dir
    sha256: str
    bytes: int
    kind: str  # e.g. "onnx", "onnx-data", "engine", "report", "tokenizer"

    @classmethod
    def of(cls, root: Path, path: Path, kind: str) -> "ArtifactRecord":
        path = Path(path)
        return cls(path=str(path.relative_to(root)), sha256=sha256_file(path), bytes=path.stat().st_size, kind=kind)


@dataclass
class StageRecord:
    stage: str
    name: str  # unique key within the manifest, e.g. "export:fp32"
    config: dict[str, Any]
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | skipped | failed-targets
    reason: str = ""
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=library_versions)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["artifacts"] = [a.__dict__ for a in self.artifacts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageRecord":
        d = dict(d)
        d["artifacts"] = [ArtifactRecord(**a) for a in d.get("artifacts", [])]
        return cls(**d)


class Manifest:
    """The manifest of one output dir. Mutations are saved atomically with ``save()``."""

    def __init__(self, root: Path, data: dict[str, Any]):
        self.root = Path(root)
        self.data = data

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def path_of(cls, root: Path) -> Path:
        return Path(root) / MANIFEST_NAME

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = cls.path_of(root)
        if not Path(root).is_dir():
            raise ArtifactError(f"artifact dir {root} does not exist")
        if not path.is_file():
            raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not an sfr-export output dir (run `sfr-export export` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
            raise ArtifactError(f"{path} has an unsupported manifest_version {data.get('manifest_version')!r}")
        return cls(root, data)

    @classmethod
    def open_for_model(cls, root: Path, model: dict[str, Any]) -> "Manifest":
        """Open (or create) the manifest of ``root`` for ``model``; refuse a dir holding another model's artifacts."""
        root = Path(root)
        if cls.path_of(root).is_file():
            m = cls.load(root)
            have = m.data.get("model", {})
            if have.get("id") != model.get("id") or have.get("fingerprint") != model.get("fingerprint"):
                raise UserInputError(
                    f"output dir {root} holds artifacts of model '{have.get('id')}' "
                    f"(fingerprint {str(have.get('fingerprint'))[:12]}), not '{model.get('id')}': choose another --output"
                )
            return m
        if root.exists() and any(root.iterdir()):
            raise UserInputError(f"output dir {root} is not empty and has no {MANIFEST_NAME}: choose an empty or new dir")
        root.mkdir(parents=True, exist_ok=True)
        m = cls(root, {"manifest_version": MANIFEST_VERSION, "model": model, "spec": None, "stages": {}})
        m.save()
        return m

    # ---- access --------------------------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def stages(self) -> dict[str, StageRecord]:
        return {k: StageRecord.from_dict(v) for k, v in self.data.get("stages", {}).items()}

    def stage(self, name: str) -> StageRecord | None:
        raw = self.data.get("stages", {}).get(name)
        return StageRecord.from_dict(raw) if raw else None

    def set_spec(self, spec_dict: dict[str, Any]) -> None:
        self.data["spec"] = spec_dict

    def record(self, rec: StageRecord) -> None:
        self.data.setdefault("stages", {})[rec.name] = rec.to_dict()
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path_of(self.root), json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")

    # ---- verification --------------------------------------------------------------------------------------
    def artifact_path(self, stage_name: str, kind: str) -> Path:
        rec = self.stage(stage_name)
        if rec is None or rec.status == "skipped":
            raise ArtifactError(f"{self.root} has no '{stage_name}' artifact (stages: {', '.join(self.data.get('stages', {})) or 'none'})")
        for a in rec.artifacts:
            if a.kind == kind:
                return self.root / a.path
        raise ArtifactError(f"stage '{stage_name}' in {self.root} recorded no '{kind}' artifact")

    def verify_stage(self, stage_name: str) -> None:
        """Check every artifact of a stage exists with its recorded size and sha256."""
        rec = self.stage(stage_name)
        if rec is None:
            raise ArtifactError(f"{self.root} has no '{stage_name}' stage")
        for a in rec.artifacts:
            verify_artifact(self.root, a)


def verify_artifact(root: Path, a: ArtifactRecord) -> None:
    p = Path(root) / a.path
    if not p.is_file():
        raise ArtifactError(f"artifact {p} is missing")
    size = p.stat().st_size
    if size != a.bytes:
        raise ChecksumMismatchError(f"artifact {p} is {size} bytes, manifest says {a.bytes}: truncated or replaced; re-run the stage")
    digest = sha256_file(p)
    if digest != a.sha256:
        raise ChecksumMismatchError(f"artifact {p} sha256 {digest[:12]}… differs from manifest {a.sha256[:12]}…: corrupt or replaced; re-run the stage")
