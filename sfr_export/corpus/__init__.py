"""Embedding a whole corpus into Parquet shards: ``embed_corpus`` (local engine, or Ray Data for scale-out).

Stands on the public runtime (``Embedder``) and the artifact (manifest, spec) only.
"""

from .api import CorpusProgress, embed_corpus
from .config import CorpusConfig, CorpusSummary, EngineKind, InputType, OutputDtype
from .errors import CorpusInputError, CorpusOutputError, CorpusShardError

__all__ = ["CorpusConfig", "CorpusInputError", "CorpusOutputError", "CorpusProgress", "CorpusShardError",
           "CorpusSummary", "EngineKind", "InputType", "OutputDtype", "embed_corpus"]
