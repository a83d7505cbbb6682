"""The exported embedding graph: one wrapper, one IO spec, one ``torch.onnx.export`` call.

Both export paths (:mod:`sfr_export.stages.export`, weights in memory, and :mod:`sfr_export.stages.lowmem_export`,
graph on the meta device) build their graph here, so what is traced, how attention is written and what the graph
promises (inputs, outputs, dynamic axes, padding) cannot drift apart.

Attention is traced through ``F.scaled_dot_product_attention``; at opset >= 23 the dynamo exporter writes it as one
ONNX ``Attention`` node (GQA-aware: K/V keep their own head count). How the mask reaches it depends on the model:

- **causal** (decoders): no padding mask at all. The graph assumes *right* padding: a real token never attends to
  padding that comes after it, so every real token's hidden state is exact, whatever the pooling reads. The node
  is ``is_causal=1``; with a sliding window shorter than the model's positions, a ``[L, L]`` band mask (one per
  graph, not per batch or head) carries the window instead.
- **key-padding** (bidirectional encoders): the ``[B, L]`` padding mask as one boolean ``[B, 1, L, L]`` tensor,
  built once per graph and shared by every layer (ONNX Runtime's CPU ``Attention`` does not broadcast a mask over
  the query axis). Either padding side is exact. The ONNX Runtime CPU form (:mod:`sfr_export.stages.ort_attention`)
  drops that tensor for an O(L) key bias.

The graph records its form in the ONNX metadata (:data:`META_ATTENTION`, :data:`META_PADDING`, :data:`META_WINDOW`),
so any runner can enforce the padding side it assumes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..choice import Choice
from ..errors import ExportValidationError
from ..spec import ModelSpec

DEFAULT_OPSET = 23  # the first opset with a fused ``Attention`` op
FUSED_ATTENTION = "sfr_fused_sdpa"  # the transformers attention implementation registered below
META_ATTENTION = "sfr_export.attention"
META_PADDING = "sfr_export.padding_side"
META_WINDOW = "sfr_export.sliding_window"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"


class AttentionForm(Choice):
    CAUSAL = "causal"  # no padding mask; right padding required
    KEY_PADDING = "key-padding"  # [B, L] key-padding mask (expanded to [B, 1, L, L]); either padding side


@dataclass(frozen=True)
class AttentionPlan:
    """How attention is written into the graph, and what the graph then requires of its inputs."""

    form: AttentionForm
    num_heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # kept in the graph (band mask) when set
    max_positions: int = 0  # the model's max_position_embeddings (0: unknown); sizes the CPU form's RoPE cache

    @property
    def padding_side(self) -> str:
        """``right`` when the graph is only exact for right-padded batches, else ``any``."""
        return "right" if self.form is AttentionForm.CAUSAL else "any"

    def metadata(self) -> dict[str, str]:
        return {META_ATTENTION: self.form.value, META_PADDING: self.padding_side,
                META_WINDOW: str(self.sliding_window or 0)}

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form.value, "num_heads": self.num_heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "sliding_window": self.sliding_window, "padding_side": self.padding_side,
                "max_positions": self.max_positions}


def _attention_modules(backbone: Any) -> list[Any]:
    """The modules that call the attention interface (transformers marks each with a bool ``is_causal``)."""
    return [m for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]


def _is_causal(backbone: Any) -> bool:
    flags = {m.is_causal for m in _attention_modules(backbone)}
    if len(flags) > 1:
        raise ExportValidationError("the model mixes causal and bidirectional attention layers; not supported")
    return flags == {True}


def plan_attention(backbone: Any) -> AttentionPlan:
    """The attention form for ``backbone`` (a transformers base model, real or on the meta device)."""
    cfg = backbone.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if not _is_causal(backbone):
        return AttentionPlan(AttentionForm.KEY_PADDING, heads, kv, head_dim)
    window = getattr(cfg, "sliding_window", None)
    positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    # A window at least as long as every position the model accepts never masks anything.
    keep = window is not None and int(window) > 0 and (positions == 0 or int(window) < positions)
    return AttentionPlan(AttentionForm.CAUSAL, heads, kv, head_dim, int(window) if keep else None, positions)


# ------------------------------------------------------------------------------------------------------------------
# The attention function traced into the graph
# ------------------------------------------------------------------------------------------------------------------
def _band_mask(length: Any, window: int, device: Any) -> Any:
    """[L, L] boolean: query i sees keys j with i - window < j <= i (transformers' sliding-window rule)."""
    import torch

    pos = torch.arange(length, device=device)
    diff = pos.unsqueeze(1) - pos.unsqueeze(0)
    return (diff >= 0) & (diff < window)


def fused_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, sliding_window: int | None = None,
               **_: Any) -> tuple[Any, None]:
    """transformers attention interface: one SDPA call per layer, K/V not repeated (``enable_gqa``)."""
    import torch.nn.functional as F

    plan: AttentionPlan = module._sfr_plan
    gqa = key.shape[1] != query.shape[1]
    if plan.form is AttentionForm.KEY_PADDING:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=gqa)
    elif plan.sliding_window is not None:
        band = _band_mask(query.shape[2], plan.sliding_window, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=band, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register_fused_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_ATTENTION, fused_sdpa)


