"""The JSONL format (line-numbered errors, skip or stop), the config, and the builders over ../shared/data."""

from __future__ import annotations

import csv
import json

import pytest

from sfr_export.errors import TrainingError
from sfr_export.finetune.config import FinetuneConfig
from sfr_export.finetune.data import (Example, build_classification, build_sts, build_task, data_root, read_jsonl,
                                      retrieval_split, tasks_of, write_jsonl)

GOOD = {"task": "STSBenchmark", "type": "sts", "instruction": "Retrieve semantically similar text.",
        "query": "A man plays guitar.", "positive": "Someone plays a guitar.", "negatives": ["A cat sleeps."]}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    ex = [Example("T", "retrieval", "Find it", "q", "p", ("n1", "n2")), Example("T", "retrieval", "", "q2", "p2")]
    write_jsonl(tmp_path / "a.jsonl", ex)
    assert read_jsonl(tmp_path / "a.jsonl").examples == ex


@pytest.mark.parametrize("bad,match", [
    ("{not json", "malformed JSON"),
    (json.dumps({**GOOD, "type": "regression"}), "unknown task type 'regression'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "positive"}), "missing field"),
    (json.dumps({**GOOD, "query": "  "}), "'query' must be a non-empty string"),
    (json.dumps({**GOOD, "negatives": "one"}), "'negatives' must be a list"),
    (json.dumps({**GOOD, "extra": 1}), "unknown field"),
    (json.dumps({**GOOD, "type": "retrieval"}), "has type 'retrieval' here but 'sts' earlier"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_line_stops_with_its_number(tmp_path, bad, match):
    p = _write(tmp_path / "d.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(TrainingError, match=rf"d\.jsonl:3: .*{match}"):
        read_jsonl(p)


def test_bad_lines_skipped_with_their_numbers(tmp_path, caplog):
    p = _write(tmp_path / "d.jsonl", [json.dumps(GOOD), "{oops", json.dumps({**GOOD, "type": "x"}), json.dumps(GOOD)])
    loaded = read_jsonl(p, on_bad_line="skip")
    assert len(loaded.examples) == 2
    assert [n for n, _ in loaded.skipped] == [2, 3]
    assert "d.jsonl:2" in caplog.text and "d.jsonl:3" in caplog.text
    assert p.read_text().count("\n") == 4  # the input file is untouched


def test_all_lines_bad_or_missing_file(tmp_path):
    p = _write(tmp_path / "d.jsonl", ["{oops"])
    with pytest.raises(TrainingError, match="no valid training examples"):
        read_jsonl(p, on_bad_line="skip")
    with pytest.raises(TrainingError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TrainingError, match="on_bad_line"):
        read_jsonl(p, on_bad_line="ignore")


def test_tasks_of_refuses_mixed_types():
    with pytest.raises(TrainingError, match="mixes types"):
        tasks_of([Example("T", "sts", "", "a", "b"), Example("T", "retrieval", "", "a", "b")])


def test_sts_builder_keeps_gold_at_least_4_from_dev_only():
    root = data_root()
    ex = build_sts(root / "STSBenchmark")
    with open(root / "STSBenchmark" / "stsb-en-dev.csv", encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh)]
    assert len(ex) == sum(float(r[2]) >= 4 for r in rows) > 100
    assert all(e.type == "sts" and e.instruction == "Retrieve semantically similar text." for e in ex)
    test_sentences = set()
    with open(root / "STSBenchmark" / "stsb-en-test.csv", encoding="utf-8", newline="") as fh:
        test_sentences = {(r[0].strip(), r[1].strip()) for r in csv.reader(fh)}
    assert not {(e.query, e.positive) for e in ex} & test_sentences
    with pytest.raises(TrainingError, match="test split"):
        build_sts(root / "STSBenchmark", split="test")


def test_classification_builder_label_documents():
    root = data_root()
    ex = build_classification(root / "Banking77Classification", negatives=5, limit=300)
    assert len(ex) == 300
    for e in ex:
        assert "_" not in e.positive and len(e.negatives) == 5
        assert e.positive not in e.negatives
    with pytest.raises(TrainingError, match="test split"):
        build_classification(root / "Banking77Classification", split="test")


def test_retrieval_split_keeps_heldout_apart():
    folder = data_root() / "LegalSummarization"
    train = retrieval_split(folder, task="LegalSummarization", part="train")
    held = retrieval_split(folder, task="LegalSummarization", part="heldout")
    assert train.qrels and held.qrels
    assert not set(train.qrels) & set(held.qrels)
    held_docs = {d for rel in held.qrels.values() for d in rel}
    assert not {d for rel in train.qrels.values() for d in rel} & held_docs
    assert 0.2 < len(held.qrels) / (len(held.qrels) + len(train.qrels)) < 0.45
    ex, corpus = build_task("LegalSummarization")
    assert all(e.type == "retrieval" and not e.negatives for e in ex) and len(corpus) >= 400
    ex2, _ = build_task("ClusTREC-Covid", limit=20)
    assert len(ex2) == 20 and all(e.type == "clustering" and e.positive not in e.negatives for e in ex2)


def test_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SFR_EXPORT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(TrainingError, match="SFR_EXPORT_DATA_DIR"):
        data_root()
    monkeypatch.setenv("SFR_EXPORT_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path


def test_config_from_toml(tmp_path):
    p = tmp_path / "ft.toml"
    p.write_text('[model]\nbase = "demo:tiny-mistral"\n[data]\ntrain = "d.jsonl"\n[loss]\ntemperature = 0.05\n'
                 '[loss.in_batch]\nclassification = true\n[mining]\nrank_window = [5, 50]\n', encoding="utf-8")
    cfg = FinetuneConfig.from_toml(p)
    assert cfg.data.train == (tmp_path / "d.jsonl",)
    assert cfg.loss.temperature == 0.05 and cfg.loss.in_batch["classification"] is True
    assert cfg.loss.in_batch["clustering"] is False  # recipe default kept
    assert cfg.mining.rank_window == (5, 50) and cfg.lora.rank == 8 and cfg.train.learning_rate == 1e-5
    for body, match in [("[train]\nstepz = 3\n", "unknown key"), ("[train]\nsteps = 'many'\n", "must be an integer"),
                        ("[loss]\ntemperature = 0\n", "temperature"), ("[loss.in_batch]\nranking = true\n", "unknown task type"),
                        ("[mining]\nrank_window = [50, 5]\n", "rank_window"), ("[model\n", "not valid TOML")]:
        p.write_text(body, encoding="utf-8")
        with pytest.raises(TrainingError, match=match):
            FinetuneConfig.from_toml(p)


def test_builders_are_deterministic_across_processes():
    import subprocess
    import sys

    code = ("import hashlib; from sfr_export.finetune.data import build_task\n"
            "ex = []\n"
            "for t in ('LegalSummarization', 'TRECCOVID'):\n"
            "    ex += build_task(t, limit=12, seed=0)[0]\n"
            "print(hashlib.sha256(''.join(e.to_json() for e in ex).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
