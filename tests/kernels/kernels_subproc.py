"""Run Triton checks in a subprocess (the interpreter must be chosen before triton is first imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, *, interpret: bool, timeout: int = 300) -> dict:
    pytest.importorskip("triton", reason="triton is not installed (pip install 'sfr-export[kernels]')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert last, proc.stdout[-2000:]
    return json.loads(last[-1][7:])


INTERPRETER_CASES = r'''
import json, torch
from sfr_export.kernels import last_token_l2
from sfr_export.pooling import PoolingMode, pool_and_normalize

torch.manual_seed(0)
res = {}
B, S, D = 5, 9, 80  # D not a power of two: masked tail of the last block
mask = torch.ones(B, S, dtype=torch.int64)
mask[0, 4:] = 0                      # right padding
mask[1, :3] = 0                      # left padding
mask[2] = 0                          # all-zero mask row -> position 0, like argmax
mask[3, 1::2] = 0                    # holes: last attended position still wins
for dtype in ("float32", "float16", "bfloat16"):
    h = torch.randn(B, S, D).to(getattr(torch, dtype))
    h[4] = 0                         # an all-zero hidden row stays zero (no NaN)
    ref = pool_and_normalize(h, mask, PoolingMode.LASTTOKEN, True)
    out = last_token_l2(h, mask)
    raw = last_token_l2(h, mask, normalize=False)
    raw_ref = pool_and_normalize(h, mask, PoolingMode.LASTTOKEN, False)
    # non-contiguous input: a [B, D, S] buffer seen as [B, S, D]
    hn = h.transpose(1, 2).contiguous().transpose(1, 2)
    outn = last_token_l2(hn, mask)
    res[dtype] = {"max_abs": float((out - ref).abs().max()), "raw_max_abs": float((raw - raw_ref).abs().max()),
                  "noncontig_contiguous": bool(hn.is_contiguous()), "noncontig_max_abs": float((outn - ref).abs().max()),
                  "out_dtype": str(out.dtype), "finite": bool(torch.isfinite(out).all()),
                  "zero_row_norm": float(out[4].norm()), "unit_norms": [float(x) for x in out[:4].norm(dim=1)]}
# sliced (strided) mask and a long sequence over one BLOCK_S
h = torch.randn(2, 1500, 64)
m = torch.zeros(2, 3000, dtype=torch.int64)[:, ::2]
m[0, :1400] = 1
m[1, :7] = 1
ref = pool_and_normalize(h, m, PoolingMode.LASTTOKEN, True)
res["long_strided_mask_max_abs"] = float((last_token_l2(h, m) - ref).abs().max())
print("RESULT " + json.dumps(res))
'''
