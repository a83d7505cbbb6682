"""Online rotations of linear-layer inputs (QuaRot / SpinQuant idea): spread activation outliers over all channels.

For a linear ``y = x W^T`` and an orthogonal ``R``: ``y = (x R)(W R)^T``. The rotated input ``x R`` has its outlier
channels spread over every channel, so per-token (or per-tensor) int8 scales stop being set by a few channels, and
``W R`` is what gets quantized. In float nothing changes (checked by the caller at min cos >= 0.99999).

Where the rotation sits: right before each quantized linear, AFTER the RMSNorm scale (the norm scale stays on the
activation). Folding the norm scale into the weights and rotating the residual stream once costs 1-2 Spearman
points on real SmolLM2 (issue 15's probe): the norm scale suppresses the massive channels before they reach the
quantizer, and the fold moves that suppression behind it. The residual stream, the embedding table and the pooled
output are untouched, so no weight outside the linears changes and nothing has to be rotated back.

``R`` is a Kronecker product, cheap online: ``D = na * nb`` with ``nb`` a power of two (<= 64), ``x`` reshaped to
``[.., na, nb]``, times a random-sign Hadamard ``Hs`` [nb, nb], transposed, times a seeded random orthogonal ``A``
[na, na], flattened (channel order (j, i): a permutation, which is orthogonal too). That is
Reshape -> MatMul -> Transpose -> MatMul -> Reshape in ONNX (standard ops; TensorRT accepts them), about
``na + nb`` multiply-adds per element instead of ``D`` for a dense rotation. The weights get the same map applied
to their rows (``W R`` = rotate each row of W), one tensor at a time.

``Rotation.block_only()`` keeps the block-Hadamard factor alone (Reshape -> MatMul -> Reshape, ``nb`` multiply-adds
per element): the residual fold's ``down_proj`` uses it, where the orthogonal factor bought nothing on real SmolLM2
(400 STSB test pairs, torch probe: cos 0.99890 without it, 0.99888 with it; docs/int8.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_HADAMARD = 64


@dataclass(frozen=True)
class Rotation:
    """The orthogonal map ``x -> x R`` on the last axis of size ``dim = na * nb``."""

    dim: int
    a: np.ndarray  # [na, na] random orthogonal (float64)
    h: np.ndarray  # [nb, nb] Hadamard / sqrt(nb) with random row signs (float64)
    mix: bool = True  # False: the block-Hadamard factor alone (``a`` unused): blocks of nb channels, none mixed

    def block_only(self, nb: int | None = None) -> "Rotation":
        """The random-sign block-Hadamard factor alone: ``x -> x (I kron Hs)``, one MatMul online, in blocks of ``nb``
        channels (default: this rotation's ``nb``; a smaller power of two takes the leading block's signs)."""
        nb = self.nb if nb is None else nb
        if nb > self.nb or nb & (nb - 1) or self.dim % nb:
            raise ValueError(f"block-Hadamard of {nb} channels for a rotation of {self.dim} in blocks of {self.nb}")
        h = self.h if nb == self.nb else np.sign(np.diag(self.h @ hadamard(self.nb).T))[:nb, None] * hadamard(nb) / np.sqrt(nb)
        return Rotation(dim=self.dim, a=np.eye(self.dim // nb), h=h, mix=False)

    @property
    def na(self) -> int:
        return int(self.a.shape[0])

    @property
    def nb(self) -> int:
        return int(self.h.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x R`` in float64 (weights: rotate each row of a [out, in] weight)."""
        lead = x.shape[:-1]
        y = np.asarray(x, dtype=np.float64).reshape(-1, self.na, self.nb) @ self.h
        return (np.swapaxes(y, 1, 2) @ self.a if self.mix else y).reshape(*lead, self.dim)

    def apply_torch(self, x: Any) -> Any:
        """``x R`` for a torch tensor (in its dtype; the calibration model is fp32)."""
        import torch

        h = torch.from_numpy(self.h).to(x.dtype)
        a = torch.from_numpy(self.a).to(x.dtype)
        lead = x.shape[:-1]
        y = x.reshape(-1, self.na, self.nb) @ h
        return (y.transpose(1, 2) @ a if self.mix else y).reshape(*lead, self.dim)

    def matmul_macs_per_row(self) -> int:
        return self.dim * (self.na + self.nb if self.mix else self.nb)


def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order ``n`` (a power of two), unnormalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))  # Haar-distributed


