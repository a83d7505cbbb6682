"""The fused last-token gather + L2 Triton kernel: interpreter vs the torch reference, AOT PTX, and CUDA use."""

from __future__ import annotations

import pytest

from kernels_subproc import run_python

TOL = {"float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6}  # same fp32 math on the same upcast inputs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_interpreter_matches_torch_reference(interpreter_results, dtype):
    r = interpreter_results[dtype]
    assert r["out_dtype"] == "torch.float32" and r["finite"]
    assert r["max_abs"] < TOL[dtype], r
    assert r["raw_max_abs"] < 1e-6, r  # normalize=False: the plain gather, upcast to fp32
    assert not r["noncontig_contiguous"] and r["noncontig_max_abs"] < TOL[dtype], r
    assert r["zero_row_norm"] == 0.0
    assert all(abs(n - 1.0) < 1e-5 for n in r["unit_norms"])


def test_interpreter_long_sequence_and_strided_mask(interpreter_results):
    assert interpreter_results["long_strided_mask_max_abs"] < 1e-6


AOT = r'''
import json
from sfr_export.kernels import compile_ptx
out = {}
for dtype in ("float16", "bfloat16", "float32"):
    r = compile_ptx(dtype, arch=90)
    ptx = r["ptx"]
    out[dtype] = {"name": r["name"], "sm90": ".target sm_90" in ptx, "entry": f".entry {r['name']}" in ptx,
                  "bytes": len(ptx)}
print("RESULT " + json.dumps(out))
'''


def test_aot_compile_to_ptx_for_sm90_without_gpu():
    res = run_python(AOT, interpret=False)
    for dtype, r in res.items():
        assert r["sm90"] and r["entry"], (dtype, r)
        assert r["name"] == "last_token_l2_kernel" and r["bytes"] > 1000


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    import torch

    from sfr_export.errors import UserInputError
    from sfr_export.kernels import last_token_l2

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserInputError, match="needs CUDA tensors"):
        last_token_l2(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.int64))
    with pytest.raises(UserInputError, match="must be"):
        last_token_l2(torch.zeros(2, 4), torch.ones(2, dtype=torch.int64))
    with pytest.raises(UserInputError, match="float32/float16/bfloat16"):
        last_token_l2(torch.zeros(1, 2, 4, dtype=torch.float64), torch.ones(1, 2, dtype=torch.int64))


def test_torch_runner_uses_the_kernel_only_on_cuda(tmp_path):
    from sfr_export.runtime.torch_runner import TorchRunner
    from sfr_export.spec import ModelSpec

    assert not TorchRunner(tmp_path, ModelSpec(), device="cpu")._fused_pooling()
    assert TorchRunner(tmp_path, ModelSpec(), device="cuda:0")._fused_pooling()
    assert not TorchRunner(tmp_path, ModelSpec(pooling="mean", append_eos=False), device="cuda:0")._fused_pooling()


@pytest.mark.gpu
def test_compiled_kernel_on_cuda_matches_torch():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    from sfr_export.kernels import last_token_l2
    from sfr_export.pooling import PoolingMode, pool_and_normalize

    mask = torch.ones(32, 512, dtype=torch.int64, device="cuda")
    mask[::3, 300:] = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        h = torch.randn(32, 512, 4096, device="cuda").to(dtype)
        diff = (last_token_l2(h, mask) - pool_and_normalize(h, mask, PoolingMode.LASTTOKEN, True)).abs().max()
        assert float(diff) < 1e-5
