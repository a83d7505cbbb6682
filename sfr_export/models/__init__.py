"""Model resolution and loading: hub ids, local dirs and the offline ``demo:*`` models. Safetensors only."""

from .loading import DTYPES, ResolvedModel, load_backbone, load_tokenizer, resolve_model

__all__ = ["DTYPES", "ResolvedModel", "load_backbone", "load_tokenizer", "resolve_model"]
