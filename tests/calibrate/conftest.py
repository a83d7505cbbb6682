"""Session fixtures of the calibrate area: one int8 build of demo:tiny-mistral through the CLI, an outlier model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import exported


@pytest.fixture(scope="session")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sfr-export build --model demo:tiny-mistral --precision int8 --output DIR` (export reused when up to date)."""
    from sfr_export.cli import main

    src = exported(tmp_path_factory, "demo:tiny-mistral", "fp32")
    root = tmp_path_factory.mktemp("cal") / "tiny-int8"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("fp16"))
    m = json.loads((root / "manifest.json").read_text())
    m["stages"] = {k: v for k, v in m["stages"].items() if k == "export:fp32"}
    (root / "manifest.json").write_text(json.dumps(m))
    try:
        main(["build", "--model", "demo:tiny-mistral", "--precision", "int8", "--output", str(root)])
    except SystemExit as exc:  # main() exits only on errors
        pytest.fail(f"sfr-export build --precision int8 exited with {exc.code}")
    return root


@pytest.fixture(scope="session")
def outlier_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo:tiny-mistral with a few RMSNorm weights scaled x50 (activation outlier channels, as in real decoders)."""
    from safetensors.torch import load_file, save_file

    from sfr_export.models.demo import materialize_demo

    src = materialize_demo("demo:tiny-mistral")
    d = tmp_path_factory.mktemp("outlier") / "tiny-mistral-outliers"
    shutil.copytree(src, d)
    sd = load_file(str(d / "model.safetensors"))
    for name in list(sd):
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            w = sd[name].clone()
            w[[3, 17, 40]] *= 50.0
            sd[name] = w
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["_sfr_export_known_as"] = "demo:tiny-mistral"  # same spec (prompts, EOS) as the demo
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="session")
def massive_mistral(outlier_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outlier model plus a massive first-token activation: the BOS embedding row scaled x300 (every text starts
    with BOS), as the first token of real decoders carries |x| in the thousands."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("massive") / "tiny-mistral-massive"
    shutil.copytree(outlier_mistral, d)
    sd = load_file(str(d / "model.safetensors"))
    bos = json.loads((d / "config.json").read_text())["bos_token_id"]
    emb = sd["embed_tokens.weight"].clone()
    emb[bos] *= 300.0
    sd["embed_tokens.weight"] = emb
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny GEMMs: one thread is as fast on an idle machine and far faster on a busy one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
