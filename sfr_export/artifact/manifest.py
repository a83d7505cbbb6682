"""``manifest.json``: one record per output dir of what was built, how, and with which checksums.

Every stage appends a ``StageRecord`` under its name (``export:fp32``, ``calibrate:int8``, ``engine``,
``verify:quick``). The files that every stage depends on (``spec.json``, the tokenizer files) are recorded under
``base_files``. Every recorded file carries its size and sha256, checked on load. A failed run is recorded under
``failures`` beside the last good record of the same name, never over it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, ChecksumMismatchError, UserInputError
from .enums import StageKind, Status, Variant
from .io import atomic_write_text, sha256_file
from .layout import LOCK_FILE, MANIFEST_FILE

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 had no base_files/failures and kept the variant inside config


def config_digest(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for dist in ("sfr-export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                 "tokenizers", "safetensors", "tensorrt", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class ArtifactRecord:
    path: str  # relative to the output dir
    sha256: str
    bytes: int
    kind: str  # onnx, onnx-data, engine, sidecar, report, tokenizer, spec, session-config, ...

    @classmethod
    def of(cls, root: Path, path: Path, kind: str) -> "ArtifactRecord":
        path = Path(path)
        return cls(path=str(path.relative_to(root)), sha256=sha256_file(path), bytes=path.stat().st_size, kind=kind)

    def verify(self, root: Path) -> None:
        """Raise ArtifactError naming the file unless it exists with the recorded size and sha256."""
        p = Path(root) / self.path
        try:
            size = p.stat().st_size
            digest = sha256_file(p)
        except FileNotFoundError:
            raise ArtifactError(f"artifact file {p} is missing: re-run the stage that wrote it "
                                "(`sfr-export export --force` restores spec.json and tokenizer/)") from None
        except OSError as exc:
            raise ArtifactError(f"artifact file {p} cannot be read: {exc.strerror}") from None
        if size != self.bytes:
            raise ChecksumMismatchError(f"artifact file {p} is {size} bytes, the manifest says {self.bytes}: "
                                        "truncated or replaced; re-run the stage that wrote it")
        if digest != self.sha256:
            raise ChecksumMismatchError(f"artifact file {p} has sha256 {digest[:12]}…, the manifest says "
                                        f"{self.sha256[:12]}…: corrupt or edited; re-run the stage that wrote it")


@dataclass
class StageRecord:
    stage: StageKind
    name: str  # unique key within the manifest, e.g. "export:fp32"
    config: dict[str, Any]  # the stage config's to_dict(); its typed form is the stage's own Config.from_dict
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    status: Status = Status.OK
    reason: str = ""
    variant: Variant | None = None  # the ONNX variant this record wrote, if any
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=library_versions)
    config_sha256: str = ""  # of the config as recorded: the config (e.g. the ORT session config) is checked too

    def __post_init__(self) -> None:
        self.stage = StageKind.parse(self.stage)
        self.status = Status.parse(self.status)
        if self.variant is None and self.config.get("variant") in {v.value for v in Variant}:
            self.variant = self.config["variant"]  # stages that say it in their config only (and manifest v1)
        if self.variant is not None:
            self.variant = Variant.parse(self.variant)
        if not self.config_sha256:
            self.config_sha256 = config_digest(self.config)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage"], d["status"] = self.stage.value, self.status.value
        d["variant"] = self.variant.value if self.variant else None
        d["config_sha256"] = config_digest(self.config)  # as written: a later edit of the JSON is caught on load
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageRecord":
        d = dict(d)
        d["artifacts"] = [ArtifactRecord(**a) for a in d.get("artifacts", [])]
        if d.get("variant") is None and d.get("config", {}).get("variant") in {v.value for v in Variant}:
            d["variant"] = d["config"]["variant"]  # manifest version 1
        return cls(**d)

    def verify_config(self, manifest_path: Path) -> None:
        if self.config_sha256 != config_digest(self.config):
            raise ChecksumMismatchError(f"{manifest_path}: the recorded config of stage '{self.name}' was edited "
                                        "(its sha256 no longer matches); re-run the stage")

    def files(self, kind: str) -> list[ArtifactRecord]:
        return [a for a in self.artifacts if a.kind == kind]

    @property
    def usable(self) -> bool:
        return self.status is not Status.SKIPPED and self.status is not Status.FAILED


class Manifest:
    """The manifest of one output dir. Mutations are saved atomically with ``save()``."""

    def __init__(self, root: Path, data: dict[str, Any]):
        self.root = Path(root)
        self.data = data

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def path_of(cls, root: Path) -> Path:
        return Path(root) / MANIFEST_FILE

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = cls.path_of(root)
        if not Path(root).is_dir():
            raise ArtifactError(f"artifact dir {root} does not exist")
        if not path.is_file():
            raise ArtifactError(f"{root} has no {MANIFEST_FILE}: not an sfr-export output dir (run `sfr-export export` first)")
        return cls(root, _read_manifest(path))

    @classmethod
    def open_for_model(cls, root: Path, model: dict[str, Any]) -> "Manifest":
        """Open (or create) the manifest of ``root`` for ``model``; refuse a dir holding another model's artifacts.

        A manifest that records no usable stage (a first build that failed early) does not claim the dir."""
        root = Path(root)
        if cls.path_of(root).is_file():
            m = cls.load(root)
            have = m.data.get("model", {})
            same = have.get("id") == model.get("id") and have.get("fingerprint") == model.get("fingerprint")
            if same or not any(r.usable for r in m.stages.values()):
                m.data["model"] = model
                return m
            raise UserInputError(
                f"output dir {root} holds artifacts of model '{have.get('id')}' "
                f"(fingerprint {str(have.get('fingerprint'))[:12]}), not '{model.get('id')}': choose another --output")
        if root.exists() and not root.is_dir():
            raise UserInputError(f"--output {root} is a file, not a directory")
        if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
            raise UserInputError(f"output dir {root} is not empty and has no {MANIFEST_FILE}: choose an empty or new dir")
        root.mkdir(parents=True, exist_ok=True)
        m = cls(root, {"manifest_version": MANIFEST_VERSION, "model": model, "spec": None, "base_files": [],
                       "stages": {}, "failures": {}})
        m.save()
        return m

    # ---- access --------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.data["manifest_version"])

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def stages(self) -> dict[str, StageRecord]:
        return {k: StageRecord.from_dict(v) for k, v in self.data.get("stages", {}).items()}

    def stage(self, name: str) -> StageRecord | None:
        raw = self.data.get("stages", {}).get(name)
        return StageRecord.from_dict(raw) if raw else None

    @property
    def failures(self) -> dict[str, dict[str, Any]]:
        return dict(self.data.get("failures", {}))

    @property
    def base_files(self) -> list[ArtifactRecord]:
        return [ArtifactRecord(**a) for a in self.data.get("base_files", [])]

    def set_spec(self, spec_dict: dict[str, Any]) -> None:
        self.data["spec"] = spec_dict

    def set_base_files(self, records: list[ArtifactRecord]) -> None:
        self.data["base_files"] = [asdict(r) for r in records]
        self.data["manifest_version"] = MANIFEST_VERSION

    def record(self, rec: StageRecord) -> None:
        """Record a finished stage (ok, skipped or failed-targets); it clears an earlier failure of that name."""
        self.data.setdefault("stages", {})[rec.name] = rec.to_dict()
        self.data.setdefault("failures", {}).pop(rec.name, None)
        self.data["manifest_version"] = MANIFEST_VERSION
        self.save()

    def record_failure(self, name: str, reason: str) -> None:
        """Record that a run of ``name`` failed, beside (never over) its last good record."""
        self.data.setdefault("failures", {})[name] = {"reason": reason, "at": time.time()}
        self.save()

    def save(self) -> None:
        try:
            atomic_write_text(self.path_of(self.root), json.dumps(self.data, indent=2, default=str) + "\n")
        except OSError as exc:
            raise ArtifactError(f"cannot write {self.path_of(self.root)}: {exc.strerror}") from None

    # ---- verification --------------------------------------------------------------------------------------
    def artifact_path(self, stage_name: str, kind: str) -> Path:
        rec = self.stage(stage_name)
        if rec is None or not rec.usable:
            have = ", ".join(self.data.get("stages", {})) or "none"
            raise ArtifactError(f"{self.root} has no '{stage_name}' artifact (stages: {have})")
        for a in rec.artifacts:
            if a.kind == kind:
                return self.root / a.path
        raise ArtifactError(f"stage '{stage_name}' in {self.root} recorded no '{kind}' file")

    def verify_stage(self, stage_name: str) -> None:
        """Check every file of a stage exists with its recorded size and sha256."""
        rec = self.stage(stage_name)
        if rec is None:
            raise ArtifactError(f"{self.root} has no '{stage_name}' stage")
        rec.verify_config(self.path_of(self.root))
        for a in rec.artifacts:
            a.verify(self.root)

    def verify_base(self) -> None:
        """Check ``spec.json`` and the tokenizer files (manifest version 2; version 1 recorded none)."""
        for a in self.base_files:
            a.verify(self.root)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt ({type(exc).__name__}: {exc}); rebuild the output dir") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ArtifactError(f"{path} is not an sfr-export manifest (expected a JSON object with 'stages')")
    version = data.get("manifest_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has manifest_version {version!r}; this sfr-export reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild the output dir or upgrade sfr-export")
    return data
