"""LoRA training on demo:tiny-mistral: the loss goes down, checkpoints resume exactly and refuse another model's,
the adapter and the merged model agree, and the merged dir exports to a validated ONNX artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sfr_export.errors import TrainingError
from sfr_export.finetune.data import read_jsonl, tasks_of
from sfr_export.finetune.distributed import DistInfo
from sfr_export.finetune.step import EmbeddingModel, Tokenizers, collate, contrastive_step
from sfr_export.finetune.sampler import TaskBatchSampler
from sfr_export.finetune.train import train
from sfr_export.artifact import sha256_file
from sfr_export.models import load_backbone, load_tokenizer
from sfr_export.models.loading import resolve_model
from sfr_export.runtime.embedder import embedder_for_model


TEXTS = ["A man is playing a guitar.", "Refund not showing up on my statement",
         "Instruct: Retrieve semantically similar text.\nQuery: A child rides a horse."]


def _replayed_loss(model_dir, examples, cfg) -> float:
    """Mean InfoNCE over the batches the run trained on (the sampler replayed from its seed), no update."""
    resolved = resolve_model(str(model_dir), compute_fingerprint=False)
    model = EmbeddingModel(load_backbone(resolved.local_dir), resolved.spec)
    toks = Tokenizers.make(load_tokenizer(resolved.local_dir), resolved.spec, cfg.data.max_query_length,
                           cfg.data.max_doc_length)
    sampler = TaskBatchSampler(tasks_of(examples), cfg.sampler.batch_size, seed=cfg.sampler.seed)
    losses = []
    for _ in range(cfg.train.steps):
        s = sampler.next_batch()
        batch = collate(examples, s.indices, spec=resolved.spec, loss=cfg.loss, step=s.step, seed=cfg.sampler.seed)
        losses.append(contrastive_step(model, batch, toks, cfg.loss, DistInfo()).loss)
    return float(np.mean(losses))


def test_training_lowers_the_loss(tiny_run, mix_jsonl):
    cfg, res = tiny_run
    assert res.steps == 8 and len(res.losses) == 8 and all(np.isfinite(res.losses))
    examples = read_jsonl(mix_jsonl).examples
    base = resolve_model("demo:tiny-mistral", compute_fingerprint=False).local_dir
    before = _replayed_loss(base, examples, cfg)
    after = _replayed_loss(res.merged_dir, examples, cfg)
    assert after < before - 0.05, (before, after)
    assert res.examples_per_s > 0 and res.tokens_per_s > 0


def test_outputs_adapter_merged_and_record(tiny_run):
    peft = pytest.importorskip("peft")
    cfg, res = tiny_run
    base = resolve_model("demo:tiny-mistral")
    merged = resolve_model(str(res.merged_dir))
    assert merged.spec == base.spec  # pooling, EOS, prompts, max length preserved
    assert merged.spec.prompts and merged.spec.append_eos
    for f in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json", "tokenizer_config.json",
              "model.safetensors"):
        assert (res.merged_dir / f).is_file(), f
    assert json.loads((res.merged_dir / "tokenizer_config.json").read_text())["add_eos_token"] is True
    assert merged.fingerprint != base.fingerprint
    record = json.loads((res.output / "finetune.json").read_text())
    assert record["base"]["fingerprint"] == base.fingerprint and record["figures"]["steps"] == 8
    for rel, digest in record["files"].items():
        assert sha256_file(res.output / rel) == digest
    # the adapter on the base gives the merged model's embeddings
    with_adapter = peft.PeftModel.from_pretrained(load_backbone(base.local_dir), str(res.adapter_dir)).eval()
    a = embedder_for_model(base.local_dir, base.spec, model=with_adapter).encode(TEXTS)
    b = embedder_for_model(merged.local_dir, merged.spec).encode(TEXTS)
    assert np.allclose(a, b, atol=1e-5)
    c = embedder_for_model(base.local_dir, base.spec).encode(TEXTS)
    assert not np.allclose(a, c, atol=1e-3)  # training changed the model


def test_merged_model_exports_and_serves_as_teacher(tiny_run, tmp_path):
    from sfr_export.finetune.config import MiningConfig
    from sfr_export.finetune.data import Example
    from sfr_export.finetune.mining import load_teacher, mine_hard_negatives
    from sfr_export.stages.export import ExportConfig, run_export

    _cfg, res = tiny_run
    merged = resolve_model(str(res.merged_dir))
    rec = run_export(tmp_path / "art", merged, ExportConfig())
    assert rec.figures["validation"]["min_cosine"] >= 0.99999
    onnx_teacher = load_teacher(str(tmp_path / "art"), backend="onnxruntime")
    ref = embedder_for_model(merged.local_dir, merged.spec).encode(TEXTS)
    assert np.allclose(onnx_teacher.encode(TEXTS), ref, atol=1e-4)
    ex = [Example("T", "retrieval", "Find it", t, t + " indeed") for t in TEXTS]
    corpus = [f"document number {i} about {w}" for i, w in enumerate("abcdefghijklmnop")]
    mined, _ = mine_hard_negatives(ex, onnx_teacher, MiningConfig(rank_window=(0, 8), negatives=3,
                                                                  false_negative_ratio=1.5), corpora={"T": corpus})
    assert all(e.positive not in e.negatives and len(e.negatives) <= 3 for e in mined)


def test_resume_continues_exactly(mix_jsonl, tmp_path, make_tiny_config):
    cfg = make_tiny_config(mix_jsonl, tmp_path / "run", steps=4, save_every=2, gradient_checkpointing=False, merge=False)
    first = train(cfg)
    assert first.resumed_from is None
    # simulate a crash after the step-2 checkpoint: drop what came later
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "run" / "adapter")
    second = train(cfg)
    assert second.resumed_from == 2 and second.steps == 4
    assert second.losses == pytest.approx(first.losses[2:], rel=1e-4, abs=1e-5)


def test_resume_refuses_another_models_checkpoint(tiny_run, tmp_path, mix_jsonl, make_tiny_config):
    cfg, res = tiny_run
    other = tmp_path / "other-model"
    shutil.copytree(resolve_model("demo:tiny-mistral", compute_fingerprint=False).local_dir, other)
    conf = json.loads((other / "config.json").read_text())
    conf["rms_norm_eps"] = 2e-5  # another model: same shapes, different config -> different fingerprint
    (other / "config.json").write_text(json.dumps(conf))
    before = sorted(p.name for p in (res.output / "checkpoints").iterdir())
    bad = make_tiny_config(mix_jsonl, res.output)
    bad = type(bad).from_dict({**bad.to_dict(), "model": {"base": str(other)}})
    with pytest.raises(TrainingError, match="another model"):
        train(bad)
    assert sorted(p.name for p in (res.output / "checkpoints").iterdir()) == before  # nothing lost


def test_bad_inputs_fail_before_any_work(mix_jsonl, tmp_path, make_tiny_config):
    out = tmp_path / "never"
    too_big = make_tiny_config(mix_jsonl, out)
    too_big = type(too_big).from_dict({**too_big.to_dict(), "sampler": {"batch_size": 64}})
    with pytest.raises(TrainingError, match="larger than task"):
        train(too_big)
    unknown = type(too_big).from_dict({**too_big.to_dict(), "sampler": {"batch_size": 4, "weights": {"Nope": 1.0}}})
    with pytest.raises(TrainingError, match="unknown task"):
        train(unknown)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text(mix_jsonl.read_text().splitlines()[0] + "\n{broken\n")
    broken = type(too_big).from_dict({**too_big.to_dict(), "sampler": {"batch_size": 1},
                                      "data": {"train": [str(bad_lines)]}})
    with pytest.raises(TrainingError, match=r"bad\.jsonl:2: malformed JSON"):
        train(broken)
    assert not out.exists()
