#!/usr/bin/env python
"""The prepared GPU check (issue 5, item 6): one short run (< 5 minutes) on a CUDA machine such as an H200.

It measures, and writes as JSON to OUT_DIR/gpu_check.json:
1. torch CUDA reference fidelity: fp16 and bf16 embeddings against fp32 (cosine), on demo:tiny-mistral's shapes and
   on a full-width (4096-d, 32 heads, 8 KV heads, 14336 MLP) 2-layer Mistral with random weights;
2. the compiled Triton kernel (fused last-token gather + L2) against torch's pooling, fp32/fp16/bf16, and the time
   ratio of the two side by side;
3. tokens/s of the torch CUDA backend (TorchRunner, which uses the kernel on CUDA) at B32 x L512.

Every figure comes with a self-check (threshold) and the exit code is 1 if one fails. ``--dry-run`` runs the same
code paths on CPU with tiny shapes (the kernel under TRITON_INTERPRET=1) so the script itself is tested without a
GPU. No TensorRT is needed (the machine has none). Usage: ``scripts/gpu_check.sh OUT_DIR [--dry-run]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, sliding_window=32, rms_norm_eps=1e-5)
FULL_WIDTH = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, sliding_window=4096,
                  rms_norm_eps=1e-5)
# Dry run: the same code on CPU, "full width" scaled down so it runs in seconds.
FULL_WIDTH_DRY = dict(FULL_WIDTH, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)

THRESHOLDS = {"fp16_min_cos": 0.999, "bf16_min_cos": 0.99, "kernel_max_abs": 1e-5}


def _ensure_package() -> None:
    """Use the repo without installing it: load kernels/src as sfr_export.kernels, as setuptools maps it."""
    sys.path.insert(0, str(REPO))
    try:
        import sfr_export.kernels  # noqa: F401
    except ImportError:
        import importlib.util

        src = REPO / "kernels" / "src"
        spec = importlib.util.spec_from_file_location(
            "sfr_export.kernels", src / "__init__.py", submodule_search_locations=[str(src)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["sfr_export.kernels"] = module
        spec.loader.exec_module(module)


class Check:
    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir = out_dir
        self.t0 = time.time()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"checks": {}, "errors": {}}

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        left = self.budget_s - (time.time() - self.t0)
        if left < 20:
            self.data[name] = {"skipped": f"time budget: {left:.0f}s left of {self.budget_s:.0f}s"}
            return
        t = time.time()
        try:
            self.data[name] = fn()
            self.data[name]["seconds"] = round(time.time() - t, 2)
        except Exception as exc:  # a failing section is recorded and the others still run
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.data[name] = {"traceback": traceback.format_exc()[-3000:]}
        self.save()

    def expect(self, name: str, ok: bool, value: Any) -> None:
        self.data["checks"][name] = {"pass": bool(ok), "value": value}

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 2)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out_dir / "gpu_check.json")


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                           "cuda_available": torch.cuda.is_available(), "interpret": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    for mod in ("triton", "transformers", "onnx", "onnxruntime", "tensorrt"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            env[mod] = None
    return env


def make_model(cfg: dict[str, Any], device: str, seed: int = 0) -> Any:
    import torch
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(seed)
    config = MistralConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MistralModel(config)
    return model.float().eval()


def batch(vocab: int, b: int, seq: int, device: str, seed: int = 1) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.int64)
    for i in range(b):  # mixed lengths, right padding
        mask[i, max(2, seq - (i * seq) // max(b, 1)):] = 0
    return ids.to(device), mask.to(device)


def fidelity(cfg: dict[str, Any], device: str, b: int, seq: int) -> dict[str, Any]:
    """fp16/bf16 vs fp32 cosine of last-token + L2 embeddings of one random-weight model."""
    import torch

    from sfr_export.pooling import PoolingMode, pool_and_normalize

    model = make_model(cfg, device)
    ids, mask = batch(cfg["vocab_size"], b, seq, device)
    out: dict[str, Any] = {"shape": [b, seq], "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"]}
    with torch.inference_mode():
        ref = pool_and_normalize(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask,
                                 PoolingMode.LASTTOKEN, True)
        del model
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            m = make_model(cfg, device).to(dtype)  # same seed: the fp32 weights, rounded once to this dtype
            emb = pool_and_normalize(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask, PoolingMode.LASTTOKEN, True)
            cos = (emb * ref).sum(-1)
            out[name] = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
            del m
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def kernel_vs_torch(device: str, b: int, seq: int, d: int, reps: int) -> dict[str, Any]:
    import torch

    from sfr_export.kernels import last_token_l2
    from sfr_export.pooling import PoolingMode, pool_and_normalize

    mask = torch.ones(b, seq, dtype=torch.int64, device=device)
    mask[::3, seq // 2:] = 0
    mask[1, : seq // 4] = 0  # a left-padded row
    out: dict[str, Any] = {"shape": [b, seq, d]}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        h = torch.randn(b, seq, d, device=device).to(dtype)
        ref = pool_and_normalize(h, mask, PoolingMode.LASTTOKEN, True)
        got = last_token_l2(h, mask)
        r: dict[str, Any] = {"max_abs": float((got - ref).abs().max())}
        if device.startswith("cuda"):
            r["torch_ms"] = _time_cuda(lambda: pool_and_normalize(h, mask, PoolingMode.LASTTOKEN, True), reps)
            r["kernel_ms"] = _time_cuda(lambda: last_token_l2(h, mask), reps)
            r["speedup"] = r["torch_ms"] / max(r["kernel_ms"], 1e-9)
        out[name] = r
    return out


def _time_cuda(fn: Callable[[], Any], reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def throughput(cfg: dict[str, Any], device: str, dtype: str, b: int, seq: int, reps: int) -> dict[str, Any]:
    """tokens/s of TorchRunner.infer (H2D, forward, fused pooling on CUDA, D2H) at [b, seq]."""
    import numpy as np
    import torch

    from sfr_export.runtime.torch_runner import TorchRunner
    from sfr_export.spec import ModelSpec

    model = make_model(cfg, device).to(getattr(torch, dtype))
    runner = TorchRunner(REPO, ModelSpec(), dtype=dtype, device=device, model=model)
    runner.activate()
    ids, mask = batch(cfg["vocab_size"], b, seq, "cpu")
    mask[:] = 1  # full B x L tokens
    ids_np, mask_np = ids.numpy(), mask.numpy()
    for _ in range(2):
        runner.infer(ids_np, mask_np)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        emb = runner.infer(ids_np, mask_np)
    dt = (time.perf_counter() - t) / reps
    out = {"shape": [b, seq], "dtype": dtype, "hidden": cfg["hidden_size"], "seconds_per_batch": dt,
           "tokens_per_s": b * seq / dt, "fused_kernel": runner._fused_pooling(),
           "finite": bool(np.isfinite(emb).all()), "unit_norm": float(np.abs(np.linalg.norm(emb, axis=1) - 1).max())}
    runner.deactivate()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: tests the script")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting sections after this many seconds")
    args = ap.parse_args(argv)
    _ensure_package()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        print("--dry-run needs TRITON_INTERPRET=1 in the environment (scripts/gpu_check.sh sets it)", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    chk = Check(args.out_dir, args.budget_s)
    chk.data["mode"] = "dry-run (CPU, scaled shapes)" if dry else "gpu"
    chk.data["environment"] = environment(device)
    chk.save()
    full = FULL_WIDTH_DRY if dry else FULL_WIDTH
    fb, fs = (4, 24) if dry else (16, 256)
    chk.section("fidelity_tiny", lambda: fidelity(TINY, device, fb, fs))
    chk.section("fidelity_full_width_2layer", lambda: fidelity(full, device, fb, fs))
    kb, ks, kd = (3, 16, 96) if dry else (32, 512, 4096)
    chk.section("kernel", lambda: kernel_vs_torch(device, kb, ks, kd, reps=20))
    tb, ts = (2, 16) if dry else (32, 512)
    chk.section("throughput_tiny", lambda: throughput(TINY, device, "float32" if dry else "float16", tb, ts, reps=2 if dry else 10))
    chk.section("throughput_full_width_2layer", lambda: throughput(full, device, "float32" if dry else "float16", tb, ts, reps=2 if dry else 5))

    d = chk.data
    for sec in ("fidelity_tiny", "fidelity_full_width_2layer"):
        if "fp16" in d.get(sec, {}):
            chk.expect(f"{sec}.fp16", d[sec]["fp16"]["min_cos"] >= THRESHOLDS["fp16_min_cos"], d[sec]["fp16"]["min_cos"])
            chk.expect(f"{sec}.bf16", d[sec]["bf16"]["min_cos"] >= THRESHOLDS["bf16_min_cos"], d[sec]["bf16"]["min_cos"])
    for dt in ("fp32", "fp16", "bf16"):
        if dt in d.get("kernel", {}):
            chk.expect(f"kernel.{dt}", d["kernel"][dt]["max_abs"] <= THRESHOLDS["kernel_max_abs"], d["kernel"][dt]["max_abs"])
    for sec in ("throughput_tiny", "throughput_full_width_2layer"):
        if "tokens_per_s" in d.get(sec, {}):
            r = d[sec]
            chk.expect(f"{sec}.finite_unit_norm", r["finite"] and r["unit_norm"] < 1e-3, r["unit_norm"])
            chk.expect(f"{sec}.fused_kernel_used", r["fused_kernel"] == (not dry), r["fused_kernel"])
    chk.data["thresholds"] = THRESHOLDS
    ok = not d["errors"] and all(c["pass"] for c in d["checks"].values())
    chk.data["passed"] = ok
    chk.save()
    summary = {k: v for k, v in d["checks"].items()}
    print(json.dumps({"passed": ok, "elapsed_s": d["elapsed_s"], "errors": d["errors"], "checks": summary}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