def make_rotation(dim: int, seed: int = 0) -> Rotation:
    """The seeded Kronecker rotation for ``dim`` (same ``dim`` and seed: same matrix, so linears sharing an input
    share one online rotation)."""
    nb = 1
    while dim % (nb * 2) == 0 and nb * 2 <= MAX_HADAMARD:
        nb *= 2
    na = dim // nb
    rng = np.random.default_rng([seed, dim])
    signs = rng.choice([-1.0, 1.0], size=nb)
    h = signs[:, None] * hadamard(nb) / np.sqrt(nb)
    return Rotation(dim=dim, a=random_orthogonal(na, rng), h=h)


# ---------------------------------------------------------------------------------------------------------------
# torch side: the calibration model, rotated in place (float-equivalent)
# ---------------------------------------------------------------------------------------------------------------
def rotate_model(model: Any, names: list[str], seed: int = 0) -> dict[str, Rotation]:
    """Rotate the inputs of the linears ``names`` of ``model`` in place: ``W <- W R`` and a forward pre-hook
    ``x <- x R``. Returns linear name -> its rotation. The hooks stay for the model's life (it is a calibration
    copy); they run before any hook registered later, so observers and fake quantization see the rotated input."""
    import torch

    from .observe import linear_modules

    mods = linear_modules(model)
    rots: dict[str, Rotation] = {}
    cache: dict[int, Rotation] = {}
    for n in names:
        m = mods[n]
        dim = int(m.weight.shape[1])
        rot = cache.setdefault(dim, make_rotation(dim, seed))
        with torch.no_grad():
            w = rot.apply(m.weight.detach().double().numpy())
            m.weight.copy_(torch.from_numpy(w).to(m.weight.dtype))
        m.register_forward_pre_hook(_rotate_input(rot))
        rots[n] = rot
    return rots


def _rotate_input(rot: Rotation) -> Any:
    def fn(_mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (rot.apply_torch(args[0]), *args[1:])
    return fn


# ---------------------------------------------------------------------------------------------------------------
# ONNX side: the online rotation of one activation tensor
# ---------------------------------------------------------------------------------------------------------------
def onnx_rotation(act: str, rot: Rotation, prefix: str) -> tuple[list[Any], list[Any], str]:
    """Nodes and initializers computing ``act R`` (any rank, last axis ``rot.dim``); returns (nodes, inits, output)."""
    from onnx import helper, numpy_helper

    p = f"{prefix}_rot"
    if not rot.mix:  # [.., D] -> [-1, nb] blocks, times Hs, back: Reshape -> MatMul -> Reshape
        inits = [numpy_helper.from_array(np.array([-1, rot.nb], np.int64), f"{p}_blocks"),
                 numpy_helper.from_array(rot.h.astype(np.float32), f"{p}_h")]
        nodes = [helper.make_node("Shape", [act], [f"{p}_shape"], name=f"{p}_Shape"),
                 helper.make_node("Reshape", [act, f"{p}_blocks"], [f"{p}_x2"], name=f"{p}_Split"),
                 helper.make_node("MatMul", [f"{p}_x2", f"{p}_h"], [f"{p}_xh"], name=f"{p}_Hadamard"),
                 helper.make_node("Reshape", [f"{p}_xh", f"{p}_shape"], [f"{p}_out"], name=f"{p}_Merge")]
        return nodes, inits, f"{p}_out"
    inits = [numpy_helper.from_array(np.array([-1, rot.na, rot.nb], np.int64), f"{p}_split"),
             numpy_helper.from_array(rot.h.astype(np.float32), f"{p}_h"),
             numpy_helper.from_array(rot.a.astype(np.float32), f"{p}_a")]
    nodes = [helper.make_node("Shape", [act], [f"{p}_shape"], name=f"{p}_Shape"),
             helper.make_node("Reshape", [act, f"{p}_split"], [f"{p}_x3"], name=f"{p}_Split"),
             helper.make_node("MatMul", [f"{p}_x3", f"{p}_h"], [f"{p}_xh"], name=f"{p}_Hadamard"),
             helper.make_node("Transpose", [f"{p}_xh"], [f"{p}_xt"], name=f"{p}_Transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", [f"{p}_xt", f"{p}_a"], [f"{p}_xa"], name=f"{p}_Orth"),
             helper.make_node("Reshape", [f"{p}_xa", f"{p}_shape"], [f"{p}_out"], name=f"{p}_Merge")]
    return nodes, inits, f"{p}_out"
