"""``python -m sfr_export.bench.worker JOB.json``: one benchmark candidate in a fresh process."""

from ..worker import worker_main
from .core import bench_job

if __name__ == "__main__":
    worker_main(bench_job)
