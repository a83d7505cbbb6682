"""QuaRot's residual-stream fold for a pre-norm decoder (Llama / Mistral names), with its massive channels kept out.

The fold rotates the residual stream once by an orthogonal ``Q``: the embedding table becomes ``E Q``, every linear
that writes the stream (``o_proj``, ``down_proj``) ``Q^T W``, every linear that reads a norm's output
(``q/k/v_proj``, ``gate/up_proj``) ``W diag(g) Q``, and the final norm's normalized input is rotated back
(``x Q^T``, one MatMul per token) before its scale. RMSNorm divides by the row's RMS, which ``Q`` keeps, so the model
is unchanged in float; the readers then need no online rotation (``down_proj`` keeps one: nothing to fold into).

Why the textbook fold loses fidelity, and the remedy (real SmolLM2, fake quantization on STSB test pairs,
``benchmarks/probe_int8_fold.py``, docs/int8.md): the residual stream carries a few channels that are large on
every token (SmolLM2: channels 17 and 507 first). Before the fold the norm scale ``g`` shrinks them before the
quantizer; after it, ``Q`` spreads them into every channel of ``norm(x) Q``, so they set every token's int8 scale,
and ``g``, now in the weights, multiplies that noise. So ``Q`` is the identity on the ``keep`` channels and those
reach every reader in float (their activation and their weight rows; an LLM.int8()-style split of K of D channels),
and each norm keeps ``g`` on them. The other channels share one scale on the activation (their mean ``g``: a
constant commutes with ``Q``) and fold the ratio into the readers. Two channels recover the whole loss on SmolLM2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CalibrationError
from .qdq import GraphEdits, norm_mul_for, read_tensor

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITERS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ResidualFold:
    """Everything the fold changes in one graph; weights are changed one tensor at a time by :meth:`weight`."""

    q: np.ndarray  # [D, D] orthogonal (float64), the identity on ``keep``
    keep: tuple[int, ...]  # residual channels left out of Q: float at every reader
    reader_act: dict[str, str]  # reader linear -> the norm output it reads
    norm_g: dict[str, np.ndarray]  # norm output -> that norm's scale g (float64)
    embedding: str  # the token embedding table's initializer
    final_norm: tuple[str, int]  # the final norm's scale Mul node and the index of its normalized input

    def kept_scale(self, act: str) -> np.ndarray:
        """What the norm producing ``act`` keeps on the activation: g on ``keep``, the rest's mean elsewhere."""
        g = self.norm_g[act]
        rest = np.delete(g, list(self.keep))
        out = np.full_like(g, rest.mean() if rest.size else 1.0)
        out[list(self.keep)] = g[list(self.keep)]
        return out

    def weight(self, name: str, w: np.ndarray) -> np.ndarray:
        """Linear ``name``'s folded weight, ``w`` in torch's [out, in] layout."""
        if name in self.reader_act:
            act = self.reader_act[name]
            return (np.asarray(w, np.float64) * (self.norm_g[act] / self.kept_scale(act))) @ self.q
        if name.endswith(WRITERS):
            return self.q.T @ np.asarray(w, np.float64)
        return np.asarray(w)

    def norm_updates(self) -> dict[str, np.ndarray]:
        return {act: self.kept_scale(act) for act in self.norm_g}

    def float_channels(self) -> dict[str, tuple[int, ...]]:
        return {name: self.keep for name in self.reader_act} if self.keep else {}

    def graph_edits(self, embedding_table: Callable[[], np.ndarray]) -> GraphEdits:
        """The changes outside the linears: the norms' kept scales, ``E Q``, and ``x Q^T`` at the final norm."""
        return GraphEdits(norms=self.norm_updates(),
                          inits={self.embedding: lambda: np.asarray(embedding_table(), np.float64) @ self.q},
                          pre_matmul={self.final_norm[0]: (self.final_norm[1], self.q.T)})


def residual_rotation(dim: int, keep: tuple[int, ...], seed: int) -> np.ndarray:
    """A seeded random orthogonal ``Q`` [dim, dim] that is the identity on the channels ``keep``."""
    from .rotation import random_orthogonal

    rest = np.setdiff1d(np.arange(dim), keep)
    q = np.zeros((dim, dim))
    q[list(keep), list(keep)] = 1.0
    q[np.ix_(rest, rest)] = random_orthogonal(len(rest), np.random.default_rng(seed))
    return q


