"""Every named option is a ``Choice``: parsed once, case-insensitively, refused in one line that names the choices."""

from __future__ import annotations

import enum
import importlib
import json
import pkgutil
import sys

import pytest

import sfr_export
from sfr_export.artifact import Precision, Variant
from sfr_export.choice import Choice
from sfr_export.errors import UserInputError
from sfr_export.quant.options import CalibrationMethod, ReferenceDtype, RotationMode
from sfr_export.spec import PoolingMode
from sfr_export.stages.calibrate import CalibrateConfig


def _all_choices() -> list[type[Choice]]:
    for mod in pkgutil.walk_packages(sfr_export.__path__, "sfr_export."):
        importlib.import_module(mod.name)  # every module imports without its optional heavy deps in use
    seen, todo = [], [Choice]
    while todo:
        for sub in todo.pop().__subclasses__():
            seen.append(sub)
            todo.append(sub)
    return seen


def test_every_enum_of_the_package_is_a_choice() -> None:
    """One parse for all: no module keeps its own Enum with its own error message."""
    choices = set(_all_choices())
    assert {Precision, Variant, PoolingMode, CalibrationMethod, RotationMode, ReferenceDtype} <= choices
    others = [f"{name}.{obj.__name__}" for name, mod in list(sys.modules.items()) if name.startswith("sfr_export.")
              for obj in vars(mod).values()
              if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == name
              and obj not in choices and obj is not Choice]
    assert others == []


@pytest.mark.parametrize("kind", _all_choices(), ids=lambda k: k.__name__)
def test_parse_round_trips_and_refuses_in_one_line(kind: type[Choice]) -> None:
    for member in kind:
        assert kind.parse(member.value.upper()) is member
        assert kind.parse(json.loads(json.dumps(member))) is member  # JSON keeps the text
    with pytest.raises(UserInputError) as err:
        kind.parse("no-such-choice")
    text = str(err.value)
    assert "\n" not in text and "'no-such-choice'" in text and all(m.value in text for m in kind)


def test_aliases_and_the_message() -> None:
    assert PoolingMode.parse("EOS") is PoolingMode.LASTTOKEN
    with pytest.raises(UserInputError, match=r"^unknown calibration method 'kl' \(expected minmax, percentile or entropy\)$"):
        CalibrationMethod.parse("kl")


def test_calibrate_config_holds_members_and_writes_plain_json() -> None:
    cfg = CalibrateConfig(method="Percentile", rotation="OFF", reference_dtype="bfloat16")
    assert cfg.method is CalibrationMethod.PERCENTILE and cfg.rotation is RotationMode.OFF
    assert not cfg.rotate(last_token=True) and cfg.torch_dtype_for(1) == "bfloat16"
    plain = json.loads(json.dumps(cfg.to_dict()))
    assert plain["method"] == "percentile" and type(cfg.to_dict()["rotation"]) is str
    assert CalibrateConfig(**plain) == cfg  # the worker's job file rebuilds the same config
    with pytest.raises(UserInputError, match="unknown rotation mode 'yes'"):
        CalibrateConfig(rotation="yes")