@contextmanager
def fused_attention(backbone: Any, plan: AttentionPlan) -> Iterator[None]:
    """Run ``backbone`` with :func:`fused_sdpa` inside the block; its attention implementation is restored after."""
    register_fused_attention()
    configs = [m.config for m in backbone.modules() if hasattr(m, "config")]
    before = [getattr(c, "_attn_implementation", None) for c in configs]
    attn_modules = _attention_modules(backbone)
    for m in attn_modules:
        m._sfr_plan = plan
    for c in configs:
        c._attn_implementation = FUSED_ATTENTION
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
        for m in attn_modules:
            del m._sfr_plan


# ------------------------------------------------------------------------------------------------------------------
# The wrapper traced into the graph
# ------------------------------------------------------------------------------------------------------------------
def make_wrapper(backbone: Any, spec: ModelSpec, plan: AttentionPlan | None = None) -> Any:
    """backbone + pooling + L2 in one module; ``plan`` (default: :func:`plan_attention`) says how the mask goes in."""
    import torch

    from ..pooling import pool_and_normalize

    plan = plan or plan_attention(backbone)

    class EmbeddingWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.plan = plan

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if self.plan.form is AttentionForm.CAUSAL:
                # explicit [B, L] positions: right padding puts every real token at its own index
                pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
                hidden = self.backbone(input_ids=input_ids, position_ids=pos).last_hidden_state
            else:
                # [B, 1, 1, L] key-padding mask, expanded once per graph (not per layer) to [B, 1, L, L] bool:
                # ONNX Runtime 1.32's CPU Attention refuses a mask that broadcasts over the query axis
                # (attention_helper.h: "inconsistent q_sequence_length"). One byte per score, built once.
                keep = attention_mask.bool()[:, None, None, :].expand(-1, -1, input_ids.shape[1], -1)
                hidden = self.backbone(input_ids=input_ids, attention_mask=keep).last_hidden_state
            return pool_and_normalize(hidden, attention_mask, spec.pooling, spec.normalize)

    return EmbeddingWrapper().eval()


