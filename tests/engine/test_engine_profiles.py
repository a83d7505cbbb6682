"""Optimization profiles: parsing, validation, defaults from the spec, and fitting requests into a profile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfr_export.errors import UserInputError
from sfr_export.runtime.tensorrt_runner import fit_chunk, plan_chunks
from sfr_export.spec import ModelSpec
from sfr_export.artifact import Precision
from sfr_export.stages.engine import EngineConfig, ShapeRange


def test_parse_min_opt_max_and_static():
    assert ShapeRange.parse("1,8,32", name="batch").as_list() == [1, 8, 32]
    assert ShapeRange.parse(" 16 ", name="seq").as_list() == [16, 16, 16]


@pytest.mark.parametrize("text,needle", [("8,4,16", "MIN <= OPT <= MAX"), ("1,32,8", "MIN <= OPT <= MAX"),
                                         ("0,1,2", "min must be >= 1"), ("1,2", "MIN,OPT,MAX"), ("a,b,c", "integers")])
def test_bad_profiles_are_clear_errors(text, needle):
    with pytest.raises(UserInputError, match=needle):
        ShapeRange.parse(text, name="batch")


def test_defaults_come_from_the_spec():
    cfg = EngineConfig.for_spec(ModelSpec(max_length=4096), precision=Precision.INT8)
    assert cfg.precision is Precision.INT8
    assert cfg.batch.as_list() == [1, 8, 32]
    assert cfg.seq.as_list() == [1, 128, 4096]
    small = EngineConfig.for_spec(ModelSpec(max_length=64))
    assert small.seq.as_list() == [1, 64, 64]
    shapes = EngineConfig.for_spec(ModelSpec(max_length=512), batch="2,4,8", seq="16,128,512").profile_shapes()
    assert shapes == {"input_ids": [[2, 16], [4, 128], [8, 512]], "attention_mask": [[2, 16], [4, 128], [8, 512]]}


def test_seq_over_spec_max_and_bad_options_are_refused():
    with pytest.raises(UserInputError, match="exceeds the model's max_length 512"):
        EngineConfig.for_spec(ModelSpec(max_length=512), seq="16,128,1024")
    with pytest.raises(UserInputError, match="only applies to --version-compatible"):
        EngineConfig(exclude_lean_runtime=True)
    with pytest.raises(UserInputError, match="0..5"):
        EngineConfig(opt_level=7)
    with pytest.raises(UserInputError, match="workspace"):
        EngineConfig(workspace_gib=0)
    with pytest.raises(UserInputError, match="unknown precision 'int4'"):
        Precision.parse("int4")  # parsed once, where the text enters
    with pytest.raises(TypeError, match="must be a Precision"):
        EngineConfig(precision="fp16")  # type: ignore[arg-type]


def test_config_round_trips_through_its_dict():
    cfg = EngineConfig.for_spec(ModelSpec(max_length=256), precision=Precision.FP16, batch="1,4,16", seq="8,64,256",
                                opt_level=5)
    assert EngineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_batches_over_the_profile_are_split_and_small_ones_padded():
    b, s = ShapeRange(2, 4, 8, name="batch"), ShapeRange(4, 16, 32, name="seq")
    chunks = plan_chunks(19, 10, b, s)
    assert [(c.start, c.stop) for c in chunks] == [(0, 8), (8, 16), (16, 19)]
    assert [c.pad_rows for c in chunks] == [0, 0, 0]
    assert all(c.seq == 10 for c in chunks)
    (one,) = plan_chunks(1, 2, b, s)
    assert (one.pad_rows, one.seq) == (1, 4)  # padded up to min batch 2 and min seq 4


def test_sequence_over_the_profile_is_refused_with_the_fix():
    with pytest.raises(UserInputError, match=r"sequence length 40 exceeds .* profile max 32.*--seq 4,16,40"):
        plan_chunks(2, 40, ShapeRange(1, 4, 8), ShapeRange(4, 16, 32))


def test_fit_chunk_pads_rows_and_positions_without_moving_the_last_token():
    from sfr_export.pooling import last_token_index

    import torch

    ids = np.array([[5, 6, 7], [8, 9, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)
    (chunk,) = plan_chunks(2, 3, ShapeRange(4, 4, 8), ShapeRange(6, 8, 16))
    fids, fmask = fit_chunk(ids, mask, chunk)
    assert fids.shape == (4, 6) and fmask.shape == (4, 6)
    np.testing.assert_array_equal(fids[2], fids[0])  # padding rows copy the first row
    np.testing.assert_array_equal(fmask[:2, 3:], 0)
    before = last_token_index(torch.from_numpy(mask)).tolist()
    after = last_token_index(torch.from_numpy(fmask[:2])).tolist()
    assert before == after == [2, 1]
