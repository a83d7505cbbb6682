"""Side-by-side benchmark of every backend/variant an output dir holds (``sfr-export bench DIR``)."""

from .core import BenchConfig, BenchReport, label, parse_candidate, run_bench
from .report import markdown_table, plot, write_outputs

__all__ = ["BenchConfig", "BenchReport", "label", "markdown_table", "parse_candidate", "plot", "run_bench",
           "write_outputs"]
