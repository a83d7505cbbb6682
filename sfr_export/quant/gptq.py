"""Error-compensated int8 weight rounding (GPTQ, arXiv 2210.17323) with the per-output-channel scales the int8 forms
already use.

Round-to-nearest rounds every weight on its own. GPTQ rounds a weight's inputs one at a time and spreads each
input's rounding error over the inputs not yet rounded, weighted by the inverse of ``H = sum x x^T`` (the
second moment of the linear's input on calibration texts), so that ``W x`` moves as little as it can on those
inputs. The scales stay those of round-to-nearest (``max |W_row| / 127``): only the integers change, so the graph,
its ops and its speed do not.

Why it matters here (docs/int8.md, "Weight rounding"): on real SmolLM2's folded form most of the error left is the
weights', not the activations'. This module holds the numerics only; :func:`input_moments` gathers ``H`` in the
basis the graph's MatMuls see, and the writers call :func:`gptq_int8` one weight at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CalibrationError
from .observe import QMAX, weight_scales

DAMP = 0.01  # the fraction of H's mean diagonal added to it (GPTQ's default): keeps the Cholesky factor stable
BLOCK = 32  # input rows rounded together before the rest of the weight is updated (the result does not depend on it)


def gptq_int8(w_kn: np.ndarray, h: np.ndarray, skip: tuple[int, ...] = (),
              factor: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(q [K, N] int8, scale [N])`` for a ``[K, N]`` weight (ONNX MatMul layout) read by inputs with second moment
    ``h`` [K, K]; the rows ``skip`` (inputs that stay float) are neither rounded nor compensated into (q is 0 there).

    Input rows are taken in order of decreasing ``h`` diagonal (GPTQ's act order) and the result is put back in place.
    ``factor``: :func:`inverse_factor` of ``h`` and ``skip``, when the caller already has it.
    """
    w = np.array(w_kn, dtype=np.float64)  # [K, N]: one input row at a time, contiguous
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"input moment {h.shape} does not match a weight with {k} inputs")
    w[list(skip)] = 0.0
    s = weight_scales(w, axis=1).astype(np.float64)
    u, order = factor if factor is not None else inverse_factor(h, skip)
    w = w[order]
    q = np.empty_like(w)
    for i0 in range(0, k, BLOCK):
        i1 = min(i0 + BLOCK, k)
        err = np.empty((i1 - i0, w.shape[1]))
        for i in range(i0, i1):
            q[i] = np.clip(np.rint(w[i] / s), -QMAX, QMAX)
            err[i - i0] = (w[i] - q[i] * s) / u[i, i]
            w[i + 1:i1] -= np.outer(u[i, i + 1:i1], err[i - i0])
        w[i1:] -= u[i0:i1, i1:].T @ err
    out = np.empty_like(q)
    out[order] = q
    return out.astype(np.int8), s.astype(np.float32)


