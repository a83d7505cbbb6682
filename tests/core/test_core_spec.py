import json
import shutil

import pytest

from sfr_export.errors import ModelLoadError, UserInputError
from sfr_export.models import resolve_model
from sfr_export.pooling import PoolingMode
from sfr_export.spec import KNOWN_MODELS, ModelSpec, spec_from_model_dir, task_instructions


def test_sfr_like_local_dir_is_understood_without_flags(tmp_path):
    """A local dir laid out like the SFR hub repo: ST files, add_eos_token, prompts."""
    src = resolve_model("demo:tiny-mistral", compute_fingerprint=False).local_dir
    d = tmp_path / "sfr-like"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("_sfr_export_known_as", None)
    (d / "config.json").write_text(json.dumps(cfg))
    r = resolve_model(str(d))
    assert r.source == "local" and r.id == str(d)
    assert r.spec.pooling is PoolingMode.LASTTOKEN and r.spec.normalize
    assert r.spec.append_eos and r.spec.prepend_bos
    assert r.spec.max_length == 128
    assert r.spec.prompts["web_search_query"].startswith("Instruct: Given a web search query")
    assert len(r.fingerprint) == 64


def test_minilm_spec_from_sentence_transformers_files():
    r = resolve_model("demo:minilm", compute_fingerprint=False)
    assert r.spec.pooling is PoolingMode.MEAN and r.spec.normalize
    assert not r.spec.append_eos and r.spec.max_length == 256 and not r.spec.uses_instructions


def test_known_model_table_for_sfr():
    spec = KNOWN_MODELS["Salesforce/SFR-Embedding-Mistral"]
    assert spec.pooling is PoolingMode.LASTTOKEN and spec.append_eos and spec.max_length == 4096
    assert spec.format_query("q", "I") == "Instruct: I\nQuery: q"
    assert spec.format_document("d") == "d"


def test_spec_roundtrip_and_bad_values(tmp_path):
    spec = ModelSpec(pooling=PoolingMode.MEAN, max_length=64)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(UserInputError):
        ModelSpec.from_dict({"pooling": "mean", "bogus": 1})
    with pytest.raises(UserInputError):
        ModelSpec(padding_side="middle")
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UserInputError, match="no supported pooling"):
        spec_from_model_dir(tmp_path)


def test_instruction_table_covers_the_fidelity_tasks():
    tasks = task_instructions()
    for name in ("STSBenchmark", "Banking77Classification", "TRECCOVID", "LegalSummarization", "ClusTREC-Covid",
                 "TwitterURLCorpus", "BIOSSES"):
        assert name in tasks and tasks[name].instruction


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown demo model"):
        resolve_model("demo:nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither an existing local dir nor a hub id"):
        resolve_model("not-a-repo-id")
