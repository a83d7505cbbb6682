"""Stage: fidelity verification. The reference (PyTorch) and each candidate (ONNX variants, TensorRT) embed the
same token ids on an MTEB-subset suite; reports (json/md/html, JUnit) are written and recorded in the manifest,
and the gate decides pass or fail (``FidelityGateError``: exit code 1, one line naming the worst task/candidate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FidelityGateError, PathError, SfrExportError, UserInputError
from ..eval.cache import ReferenceCache
from ..eval.compare import CompareSettings, check_settings, compare
from ..eval.gate import DEFAULT_THRESHOLDS, ThresholdOverrides, Thresholds, thresholds_from_table
from ..eval.junit import render_junit
from ..eval.report import build_report, render_markdown
from ..eval.report_html import render_html
from ..eval.suite import Suite, load_suite
from ..artifact import Artifact, ArtifactRecord, Manifest, StageRecord, atomic_dir, atomic_write_text, writer_lock

log = logging.getLogger(__name__)

REPORT_SUBDIR = Path("reports") / "verify"
BUILD_TIME_BUDGET_S = 300.0
VERIFY_CONFIG_ENV = "SFR_EXPORT_VERIFY_CONFIG"


@dataclass(frozen=True)
class VerifyConfig:
    suite: str = "quick"  # quick | full | path of a suite TOML
    data_dir: Path | None = None  # default: the package's data for quick, ../shared/data for full
    reference: str = "torch"  # torch | an ONNX variant
    candidates: tuple[str, ...] | None = None  # None: every ONNX variant (+ tensorrt when an engine is recorded)
    thresholds: dict[str, Thresholds] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    overrides: ThresholdOverrides = field(default_factory=ThresholdOverrides)
    report_dir: Path | None = None  # default: <artifact>/reports/verify
    junit: Path | None = None
    cache: bool = True
    cache_dir: Path | None = None
    time_budget_s: float | None = None
    batch_size: int = 32
    max_batch_tokens: int | None = 8192

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UserInputError(f"time budget must be > 0 seconds, got {self.time_budget_s}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.candidates is not None and not self.candidates:
            raise UserInputError("the candidate list is empty")

    @classmethod
    def for_build(cls) -> "VerifyConfig":
        """What ``sfr-export build`` runs: the quick suite, time-boxed, every variant the build produced.
        ``$SFR_EXPORT_VERIFY_CONFIG`` names a verify TOML (suite, thresholds, ...) to use instead, e.g. in CI."""
        env = os.environ.get(VERIFY_CONFIG_ENV)
        if env:
            cfg = cls.from_toml(Path(env))
            return cfg if cfg.time_budget_s is not None else dataclasses.replace(cfg, time_budget_s=BUILD_TIME_BUDGET_S)
        return cls(suite="quick", time_budget_s=BUILD_TIME_BUDGET_S)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> "VerifyConfig":
        """``[verify]`` keys (suite, data_dir, reference, candidates, junit, report_dir, cache, cache_dir,
        time_budget_s, batch_size, max_batch_tokens) and ``[thresholds.<fp32|fp16|int8>]`` tables; keyword
        ``overrides`` that are not None win over the file."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UserInputError(f"config file {path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise UserInputError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
        unknown_top = set(data) - {"verify", "thresholds"}
        if unknown_top:
            raise UserInputError(f"{path}: unknown tables {sorted(unknown_top)} (expected the tables verify and thresholds.<precision>)")
        section = dict(data.get("verify", {}))
        allowed = {f.name for f in dataclasses.fields(cls)} - {"thresholds", "overrides"}
        unknown = set(section) - allowed
        if unknown:
            raise UserInputError(f"{path}: unknown keys in table verify: {sorted(unknown)}")
        _check_toml_types(section, path)
        for key in ("data_dir", "report_dir", "junit", "cache_dir"):
            if key in section:
                section[key] = (path.parent / section[key]).resolve()
        if "candidates" in section:
            section["candidates"] = tuple(section["candidates"])
        section["thresholds"] = thresholds_from_table(data.get("thresholds", {}), str(path))
        section.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**section)

    def thresholds_for(self) -> dict[str, Thresholds]:
        return {p: self.overrides.apply(t) for p, t in self.thresholds.items()}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["thresholds"] = {p: t.to_dict() for p, t in self.thresholds_for().items()}
        d["overrides"] = dataclasses.asdict(self.overrides)
        return json.loads(json.dumps(d, default=str))


