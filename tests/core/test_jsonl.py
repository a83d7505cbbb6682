"""The shared JSONL reader: line numbers survive blank lines, every failure names path:line and the caller's error."""

from __future__ import annotations

import pytest

from sfr_export.errors import TrainingError, UserInputError
from sfr_export.jsonl import iter_objects


def test_numbers_count_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert list(iter_objects(p, UserInputError)) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize("line, msg", [("{oops", "a.jsonl:2: malformed JSON"),
                                        ("[1, 2]", "a.jsonl:2: expected a JSON object, got list")])
def test_bad_line_raises_the_callers_error(tmp_path, line, msg):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=msg):
        list(iter_objects(p, TrainingError))


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="calibration data file .*nope.jsonl does not exist"):
        list(iter_objects(tmp_path / "nope.jsonl", UserInputError, "calibration data file"))
