import numpy as np
import pytest
import torch

from sfr_export.errors import UserInputError
from sfr_export.pooling import PoolingMode, l2_normalize, last_token_index, pool, pool_and_normalize


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_lasttoken_pooling_picks_the_same_token_for_both_padding_sides():
    torch.manual_seed(0)
    tokens = torch.randn(3, 4)  # the vector of each row's last real token
    lengths = [2, 5, 1]
    seq = 5
    right = torch.randn(3, seq, 4)
    left = torch.randn(3, seq, 4)
    mr = torch.zeros(3, seq, dtype=torch.long)
    ml = torch.zeros(3, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        right[i, n - 1] = tokens[i]
        mr[i, :n] = 1
        left[i, seq - 1] = tokens[i]
        ml[i, seq - n:] = 1
    a = pool(right, mr, PoolingMode.LASTTOKEN)
    b = pool(left, ml, PoolingMode.LASTTOKEN)
    assert torch.equal(a, tokens) and torch.equal(b, tokens)


def test_mean_and_cls_pooling_ignore_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert pool(h, m, PoolingMode.MEAN).tolist() == [[2.0, 3.0]]
    assert pool(h, m, PoolingMode.CLS).tolist() == [[1.0, 2.0]]


def test_l2_normalize_fp32_and_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    y = l2_normalize(x)
    assert y.dtype == torch.float32
    assert np.allclose(y.numpy(), [[0.6, 0.8], [0.0, 0.0]])


def test_pool_and_normalize_upcasts_half_inputs():
    h = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out = pool_and_normalize(h, torch.ones(2, 3, dtype=torch.long), PoolingMode.LASTTOKEN, True)
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(2))


def test_pooling_mode_parse():
    assert PoolingMode.parse("last_token") is PoolingMode.LASTTOKEN
    with pytest.raises(UserInputError):
        PoolingMode.parse("max")
