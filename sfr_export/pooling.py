"""Pooling and L2 normalisation: the single source used by the ONNX export wrapper and the torch runner.

Pooling is configuration (as in sentence-transformers' ``Pooling``): a ``PoolingMode`` and a ``normalize`` flag.
Every function here is written with export-friendly ops (arange, argmax, gather) so the same code is traced into
the ONNX graph. All arithmetic runs in float32 whatever the hidden-state dtype.
"""

from __future__ import annotations

import torch

from .spec import PoolingMode


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row; right for left and right padding.

    argmax(mask * position): positions are distinct, so the largest attended one wins. A row with no attended
    token gives 0.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device, dtype=attention_mask.dtype)
    return (attention_mask * positions.unsqueeze(0)).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """[batch, seq, dim] hidden states -> [batch, dim] float32 sentence vectors."""
    hidden = hidden.float()
    if mode is PoolingMode.LASTTOKEN:
        idx = last_token_index(attention_mask)
        gather_idx = idx.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden, 1, gather_idx).squeeze(1)
    if mode is PoolingMode.MEAN:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if mode is PoolingMode.CLS:
        return hidden[:, 0]
    raise ValueError(f"unhandled pooling mode {mode!r}")


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation in float32; an all-zero row stays zero."""
    x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=eps)


def pool_and_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode, normalize: bool) -> torch.Tensor:
    out = pool(hidden, attention_mask, mode)
    return l2_normalize(out) if normalize else out