def plan_residual_fold(proto: Any, mapping: dict[str, Any], keep: tuple[int, ...], seed: int,
                       base_dir: Path) -> ResidualFold:
    """Find what the fold changes in ``proto`` (the fp32 export, weights not loaded); refuses a graph that is not a
    pre-norm decoder with Llama / Mistral linear names."""
    inits = {t.name: t for t in proto.graph.initializer}
    readers, writers = fold_linears(mapping)
    dim = int(inits[mapping[writers[0]].weight].dims[1])
    reader_act, norm_g, norm_nodes = {}, {}, set()
    for n in readers:
        act = mapping[n].activation
        found = norm_mul_for(proto, act, dim)
        if found is None:
            raise CalibrationError(f"{n} does not read an RMSNorm output: cannot fold the residual rotation")
        reader_act[n], norm_nodes = act, norm_nodes | {found[0].name}
        norm_g[act] = np.asarray(read_tensor(inits[found[0].input[found[1]]], base_dir), np.float64)
    return ResidualFold(q=residual_rotation(dim, keep, seed), keep=tuple(keep), reader_act=reader_act,
                        norm_g=norm_g, embedding=_embedding_table(proto, inits, dim),
                        final_norm=_final_norm(proto, inits, dim, norm_nodes))


def plan_for_graph(src: Path, mapping: dict[str, Any], keep: tuple[int, ...], seed: int) -> ResidualFold:
    """:func:`plan_residual_fold` of the fp32 graph file ``src`` (its weights stay on disk)."""
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    return plan_residual_fold(proto, mapping, keep, seed, Path(src).parent)


def fold_linears(mapping: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The linears that read the residual stream's norms and those that write it; refuses other architectures."""
    readers = [n for n in mapping if n.endswith(READERS)]
    writers = [n for n in mapping if n.endswith(WRITERS)]
    if not readers or not writers:
        raise CalibrationError("the residual fold needs a decoder with q/k/v/gate/up_proj and o/down_proj linears")
    return readers, writers


def _embedding_table(proto: Any, inits: dict[str, Any], dim: int) -> str:
    inputs = {i.name for i in proto.graph.input}
    found = [n.input[0] for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
             and n.input[1] in inputs and int(inits[n.input[0]].dims[-1]) == dim]
    if len(found) != 1:
        raise CalibrationError(f"the residual fold needs one token-embedding Gather, found {len(found)}")
    return found[0]


def _final_norm(proto: Any, inits: dict[str, Any], dim: int, reader_norms: set[str]) -> tuple[str, int]:
    """The one RMSNorm scale Mul (a [dim] initializer times a tensor) that feeds no reader: the final norm."""
    found = []
    for n in proto.graph.node:
        if n.op_type != "Mul" or n.name in reader_norms:
            continue
        k = [j for j, i in enumerate(n.input) if i in inits and tuple(int(d) for d in inits[i].dims) == (dim,)]
        if len(k) == 1 and len(n.input) == 2:
            found.append((n.name, 1 - k[0]))
    if len(found) != 1:
        raise CalibrationError(f"the residual fold needs one final RMSNorm scale, found {len(found)}")
    return found[0]


def massive_channels(model: Any, batches: list[Any], k: int) -> tuple[int, ...]:
    """The ``k`` residual channels with the largest typical magnitude: the median |x| over attended positions past
    the first, at each decoder layer's input, the max over layers (sorted channel numbers)."""
    import torch

    scores = torch.zeros(model.config.hidden_size)
    mask: dict[str, Any] = {}

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = (args[0] if args else kwargs["hidden_states"])[:, 1:]
        rows = x[mask["m"][:, 1:].bool()].float()
        if len(rows):
            scores.copy_(torch.maximum(scores, rows.abs().median(dim=0).values))

    layers = model.layers if hasattr(model, "layers") else model.model.layers
    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode():
            for b in batches:
                mask["m"] = torch.as_tensor(b.attention_mask)
                model(input_ids=torch.as_tensor(b.input_ids), attention_mask=mask["m"])
    finally:
        for h in handles:
            h.remove()
    return tuple(sorted(int(i) for i in torch.argsort(scores, descending=True)[:k]))