_STR, _PATH = ((str,), "a string"), ((str,), "a path string")
_TOML_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "suite": _STR, "reference": _STR, "data_dir": _PATH, "report_dir": _PATH, "junit": _PATH, "cache_dir": _PATH,
    "candidates": ((list,), "a list of strings"), "cache": ((bool,), "true or false"),
    "time_budget_s": ((int, float), "a number"), "batch_size": ((int,), "an integer"),
    "max_batch_tokens": ((int,), "an integer")}


def _check_toml_types(section: dict[str, Any], path: Path) -> None:
    """A wrong type in ``[verify]`` is named with its key (not a TypeError from deep inside)."""
    for key, value in section.items():
        want, what = _TOML_TYPES[key]
        bad = not isinstance(value, want) or (isinstance(value, bool) and bool not in want)
        if key == "candidates" and not bad:
            bad = not all(isinstance(c, str) for c in value)
        if bad:
            raise UserInputError(f"{path}: [verify] {key} must be {what}, got {value!r}")


@dataclass
class VerifyResult:
    record: StageRecord
    report: dict[str, Any]
    markdown: str
    paths: dict[str, Path]

    @property
    def passed(self) -> bool:
        return bool(self.report["gate"]["passed"])


def run_verify(root: Path, config: VerifyConfig = VerifyConfig(), *, raise_on_fail: bool = True,
               on_progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Compare, write the reports, record them in the manifest, then apply the gate.

    Holds the output dir's writer lock. A run that errors (anything but the gate's verdict) leaves the previous
    reports and ``verify:<suite>`` record as they were and records the failure beside them in the manifest; a bad
    argument or input (``UserInputError``, found before the comparison starts) writes nothing at all."""
    root = Path(root)
    suite = _preflight(root, config)
    with writer_lock(root):
        try:
            result = _verify(root, config, suite, on_progress)
        except (FidelityGateError, UserInputError):
            raise
        except (SfrExportError, OSError) as exc:
            _record_failure(root, f"verify:{_suite_label(config.suite)}", exc)
            raise
    if raise_on_fail and not result.passed:
        raise FidelityGateError(result.report["gate"]["reason"])
    return result


def _suite_label(suite: str) -> str:
    return Path(suite).stem if suite.endswith(".toml") else suite


def _record_failure(root: Path, name: str, exc: BaseException) -> None:
    reason = str(exc) if isinstance(exc, SfrExportError) else f"{type(exc).__name__}: {exc}"
    try:
        Manifest.load(root).record_failure(name, reason)
    except SfrExportError as rec_exc:  # e.g. a read-only dir: the original error is still the one to report
        log.warning("could not record the failure of %s in the manifest: %s", name, rec_exc)


def _check_writable(out_dir: Path) -> None:
    """Fail before any work when the reports cannot be written (not after minutes of comparing)."""
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise PathError(f"cannot write the reports: {probe} is not a directory")
    try:  # a real write says why it cannot be (read-only file system, permissions), where os.access only says no
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PathError(f"cannot write the reports in {probe}: {exc.strerror}") from None


def _write_reports(paths: dict[str, Path], texts: dict[str, str], *, own_dir: bool) -> None:
    """Everything is rendered before this. The JUnit file (when it lies elsewhere) goes first; then the report dir
    is swapped in whole when it is ours (DIR/reports/verify), so a failed write never leaves new reports beside the
    manifest's record of the old ones."""
    out_dir = paths["json"].parent
    inside = {k for k, p in paths.items() if p.parent.resolve() == out_dir.resolve()}
    for kind in sorted(set(paths) - inside):
        atomic_write_text(paths[kind], texts[kind])
    if not own_dir:
        for kind in sorted(inside):
            atomic_write_text(paths[kind], texts[kind])
        return
    with atomic_dir(out_dir) as tmp:
        for kind in inside:
            (tmp / paths[kind].name).write_text(texts[kind], encoding="utf-8")


