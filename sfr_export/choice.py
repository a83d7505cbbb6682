"""``Choice``: the one base of every named option (CLI flag, config field, manifest value).

A choice is parsed once, where its text enters, into its Enum; the rest of the code passes the member. ``parse`` is
case-insensitive, accepts the class's aliases, and refuses anything else with one line that names the choices:
``unknown calibration method 'kl' (expected minmax, percentile or entropy)``.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import UserInputError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A str Enum (it compares equal to, and JSON-encodes as, its value) with a checked ``parse``.

    A subclass names itself in errors and lists other spellings in its class line:
    ``class PoolingMode(Choice, label="pooling mode", aliases={"eos": "lasttoken"})``.
    """

    def __init_subclass__(cls, label: str | None = None, aliases: dict[str, str] | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls._label = label or cls.__name__.lower()
        cls._aliases = dict(aliases or {})

    @classmethod
    def parse(cls: type[C], value: object) -> C:
        if isinstance(value, cls):
            return value
        text = str(getattr(value, "value", value)).strip().lower()
        text = cls._aliases.get(text, text)
        for member in cls:
            if member.value == text:
                return member
        raise UserInputError(f"unknown {cls._label} '{value}' (expected {cls.choices()})")

    @classmethod
    def choices(cls) -> str:
        names = [m.value for m in cls]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def __str__(self) -> str:
        return self.value
