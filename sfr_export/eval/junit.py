"""JUnit XML: one ``<testsuite>`` per candidate, one ``<testcase>`` per task (plus one for the embedding-level
cosine thresholds), so CI systems show fidelity results natively. Skipped candidates give ``<skipped>`` cases
with the reason, never passes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any


def render_junit(report: dict[str, Any]) -> str:
    root = ET.Element("testsuites", name="sfr-export verify")
    tasks = [t["name"] for t in report["suite"]["tasks"]]
    total = failures = skipped = 0
    for c in report["candidates"]:
        suite = ET.SubElement(root, "testsuite", name=f"verify.{c['name']}")
        n = f = s = 0
        if c["status"] != "evaluated":
            for task in tasks + ["embedding-cosine"]:
                case = ET.SubElement(suite, "testcase", classname=f"verify.{c['name']}", name=task, time="0")
                ET.SubElement(case, "skipped", message=c["reason"])
                n += 1
                s += 1
        else:
            per_task = len(c["tasks"]) or 1
            for row in c["tasks"]:
                case = ET.SubElement(suite, "testcase", classname=f"verify.{c['name']}", name=row["task"],
                                     time=f"{c['seconds'] / per_task:.3f}")
                n += 1
                out = (f"{row['main_metric']}: reference {row['reference']:.4f}, candidate {row['candidate']:.4f}, "
                       f"delta {row['delta']:+.4f}; cosine mean {row['cosine']['mean']:.6f} p1 {row['cosine']['p1']:.6f}")
                if "top10_overlap" in row:
                    out += f"; top-10 overlap {row['top10_overlap']:.3f}"
                if not row["passed"]:
                    limit = c["thresholds"]["task_max_delta"].get(row["task"], c["thresholds"]["max_delta"])
                    ET.SubElement(case, "failure", message=f"|delta| {abs(row['delta']):.4f} > {limit} points",
                                  type="FidelityGate").text = out
                    f += 1
                ET.SubElement(case, "system-out").text = out
            case = ET.SubElement(suite, "testcase", classname=f"verify.{c['name']}", name="embedding-cosine", time="0")
            n += 1
            cos_fails = [x for x in c["failures"] if "cosine" in x]
            if cos_fails:
                ET.SubElement(case, "failure", message="; ".join(cos_fails), type="FidelityGate")
                f += 1
            ET.SubElement(case, "system-out").text = (f"mean {c['cosine']['mean']:.6f} p1 {c['cosine']['p1']:.6f} "
                                                      f"min {c['cosine']['min']:.6f} over {c['cosine']['n']} inputs")
        suite.set("tests", str(n))
        suite.set("failures", str(f))
        suite.set("skipped", str(s))
        suite.set("errors", "0")
        total, failures, skipped = total + n, failures + f, skipped + s
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("skipped", str(skipped))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
