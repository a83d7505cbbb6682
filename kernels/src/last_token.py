"""Fused last-token gather + L2 normalisation (Triton), with float32 accumulation.

One program per row: it finds the last attended position (``argmax(mask * position)``, the rule of
``sfr_export.pooling.last_token_index``: right for left and right padding, 0 for an all-zero mask), gathers that
hidden state (fp32, fp16 or bf16, any strides), accumulates the sum of squares in float32 and writes the
normalised float32 row. It replaces ``pool_and_normalize(hidden, mask, LASTTOKEN, normalize)`` in the torch
backend on CUDA: one launch instead of arange/mul/argmax/gather/norm/div, and no [batch, seq, dim] upcast.

On CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check it against the
torch reference; ``compile_ptx`` compiles it ahead of time for a CUDA target without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from sfr_export.errors import UserInputError

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """The jitted kernel. Triton decides at import time whether it interprets: TRITON_INTERPRET=1 must be set
    before triton is first imported in the process (the tests run the interpreter in a subprocess)."""
    import triton

    from ._last_token_triton import last_token_l2_kernel

    return triton.jit(last_token_l2_kernel)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def kernel_available(device: Any = None) -> bool:
    """Triton importable and (a CUDA device, or the interpreter requested with TRITON_INTERPRET=1)."""
    from sfr_export._optional import available

    if not available("triton"):
        return False
    if device is not None and str(device).startswith("cuda"):
        return True
    return interpreting()


def _blocks(S: int, D: int) -> tuple[int, int]:
    import triton

    return min(1024, triton.next_power_of_2(max(S, 1))), min(4096, triton.next_power_of_2(max(D, 1)))


def last_token_l2(hidden: Any, attention_mask: Any, *, normalize: bool = True, eps: float = 1e-12) -> Any:
    """[batch, seq, dim] hidden (fp32/fp16/bf16, any strides) + [batch, seq] mask -> float32 [batch, dim]."""
    import torch

    if hidden.ndim != 3 or attention_mask.ndim != 2 or tuple(hidden.shape[:2]) != tuple(attention_mask.shape):
        raise UserInputError(f"hidden {tuple(hidden.shape)} and mask {tuple(attention_mask.shape)} must be [B, S, D] and [B, S]")
    if str(hidden.dtype).removeprefix("torch.") not in _DTYPES:
        raise UserInputError(f"last_token_l2 supports float32/float16/bfloat16 hidden states, got {hidden.dtype}")
    if attention_mask.device != hidden.device:
        raise UserInputError(f"hidden is on {hidden.device} but the mask is on {attention_mask.device}")
    if hidden.device.type != "cuda" and not interpreting():
        raise UserInputError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)")
    B, S, D = hidden.shape
    out = torch.empty((B, D), dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out
    block_s, block_d = _blocks(S, D)
    _kernel()[(B,)](
        hidden, attention_mask, out, S, D,
        hidden.stride(0), hidden.stride(1), hidden.stride(2), attention_mask.stride(0), attention_mask.stride(1),
        out.stride(0), eps, NORMALIZE=bool(normalize), BLOCK_S=block_s, BLOCK_D=block_d)
    return out


def compile_ptx(dtype: str = "float16", *, arch: int = 90, mask_dtype: str = "int64", normalize: bool = True,
                block_s: int = 512, block_d: int = 4096) -> dict[str, str]:
    """Ahead-of-time compile for a CUDA target (no GPU needed). Returns {"ptx": ..., "name": ...}."""
    import triton
    from triton.backends.compiler import GPUTarget

    if dtype not in _DTYPES:
        raise UserInputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if interpreting():
        raise UserInputError("compile_ptx needs the compiler, not the interpreter: unset TRITON_INTERPRET")
    mt = {"int64": "i64", "int32": "i32"}[mask_dtype]
    sig = {"hidden_ptr": f"*{_DTYPES[dtype]}", "mask_ptr": f"*{mt}", "out_ptr": "*fp32", "S": "i32", "D": "i32",
           "stride_hb": "i64", "stride_hs": "i64", "stride_hd": "i64", "stride_mb": "i64", "stride_ms": "i64",
           "stride_ob": "i64", "eps": "fp32", "NORMALIZE": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
    src = triton.compiler.ASTSource(fn=_kernel(), signature=sig,
                                    constexprs={"NORMALIZE": normalize, "BLOCK_S": block_s, "BLOCK_D": block_d})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    return {"ptx": compiled.asm["ptx"], "name": compiled.name}
