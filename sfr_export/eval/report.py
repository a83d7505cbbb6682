"""``report.json`` (versioned, documented by ``REPORT_SCHEMA``) and ``report.md`` (short: a CI job summary or a
PR comment). The HTML report is in ``report_html.py``, the JUnit XML in ``junit.py``.

report.json, schema_version 1::

    schema           "sfr-export/verify-report"
    schema_version   1
    created          ISO-8601 UTC time
    artifact         {dir, model_id, fingerprint}
    suite            {name, data_dir, tasks: [{name, type, size, inputs, truncated}], dropped: [{task, reason}]}
    reference        {name, backend, variant, precision, seconds, inputs, anisotropy, cache: {enabled, dir, hits, misses}}
                     anisotropy: mean reference cosine between random different inputs (what "unrelated" scores)
    reference_scores {task: {main_metric, main, metrics}}            scores are points (x100)
    candidates       [{name, backend, variant, precision, status: evaluated|skipped, reason, seconds,
                       thresholds, passed, failures: [str],
                       cosine: {n, mean, p1, min, histogram: {edges, counts}, worst: [{cosine, task, side, text}]},
                       task_cosine: {task: {n, mean, p1, min}},
                       tasks: [{task, type, main_metric, reference, candidate, delta, cosine, top10_overlap?,
                                metrics: {reference, candidate}, passed}]}]
    gate             {passed, reason}
    timing           {tokenize_seconds, reference_seconds, total_seconds}
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .compare import Comparison
from .gate import Failure, Thresholds, check_candidate, gate_reason

SCHEMA_ID = "sfr-export/verify-report"
SCHEMA_VERSION = 1

_num = {"type": "number"}
_str = {"type": "string"}
_cos = {"type": "object", "required": ["n", "mean", "p1", "min"],
        "properties": {"n": {"type": "integer"}, "mean": _num, "p1": _num, "min": _num}}
_task_row = {
    "type": "object",
    "required": ["task", "type", "main_metric", "reference", "candidate", "delta", "cosine", "metrics", "passed"],
    "properties": {"task": _str, "type": {"enum": ["sts", "classification", "retrieval", "clustering",
                                                     "pair_classification"]},
                   "main_metric": _str, "reference": _num, "candidate": _num, "delta": _num, "cosine": _cos,
                   "top10_overlap": {"type": "number", "minimum": 0, "maximum": 1}, "passed": {"type": "boolean"},
                   "metrics": {"type": "object", "required": ["reference", "candidate"]}},
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://sfr-export/schemas/verify-report-v{SCHEMA_VERSION}.json",
    "type": "object",
    "required": ["schema", "schema_version", "created", "artifact", "suite", "reference", "reference_scores",
                 "candidates", "gate", "timing"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "schema_version": {"const": SCHEMA_VERSION},
        "created": _str,
        "artifact": {"type": "object", "required": ["dir", "model_id", "fingerprint"]},
        "suite": {"type": "object", "required": ["name", "data_dir", "tasks", "dropped"],
                  "properties": {"tasks": {"type": "array", "minItems": 1, "items": {
                      "type": "object", "required": ["name", "type", "size", "inputs"]}}}},
        "reference": {"type": "object", "required": ["name", "backend", "seconds", "cache", "anisotropy"]},
        "reference_scores": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["main_metric", "main", "metrics"]}},
        "candidates": {"type": "array", "items": {
            "type": "object", "required": ["name", "status", "reason", "precision"],
            "properties": {"status": {"enum": ["evaluated", "skipped"]}},
            "if": {"properties": {"status": {"const": "evaluated"}}},
            "then": {"required": ["cosine", "tasks", "thresholds", "passed", "failures", "seconds"],
                     "properties": {"cosine": {**_cos, "required": ["n", "mean", "p1", "min", "histogram", "worst"]},
                                    "tasks": {"type": "array", "items": _task_row}}},
        }},
        "gate": {"type": "object", "required": ["passed", "reason"],
                 "properties": {"passed": {"type": "boolean"}, "reason": {"type": ["string", "null"]}}},
        "timing": {"type": "object", "required": ["total_seconds"]},
    },
}


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``report`` follows ``REPORT_SCHEMA``."""
    from .._optional import require

    jsonschema = require("jsonschema", purpose="validating verify reports")
    jsonschema.validate(report, REPORT_SCHEMA)


