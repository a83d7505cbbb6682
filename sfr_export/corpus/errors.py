"""Errors of ``embed-corpus``. Each is one line naming the file and the row or column at fault."""

from __future__ import annotations

from ..errors import ArtifactError, UserInputError


class CorpusInputError(UserInputError):
    """The input corpus is unreadable, of an unknown format, empty, or holds a bad row or column."""


class CorpusOutputError(UserInputError):
    """The output dir belongs to another run (model, variant, prompt, input) or is not a corpus output."""


class CorpusShardError(ArtifactError):
    """A shard in the output dir disagrees with the run record (wrong row count, unreadable footer)."""
