"""Make any ``Embedder`` an mteb encoder, so the full MTEB benchmark runs on an exported artifact.

Implements mteb 2.x's ``EncoderProtocol`` (``mteb/models/models_protocols.py``) on top of ``AbsEncoder``
(``mteb/models/abs_encoder.py``, which supplies ``similarity`` / ``similarity_pairwise`` from
``mteb_model_meta.similarity_fn_name``). Prompts follow ``InstructSentenceTransformerModel`` with
``apply_instruction_to_passages=False``, the loader mteb uses for SFR-Embedding-Mistral and e5-mistral
(``mteb/models/model_implementations/salesforce_models.py``): documents (``PromptType.document``) get no instruction;
everything else gets the task's instruction, taken from sfr-export's instruction table when the task is in it,
else from mteb's task metadata (``AbsEncoder.get_instruction``).

    import mteb
    from sfr_export import Embedder
    from sfr_export.eval.mteb_adapter import MtebEncoder

    model = MtebEncoder(Embedder.from_artifact("out/sfr", backend="onnxruntime"), name="me/sfr-onnx-int8")
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require
from ..spec import task_instructions

if TYPE_CHECKING:
    from ..runtime.embedder import Embedder

require("mteb", purpose="the mteb encoder adapter")

from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402


class MtebEncoder(AbsEncoder):
    """An mteb encoder backed by an sfr-export ``Embedder`` (any backend: torch, onnxruntime, tensorrt)."""

    def __init__(self, embedder: "Embedder", *, name: str = "sfr-export/artifact", revision: str | None = None,
                 max_tokens: int | None = None):
        self.embedder = embedder
        self.model = embedder
        spec = embedder.spec
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name, revision=revision, loader=None, framework=["ONNX"] if embedder.info.get("backend") == "onnxruntime" else ["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE, use_instructions=spec.uses_instructions,
            max_tokens=max_tokens or spec.max_length, modalities=["text"]))

    def _prompt_args(self, task_metadata: Any, prompt_type: PromptType | None) -> dict[str, Any]:
        side = "document" if prompt_type == PromptType.document else "query"
        if side == "document":
            return {"prompt": None, "instruction": None, "side": side}
        if task_metadata.name in task_instructions():
            return {"prompt": task_metadata.name, "instruction": None, "side": side}
        instruction = self.get_instruction(task_metadata, prompt_type)
        return {"prompt": None, "instruction": instruction or None, "side": side}

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            texts.extend(str(t) for t in batch["text"])
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        args = self._prompt_args(task_metadata, prompt_type)
        if args["prompt"] is None and args["instruction"] is None:
            return self.embedder.encode(texts, side=args["side"])
        return self.embedder.encode(texts, **args)
