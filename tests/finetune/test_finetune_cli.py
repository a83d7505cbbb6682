"""The commands: finetune-data -> mine (torch teacher) -> finetune, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from sfr_export.cli import main
from sfr_export.finetune.data import read_jsonl


def _cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_data_mine_finetune_commands(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    code, out, err = _cli(["finetune-data", "--tasks", "STSBenchmark,LegalSummarization", "--limit", "8",
                           "--output", str(data)], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["examples"] == 16 and summary["tasks"]["LegalSummarization"]["type"] == "retrieval"
    assert (tmp_path / "train.corpus" / "LegalSummarization.jsonl").is_file()  # picked up by `mine`
    mined = tmp_path / "mined.jsonl"
    mcfg = tmp_path / "mine.toml"
    mcfg.write_text("[mining]\nmax_length = 32\nbatch_size = 64\n", encoding="utf-8")
    code, out, err = _cli(["mine", "--input", str(data), "--output", str(mined), "--teacher", "demo:tiny-mistral",
                           "--config", str(mcfg), "--rank-window", "2:30", "--negatives", "2",
                           "--false-negative-ratio", "1.5"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["mined"] == {"STSBenchmark": 8, "LegalSummarization": 8}
    assert report["corpus_sizes"]["LegalSummarization"] >= 400
    examples = read_jsonl(mined).examples
    positives: dict[str, set[str]] = {}
    for e in examples:
        positives.setdefault(e.query, set()).add(e.positive)
    assert all(not set(e.negatives) & positives[e.query] and len(e.negatives) <= 2 for e in examples)
    assert sum(bool(e.negatives) for e in examples if e.task == "LegalSummarization") >= 6
    cfg = tmp_path / "ft.toml"
    cfg.write_text(f'[model]\nbase = "demo:tiny-mistral"\n[data]\ntrain = ["{mined.name}"]\nmax_doc_length = 32\n'
                   '[sampler]\nbatch_size = 4\n[loss]\nhard_negatives = 2\n'
                   '[train]\noutput = "run"\nsteps = 2\nlearning_rate = 1e-3\nwarmup_steps = 1\n'
                   'gradient_checkpointing = false\nmerge = false\n', encoding="utf-8")
    code, out, err = _cli(["finetune", "--config", str(cfg)], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["steps"] == 2 and res["merged"] is None
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("body,match", [
    ("[train]\nstepz = 1\n", "unknown key"),
    ('[data]\ntrain = ["missing.jsonl"]\n[model]\nbase = "demo:tiny-mistral"\n', "does not exist"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, body, match):
    cfg = tmp_path / "ft.toml"
    cfg.write_text(body, encoding="utf-8")
    code, out, err = _cli(["finetune", "--config", str(cfg)], capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_mine_rejects_bad_window_and_bad_lines(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"task": "T", "type": "retrieval", "instruction": "", "query": "q", "positive": "p"}\n{bad\n')
    code, _, err = _cli(["mine", "--input", str(data), "--output", str(tmp_path / "o.jsonl"), "--rank-window", "x"],
                        capsys)
    assert code == 2 and "START:END" in err
    code, _, err = _cli(["mine", "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
                         "--teacher", "demo:tiny-mistral"], capsys)
    assert code == 2 and "d.jsonl:2: malformed JSON" in err
    assert not (tmp_path / "o.jsonl").exists()