def norms_to_fp32(model: Any) -> int:
    """Run every RMSNorm/LayerNorm in float32 inside an fp16 model (inputs upcast, outputs cast back)."""
    import torch

    count = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm")):
            mod.float()

            def pre(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
                _m._sfr_in_dtype = args[0].dtype
                return (args[0].float(), *args[1:])

            def post(_m: Any, _args: Any, out: Any) -> Any:
                return out.to(_m._sfr_in_dtype)

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
            count += 1
    return count


# ------------------------------------------------------------------------------------------------------------------
# The IO spec: drives the export call and checks its result
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxIOSpec:
    """The contract of an exported embedding graph (optimum-style export spec)."""

    inputs: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=lambda: {
        name: ("int64", ("batch", "sequence")) for name in INPUT_NAMES})
    output_name: str = OUTPUT_NAME
    output_dtype: str = "float32"

    def example_inputs(self, device: str = "cpu") -> tuple[Any, ...]:
        import torch

        ids = torch.full((2, 8), 5, dtype=torch.long, device=device)
        return tuple(ids if name == "input_ids" else torch.ones_like(ids) for name in self.inputs)

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        import torch

        dims: dict[str, Any] = {}
        out: dict[str, dict[int, Any]] = {}
        for name, (_dtype, axes) in self.inputs.items():
            out[name] = {i: dims.setdefault(a, torch.export.Dim(a)) for i, a in enumerate(axes)}
        return out

    def check(self, model_path: Path, dim: int | None = None) -> None:
        import onnx

        m = onnx.load(str(model_path), load_external_data=False)
        names = {1: "float32", 7: "int64", 10: "float16"}
        got_inputs = [i.name for i in m.graph.input]
        if got_inputs != list(self.inputs):
            raise ExportValidationError(f"exported inputs are {got_inputs}, expected {list(self.inputs)}")
        for inp in m.graph.input:
            dtype, axes = self.inputs[inp.name]
            t = inp.type.tensor_type
            if names.get(t.elem_type) != dtype:
                raise ExportValidationError(f"input {inp.name} has elem_type {t.elem_type}, expected {dtype}")
            dims = t.shape.dim
            if len(dims) != len(axes) or any(d.dim_value for d in dims):
                raise ExportValidationError(f"input {inp.name} must have dynamic axes {axes}, got {[d.dim_param or d.dim_value for d in dims]}")
        outs = [o.name for o in m.graph.output]
        if outs != [self.output_name]:
            raise ExportValidationError(f"exported outputs are {outs}, expected ['{self.output_name}']")
        t = m.graph.output[0].type.tensor_type
        if names.get(t.elem_type) != self.output_dtype:
            raise ExportValidationError(f"output has elem_type {t.elem_type}, expected {self.output_dtype}")
        if dim is not None and len(t.shape.dim) == 2 and t.shape.dim[1].dim_value not in (0, dim):
            raise ExportValidationError(f"output dim is {t.shape.dim[1].dim_value}, expected {dim}")


def export_program(wrapper: Any, io: OnnxIOSpec, *, opset: int, optimize: bool, device: str = "cpu") -> Any:
    """The one ``torch.onnx.export(dynamo=True)`` call; returns the ONNXProgram with the plan in its metadata.

    ``optimize`` runs onnxscript's graph optimizer (constant folding, Cast/Identity clean-up) but not the exporter's
    fusion rewrites: at opset 23 those fuse RMSNorm into ``RMSNormalization`` and drop the float32 casts of an fp16
    model's norms (ONNX Runtime then refuses the graph). The low-memory path passes ``optimize=False`` and runs the
    same optimizer itself with its weights detached, so both paths give the same graph.
    """
    import onnxscript.optimizer
    import torch

    if opset < DEFAULT_OPSET:
        raise ExportValidationError(f"opset {opset} decomposes attention into MatMul/Softmax over L x L scores; "
                                    f"the export needs opset >= {DEFAULT_OPSET}")
    with fused_attention(wrapper.backbone, wrapper.plan):
        prog = torch.onnx.export(wrapper, io.example_inputs(device), input_names=list(io.inputs),
                                 output_names=[io.output_name], opset_version=opset,
                                 dynamic_shapes=tuple(io.dynamic_shapes().values()), dynamo=True,
                                 optimize=False, verbose=False)
    if optimize:
        onnxscript.optimizer.optimize_ir(prog.model)
    prog.model.metadata_props.update(wrapper.plan.metadata())
    return prog


def graph_metadata(model_path: Path) -> dict[str, str]:
    """The ``sfr_export.*`` metadata of an ONNX file (empty for graphs exported before it existed)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props if p.key.startswith("sfr_export.")}