def build_report(cmp: Comparison, *, root: str, manifest_model: dict[str, Any],
                 thresholds: dict[str, Thresholds]) -> dict[str, Any]:
    """The report dict, with the gate applied (``thresholds`` maps precision -> Thresholds)."""
    failures: list[Failure] = []
    skipped: list[tuple[str, str]] = []
    evaluated = 0
    candidates = []
    for c in cmp.candidates:
        c = dict(c)
        if c["status"] != "evaluated":
            skipped.append((c["name"], c["reason"]))
            candidates.append(c)
            continue
        evaluated += 1
        t = thresholds[c["precision"]]
        fails = check_candidate(c["name"], c["cosine"], c["task_cosine"], {r["task"]: r["delta"] for r in c["tasks"]}, t)
        failures += fails
        failed_tasks = {f.task for f in fails if f.what.startswith("|score")}
        c["tasks"] = [{**r, "passed": r["task"] not in failed_tasks} for r in c["tasks"]]
        c.update(thresholds=t.to_dict(), passed=not fails, failures=[f.line() for f in fails])
        candidates.append(c)
    reason = gate_reason(failures, evaluated, skipped)
    return {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"dir": root, "model_id": manifest_model.get("id"), "fingerprint": manifest_model.get("fingerprint")},
        "suite": {"name": cmp.suite.name, "data_dir": str(cmp.data_dir),
                  "tasks": [{"name": ti.entry.name, "type": ti.task.type, "size": ti.task.size, "inputs": len(ti.ids),
                             "truncated": ti.truncated} for ti in cmp.tasks],
                  "dropped": [{"task": t, "reason": r} for t, r in cmp.dropped]},
        "reference": cmp.reference,
        "reference_scores": {k: v.to_dict() for k, v in cmp.reference_scores.items()},
        "candidates": candidates,
        "gate": {"passed": reason is None, "reason": reason},
        "timing": cmp.timing,
    }


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def render_markdown(report: dict[str, Any]) -> str:
    g = report["gate"]
    ref = report["reference"]
    lines = [f"## sfr-export verify: {'PASS' if g['passed'] else 'FAIL'} — `{report['artifact']['model_id']}`, "
             f"suite `{report['suite']['name']}`", ""]
    if g["reason"]:
        lines += [f"> {g['reason']}", ""]
    cache = ref["cache"]
    lines += [f"Reference: **{ref['name']}** ({ref['backend']}), {ref['inputs']} inputs, {_f(ref['seconds'], 1)} s "
              f"(cache {cache['hits']} hit / {cache['misses']} miss). Total {_f(report['timing']['total_seconds'], 1)} s. "
              f"Anisotropy baseline (reference cosine of unrelated inputs): "
              f"{'n/a' if ref['anisotropy'] is None else _f(ref['anisotropy'], 3)}.",
              ""]
    lines += ["| candidate | status | mean cos | p1 cos | min cos | worst |Δ| (task) | seconds |",
              "|---|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        if c["status"] != "evaluated":
            lines.append(f"| {c['name']} | skipped: {c['reason']} | | | | | |")
            continue
        worst = max(c["tasks"], key=lambda r: abs(r["delta"]), default=None)
        wd = f"{_f(abs(worst['delta']))} ({worst['task']})" if worst else "-"
        status = "pass" if c["passed"] else "**FAIL**"
        cs = c["cosine"]
        lines.append(f"| {c['name']} | {status} | {_f(cs['mean'], 6)} | {_f(cs['p1'], 6)} | {_f(cs['min'], 6)} | {wd} | "
                     f"{_f(c['seconds'], 1)} |")
    evaluated = [c for c in report["candidates"] if c["status"] == "evaluated"]
    if evaluated:
        lines += ["", "| task | metric | reference | " + " | ".join(f"{c['name']} (Δ)" for c in evaluated) + " |",
                  "|---|---|---|" + "---|" * len(evaluated)]
        for name, rs in report["reference_scores"].items():
            cells = []
            for c in evaluated:
                row = next((r for r in c["tasks"] if r["task"] == name), None)
                if row is None:
                    cells.append("-")
                    continue
                extra = f", top10 {_f(100 * row['top10_overlap'], 0)}%" if "top10_overlap" in row else ""
                mark = "" if row["passed"] else " ✗"
                cells.append(f"{_f(row['candidate'])} ({row['delta']:+.2f}{extra}){mark}")
            lines.append(f"| {name} | {rs['main_metric']} | {_f(rs['main'])} | " + " | ".join(cells) + " |")
    for d in report["suite"]["dropped"]:
        lines.append(f"\n_{d['task']} not run: {d['reason']}_")
    worst_all = [(w, c["name"]) for c in evaluated for w in c["cosine"]["worst"][:1]]
    if worst_all:
        lines += ["", "Lowest-cosine input per candidate:"]
        for w, name in worst_all:
            text = w["text"].replace("\n", " ").replace("|", "\\|")[:100]
            lines.append(f"- {name}: {w['cosine']:.6f} on {w['task']} ({w['side']}): “{text}”")
    return "\n".join(lines) + "\n"
