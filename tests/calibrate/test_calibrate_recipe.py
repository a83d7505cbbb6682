"""Recipes, deterministic length-targeted sampling, and the leakage guard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sfr_export.errors import CalibrationError, UserInputError
from sfr_export.models import load_tokenizer
from sfr_export.models.demo import materialize_demo
from sfr_export.quant.leakage import check_no_leakage, hashes_from_data, protected_hashes, text_hashes
from sfr_export.quant.recipe import load_recipe, recipe_from_jsonl, sample_recipe
from sfr_export.spec import spec_from_model_dir
from sfr_export.tokenization import TextTokenizer


@pytest.fixture(scope="module")
def tok_spec():
    d = materialize_demo("demo:tiny-mistral")
    spec = spec_from_model_dir(d, "demo:tiny-mistral")
    return TextTokenizer(load_tokenizer(d), spec), spec


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_default_recipe_samples_deterministically_with_the_length_mix(tok_spec):
    tt, spec = tok_spec
    r = load_recipe("default")
    assert {t.type for t in r.tasks} == {"retrieval_query", "retrieval_passage", "sts", "classification", "clustering"}
    a = sample_recipe(r, tt, spec)
    b = sample_recipe(r, tt, spec)
    assert [c.text for c in a.calibration] == [c.text for c in b.calibration]
    assert len(a.calibration) == r.samples and len(a.holdout) == r.holdout
    assert not {c.raw for c in a.calibration} & {c.raw for c in a.holdout}  # held-out texts are disjoint
    c = sample_recipe(load_recipe("default", seed=7), tt, spec)
    assert [x.text for x in c.calibration] != [x.text for x in a.calibration]
    # queries carry their instruction, passages none
    q = [x for x in a.calibration if x.type == "retrieval_query"]
    p = [x for x in a.calibration if x.type == "retrieval_passage"]
    assert q and all(x.text.startswith("Instruct: Given a summary of a legal text") for x in q)
    assert p and not any(x.text.startswith("Instruct:") for x in p)
    # the target length distribution spans short queries to long passages
    toks = sorted(x.tokens for x in a.calibration)
    assert toks[len(toks) // 10] <= 24 and toks[-len(toks) // 10] > 64



def test_held_out_pairs_hold_no_drawn_text(tok_spec):
    """The gate's scored pairs are every shipped pair whose texts this build neither calibrated on nor held out: the
    more pairs, the lower the realized ΔSpearman's noise floor (1/sqrt(pairs))."""
    tt, spec = tok_spec
    r = load_recipe("default")
    shipped = [json.loads(line) for line in r.holdout_pairs.read_text(encoding="utf-8").splitlines()]
    for samples, holdout in ((None, None), (64, 24)):
        cs = sample_recipe(load_recipe("default", samples=samples, holdout=holdout), tt, spec)
        drawn = {c.raw for c in cs.calibration + cs.holdout}
        assert not {t for a, b, _ in cs.pairs for t in (a, b)} & drawn
        touching = [x for x in shipped if x["text1"] in drawn or x["text2"] in drawn]
        assert touching and len(cs.pairs) == len(shipped) - len(touching) >= 1300

def test_recipe_errors(tmp_path):
    data = _write(tmp_path / "d.jsonl", '{"text": "a passage about cells"}\n' * 4)
    with pytest.raises(UserInputError, match="unknown task type 'poetry'"):
        load_recipe(_write(tmp_path / "a.toml", f'[[tasks]]\ntype = "poetry"\ndata = "{data}"\n'))
    with pytest.raises(UserInputError, match="does not exist"):
        load_recipe(_write(tmp_path / "b.toml", '[[tasks]]\ntype = "sts"\ndata = "nope.jsonl"\n'))
    with pytest.raises(UserInputError, match="empty"):
        load_recipe(_write(tmp_path / "c.toml", 'name = "empty"\nsamples = 10\n'))
    with pytest.raises(UserInputError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_recipe(_write(tmp_path / "e.toml", "[[tasks]\n"))


def test_too_few_samples_for_the_method(tok_spec, tmp_path):
    tt, spec = tok_spec
    with pytest.raises(CalibrationError, match="method 'entropy' needs at least 64"):
        sample_recipe(load_recipe("default", samples=40), tt, spec, method="entropy")
    rows = "".join(json.dumps({"text": f"sentence number {i} about banking", "task": "sts"}) + "\n" for i in range(20))
    small = recipe_from_jsonl(_write(tmp_path / "small.jsonl", rows), samples=64, holdout=8)
    with pytest.raises(CalibrationError, match="yields only 12 calibration texts .* 'percentile' needs at least 32"):
        sample_recipe(small, tt, spec, method="percentile", protected=frozenset({"0" * 16}))
    assert len(sample_recipe(small, tt, spec, method="minmax", protected=frozenset({"0" * 16})).calibration) == 12


def test_user_jsonl_needs_known_task(tmp_path):
    with pytest.raises(UserInputError, match="unknown task 'poem'"):
        recipe_from_jsonl(_write(tmp_path / "u.jsonl", '{"text": "x y", "task": "poem"}\n'))


def test_leakage_guard_refuses_test_texts(data_dir, tok_spec, tmp_path):
    tt, spec = tok_spec
    with open(data_dir / "STSBenchmark" / "stsb-en-test.csv", newline="", encoding="utf-8") as f:
        test_sentence = next(csv.reader(f))[0]
    judged = (data_dir / "TRECCOVID" / "qrels" / "test.tsv").read_text().splitlines()[1].split("\t")[1]
    doc = next(json.loads(ln) for ln in (data_dir / "TRECCOVID" / "corpus.jsonl").read_text().splitlines()
               if json.loads(ln)["_id"] == judged)
    protected = protected_hashes(data_dir)
    # an exact STSB test sentence (case and spacing changed), a truncated judged TRECCOVID passage
    for leaked in (f"  {test_sentence.upper()} ", (doc["title"] + " " + doc["text"])[:400]):
        rows = [{"text": f"harmless banking question {i}", "task": "classification"} for i in range(40)]
        rows.insert(17, {"text": leaked, "task": "classification"})
        path = _write(tmp_path / "leak.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(CalibrationError, match="appear in a fidelity-test set"):
            sample_recipe(recipe_from_jsonl(path, samples=16, holdout=8), tt, spec, protected=protected)
    # dev-split STSB sentences and unjudged passages pass
    check_no_leakage([("x", "A man is slicing a tomato on a board with a knife, slowly.")], protected)


def test_shipped_hash_list_matches_the_data(data_dir):
    from sfr_export.quant.leakage import shipped_hashes_path

    shipped = {ln for ln in shipped_hashes_path().read_text().splitlines() if ln and not ln.startswith("#")}
    assert shipped == hashes_from_data(data_dir)
    assert len(text_hashes("x" * 500)) == 2  # long texts are also guarded by their prefix


def test_shipped_calibration_data_has_no_test_text(data_dir):
    from sfr_export.calibration import CALIBRATION_DIR

    protected = protected_hashes(data_dir)
    for f in sorted((CALIBRATION_DIR / "data").glob("*.jsonl")):
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        texts = [t for r in rows for t in ([r["text"]] if "text" in r else [r["text1"], r["text2"]])]
        check_no_leakage(((f.name, t) for t in texts), protected)
