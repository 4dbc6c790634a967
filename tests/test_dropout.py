"""Dropout on CPU with a cheaper keep mask (minimoe/dropout.py), and the student's attention core in CPU
training with dropout (minimoe/attention.py): the arithmetic SDPA does, and SDPA itself everywhere else."""
import math

import pytest
import torch
import torch.nn.functional as F

from minimoe.attention import attention, dropped_attention
from minimoe.dropout import Dropout, keep_mask


def _inputs(dtype=torch.float64, b=3, heads=4, length=9, d=8):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, heads, length, d, dtype=dtype, requires_grad=True) for _ in range(3))
    key_mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    key_mask[1, ..., 5:] = False  # a padded row
    return q, k, v, key_mask


def test_dropped_attention_is_the_written_out_formula_with_its_mask():
    """Output and gradients equal softmax(QK^T / sqrt(d), padded keys -inf) * keep / (1 - p) @ V under the
    mask the same seed draws; padded keys get no weight."""
    q, k, v, key_mask = _inputs()
    p = 0.3
    torch.manual_seed(5)
    out = dropped_attention(q, k, v, key_mask, p)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    torch.manual_seed(5)
    keep = keep_mask((q.shape[0] * q.shape[1], q.shape[2], k.shape[2]), p, q.device).view(*q.shape[:3], -1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~key_mask, float("-inf"))
    want = (torch.softmax(scores, -1) * keep / (1 - p)) @ v
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    for got, expected in zip(grads, torch.autograd.grad(want.pow(2).sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    v_padded = v.detach().clone()
    v_padded[1, :, 5:] = 1e6  # a padded key's value would show in every row of sample 1
    torch.manual_seed(5)
    assert dropped_attention(q, k, v_padded, key_mask, p)[1].abs().max() < 1e3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_one_minus_p_independently(p):
    """Over 4M entries the kept fraction is 1 - p (to 1/65536) within 5 standard deviations, and the two
    16-bit halves of one generator word are not correlated."""
    n = 1 << 22
    keep = keep_mask((n,), p, torch.device("cpu")).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma + 1 / 65536
    even, odd = keep[0::2] - keep.mean(), keep[1::2] - keep.mean()
    assert abs((even * odd).mean().item()) / (p * (1 - p)) < 5 / math.sqrt(n / 2)


def test_keep_mask_follows_the_seed():
    torch.manual_seed(3)
    a = keep_mask((5, 7), 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((5, 7), 0.1, torch.device("cpu")))


@pytest.mark.parametrize("training,p", [(False, 0.1), (True, 0.0)])
def test_without_dropout_it_is_sdpa(training, p):
    q, k, v, key_mask = _inputs(torch.float32)
    torch.testing.assert_close(attention(q, k, v, key_mask, p, training),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask), atol=0, rtol=0)


def test_training_with_dropout_matches_sdpa_in_expectation():
    """Averaged over many draws, dropout's output is the undropped attention (E[keep / (1 - p)] = 1)."""
    q, k, v, key_mask = _inputs(torch.float64, b=2, heads=2, length=6, d=4)
    with torch.no_grad():
        mean = sum(attention(q, k, v, key_mask, 0.2, True) for _ in range(4000)) / 4000
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    assert (mean - exact).abs().max() < 0.05 * exact.abs().max()


def test_dropout_module_drops_p_scales_the_rest_and_is_identity_in_eval():
    layer = Dropout(0.25)
    assert layer.state_dict() == {} and repr(layer) == "Dropout(p=0.25, inplace=False)"
    x = torch.rand(64, 128, 96, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75, atol=0, rtol=1e-15)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.double() / 0.75, atol=0, rtol=1e-15)
    assert layer.eval()(x) is x