def _settings(config: VerifyConfig) -> CompareSettings:
    return CompareSettings(reference=config.reference, candidates=config.candidates, batch_size=config.batch_size,
                           max_batch_tokens=config.max_batch_tokens, time_budget_s=config.time_budget_s)


def _out_dir(root: Path, config: VerifyConfig) -> Path:
    return Path(config.report_dir) if config.report_dir is not None else root / REPORT_SUBDIR


def _preflight(root: Path, config: VerifyConfig) -> Suite:
    """Every argument check that needs no lock, made before taking it: a bad argument is named as such (not as
    "another process is writing") and before any work. Not an output dir: refused before the lock would create
    anything in it."""
    Manifest.load(root)
    _check_writable(_out_dir(root, config))
    if config.junit is not None:
        _check_writable(Path(config.junit).parent)
    suite = load_suite(config.suite)
    check_settings(Artifact.open(root), _settings(config))
    return suite


def _verify(root: Path, config: VerifyConfig, suite: Suite,
            on_progress: Callable[[str], None] | None) -> VerifyResult:
    manifest = Manifest.load(root)
    manifest.verify_base()  # spec.json and the tokenizer files: a damaged one is named before any work
    out_dir = _out_dir(root, config)
    thresholds = config.thresholds_for()
    settings = _settings(config)
    cache = ReferenceCache(config.cache_dir, enabled=config.cache)
    cmp = compare(root, suite, settings, data_dir=config.data_dir, cache=cache, on_progress=on_progress)
    report = build_report(cmp, root=str(root), manifest_model=manifest.model, thresholds=thresholds)
    markdown = render_markdown(report)

    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    texts = {"json": json.dumps(report, indent=2) + "\n", "md": markdown, "html": render_html(report, markdown)}
    if config.junit is not None:
        paths["junit"] = Path(config.junit)
        texts["junit"] = render_junit(report)
    _write_reports(paths, texts, own_dir=config.report_dir is None)

    artifacts: list[ArtifactRecord] = []
    outside: dict[str, str] = {}
    for kind, p in paths.items():
        if p.resolve().is_relative_to(root.resolve()):
            artifacts.append(ArtifactRecord.of(root.resolve(), p.resolve(), f"report-{kind}"))
        else:
            outside[kind] = str(p)
    summary = {c["name"]: ({"status": "skipped", "reason": c["reason"]} if c["status"] != "evaluated" else
                           {"status": "pass" if c["passed"] else "fail", "mean_cosine": c["cosine"]["mean"],
                            "p1_cosine": c["cosine"]["p1"],
                            "max_abs_delta": max((abs(r["delta"]) for r in c["tasks"]), default=0.0)})
               for c in report["candidates"]}
    gate = report["gate"]
    rec = StageRecord(stage="verify", name=f"verify:{suite.name}", config=config.to_dict(), artifacts=artifacts,
                      figures={"gate": gate, "candidates": summary, "timing": report["timing"],
                               "reference_cache": report["reference"]["cache"], "reports_outside_dir": outside},
                      status="ok" if gate["passed"] else "failed-targets", reason=gate["reason"] or "")
    manifest = Manifest.load(root)  # re-read: other stages may have recorded meanwhile
    manifest.record(rec)
    log.info("verify: %s (reports in %s)", "pass" if gate["passed"] else gate["reason"], out_dir)
    return VerifyResult(rec, report, markdown, paths)
