"""The one worker protocol: progress lines, results, and errors that come back as their own class with their fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfr_export.errors import ExportValidationError, WorkerError
from sfr_export.eval.tasks import EvalDataError
from sfr_export.worker import run_worker

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(HERE))


def test_result_and_progress(tmp_path: Path) -> None:
    seen: list[str] = []
    out = run_worker("worker_probe", {"raise": "", "value": 7}, log_path=tmp_path / "w.log", on_progress=seen.append)
    assert out["echo"] == 7 and out["worker_peak_rss_mb"] > 10 and seen == ["half way"]


def test_error_keeps_its_class_and_fields(tmp_path: Path) -> None:
    with pytest.raises(ExportValidationError) as info:
        run_worker("worker_probe", {"raise": "validation"}, log_path=tmp_path / "w.log")
    assert info.value.worst_text == "a long text" and info.value.min_cosine == 0.9
    assert str(info.value) == "min cosine 0.9 < 0.99999"


def test_error_of_another_module_keeps_its_class(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="bad.tsv:3"):
        run_worker("worker_probe", {"raise": "evaldata"}, log_path=tmp_path / "w.log")


def test_crash_names_the_log(tmp_path: Path) -> None:
    with pytest.raises(WorkerError, match="exited with code 9"):
        run_worker("worker_probe", {"raise": "crash"}, log_path=tmp_path / "w.log")