def inverse_factor(h: np.ndarray, skip: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The upper Cholesky factor of ``H^-1`` (damped, act-ordered; the rows ``skip`` and dead inputs made inert), and
    that order: what :func:`gptq_int8` needs of ``h``, shared by the weights that read one input (q/k/v, gate/up)."""
    import torch

    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    dead[list(skip)] = True
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h)))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(torch.from_numpy(h)))
    return torch.linalg.cholesky(hinv, upper=True).numpy(), order


def output_error(w_kn: np.ndarray, q: np.ndarray, s: np.ndarray, h: np.ndarray) -> float:
    """``trace((W - Wq)^T H (W - Wq))``: the summed squared output error of int8 weights on the inputs behind ``h``."""
    d = np.asarray(w_kn, np.float64) - q.astype(np.float64) * s.astype(np.float64)[None, :]
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


class MomentStore:
    """Second moments ``H = sum x x^T`` of MatMul inputs, one float32 ``.npy`` per input tensor under ``root`` (a 7B's
    would not fit in memory at once), looked up by torch linear name; the writers load one at a time."""

    def __init__(self, files: dict[str, Path], tokens: int) -> None:
        self._files, self.tokens = files, tokens

    def get(self, linear: str) -> np.ndarray | None:
        path = self._files.get(linear)
        return None if path is None else np.load(path)

    def __len__(self) -> int:
        return len(self._files)


def input_moments(model_path: Path, inputs: dict[str, tuple[str, int]], batches: list[Any],
                  session_config: dict[str, str], root: Path, budget_bytes: int = 2 << 30) -> MomentStore:
    """The second moment of each linear's MatMul input in the float graph ``model_path`` (``inputs``: torch linear
    name -> (input tensor, its width K)), summed over the attended positions of ``batches``, written under ``root``.

    The graph is run with those tensors as extra outputs (a sibling file sharing its external data). Tensors are
    taken a group at a time, each group's float64 sums within ``budget_bytes``, one pass over the batches per group.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    width = {t: k for t, k in inputs.values()}
    proto = onnx.load(str(model_path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in width if t not in have)
    probe = model_path.with_name(model_path.stem + ".moments.onnx")
    onnx.save(proto, str(probe))
    del proto
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    tokens = 0
    try:
        opts = ort.SessionOptions()
        for key, value in session_config.items():
            opts.add_session_config_entry(key, value)
        sess = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
        feeds_of = _feeds(sess)
        for group in _groups(width, budget_bytes):
            sums = {t: np.zeros((width[t], width[t])) for t in group}
            tokens = 0
            for b in batches:
                feeds, keep = feeds_of(b)
                tokens += int(keep.sum())
                for t, x in zip(group, sess.run(group, feeds)):
                    rows = np.asarray(x, np.float32)[keep]
                    sums[t] += rows.T @ rows  # a batch's product in float32, the sum over batches in float64
            _save(sums, files, root)
            del sums
    finally:
        probe.unlink(missing_ok=True)
    return MomentStore({n: files[t] for n, (t, _k) in inputs.items()}, tokens)


def _feeds(sess: Any) -> Callable[[Any], tuple[dict[str, np.ndarray], np.ndarray]]:
    """A batch's feeds for ``sess`` and the mask that goes with them (re-padded as the graph records it)."""
    from ..tokenization import right_align

    names = [i.name for i in sess.get_inputs()]
    if names != ["input_ids", "attention_mask"]:
        raise CalibrationError(f"cannot feed a graph with inputs {names} for the weight rounding's moments")
    right = sess.get_modelmeta().custom_metadata_map.get("sfr_export.padding_side") == "right"

    def feeds(b: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids, mask = right_align(b.input_ids, b.attention_mask) if right else (b.input_ids, b.attention_mask)
        return {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64)}, np.asarray(mask) != 0
    return feeds


def _save(sums: dict[str, np.ndarray], files: dict[str, Path], root: Path) -> None:
    """Each finished sum as one float32 ``.npy`` under ``root``, numbered in order, recorded in ``files``."""
    for key, h in sums.items():
        files[key] = root / f"h{len(files):05d}.npy"
        np.save(files[key], np.asarray(h, np.float32))


def _groups(width: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """The tensors in groups whose float64 K x K sums stay within ``budget_bytes`` (one tensor at least per group)."""
    out: list[list[str]] = [[]]
    used = 0
    for t, k in width.items():
        size = k * k * 8
        if out[-1] and used + size > budget_bytes:
            out.append([])
            used = 0
        out[-1].append(t)
        used += size
    return out


def torch_moments(model: Any, names: list[str], batches: list[Any], root: Path,
                  budget_bytes: int = 2 << 30) -> MomentStore:
    """:func:`input_moments` for a torch model: the input of each ``nn.Linear`` in ``names`` as its forward sees it
    (after any input hook already registered, such as an online rotation), on the attended rows of ``batches``."""
    import torch

    from .observe import linear_modules

    mods = linear_modules(model)
    width = {n: int(mods[n].weight.shape[1]) for n in names}
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    tokens = 0
    for group in _groups(width, budget_bytes):
        sums = {n: torch.zeros(width[n], width[n], dtype=torch.float64) for n in group}
        keep: dict[str, Any] = {}

        def grab(name: str) -> Callable[..., None]:
            def hook(_m: Any, args: tuple[Any, ...]) -> None:
                rows = args[0][keep["m"]].float()
                sums[name] += (rows.T @ rows).double()  # a batch's product in float32, the sum in float64
            return hook

        handles = [mods[n].register_forward_pre_hook(grab(n)) for n in group]
        tokens = 0
        try:
            with torch.inference_mode():
                for b in batches:
                    keep["m"] = torch.as_tensor(b.attention_mask).bool()
                    tokens += int(keep["m"].sum())
                    model(input_ids=torch.as_tensor(b.input_ids), attention_mask=torch.as_tensor(b.attention_mask))
        finally:
            for h in handles:
                h.remove()
        _save({n: h.numpy() for n, h in sums.items()}, files, root)
        del sums
    return MomentStore(files, tokens)
