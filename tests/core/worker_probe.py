"""A worker for tests/core/test_worker.py: raises the error its job names, or returns its job."""

from sfr_export.errors import ExportValidationError
from sfr_export.eval.tasks import EvalDataError
from sfr_export.worker import progress, worker_main


def job(j: dict) -> dict:
    progress("half way")
    if j["raise"] == "validation":
        raise ExportValidationError("min cosine 0.9 < 0.99999", worst_text="a long text", min_cosine=0.9)
    if j["raise"] == "evaldata":
        raise EvalDataError("bad.tsv:3: a score is missing")
    if j["raise"] == "crash":
        raise SystemExit(9)
    return {"echo": j["value"]}


if __name__ == "__main__":
    worker_main(job)
