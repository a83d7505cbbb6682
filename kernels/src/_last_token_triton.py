"""The Triton source of the fused last-token gather + L2 kernel (imported lazily: it imports triton).

The function is left undecorated; ``last_token._kernel`` wraps it with ``triton.jit`` for the GPU or for the
interpreter explicitly, so the choice does not depend on when this module was first imported.
"""

import triton.language as tl


def last_token_l2_kernel(hidden_ptr, mask_ptr, out_ptr, S, D,  # noqa: ANN001 (Triton kernel signature)
                          stride_hb, stride_hs, stride_hd, stride_mb, stride_ms, stride_ob, eps,
                          NORMALIZE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    # 1) last attended position: max over s of (mask[s] != 0) * s
    best = tl.zeros([BLOCK_S], dtype=tl.int64)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(mask_ptr + row * stride_mb + offs * stride_ms, mask=offs < S, other=0)
        best = tl.maximum(best, tl.where(m != 0, offs.to(tl.int64), 0))
    last = tl.max(best, axis=0)
    base = hidden_ptr + row * stride_hb + last * stride_hs
    # 2) sum of squares in float32
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
        acc += x * x
    if NORMALIZE:
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), eps)
    else:
        inv = 1.0
    # 3) scaled float32 output
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + offs_d * stride_hd, mask=offs_d < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_ob + offs_d, x * inv, mask=offs_d < D)
