"""Fidelity verification on MTEB subsets: loaders, one evaluator per task type, comparator, reports, gate.

Entry points: ``sfr_export.stages.verify.run_verify`` (the stage) and ``sfr-export verify`` (the command);
``sfr_export.eval.mteb_adapter.MtebEncoder`` runs the real MTEB benchmark on any ``Embedder``.
"""

from .gate import DEFAULT_THRESHOLDS, ThresholdOverrides, Thresholds
from .suite import Suite, load_suite
from .tasks import TASK_TYPES, EvalDataError

__all__ = ["DEFAULT_THRESHOLDS", "TASK_TYPES", "EvalDataError", "Suite", "ThresholdOverrides", "Thresholds",
           "load_suite"]
