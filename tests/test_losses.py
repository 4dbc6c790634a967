import math

import pytest
import torch

from minimoe.losses import relation_kl
from minimoe.moe import load_balance_loss


def reference_relation_kl(t_qkv, s_qkv, mask, r):
    """Plain loops over samples and heads on the unpadded tokens only, in float64."""
    total = 0.0
    for t_x, s_x in zip(t_qkv, s_qkv):
        part, n = 0.0, 0
        for b in range(mask.shape[0]):
            idx = mask[b].nonzero().flatten()
            for x_t, x_s in [(t_x[b, idx].detach().double(), s_x[b, idx].detach().double())]:
                dt, ds = x_t.shape[1] // r, x_s.shape[1] // r
                for h in range(r):
                    a = x_t[:, h * dt:(h + 1) * dt]
                    c = x_s[:, h * ds:(h + 1) * ds]
                    p = torch.softmax(a @ a.T / math.sqrt(dt), -1)
                    q = torch.softmax(c @ c.T / math.sqrt(ds), -1)
                    for i in range(len(idx)):
                        part += float((p[i] * (p[i].log() - q[i].log())).sum())
                        n += 1
        total += part / n
    return total / 3


@pytest.mark.parametrize("r", [4, 16])  # 16 relation heads > 4 student attention heads
def test_relation_kl_matches_plain_computation_with_padding(r):
    g = torch.Generator().manual_seed(0)
    b, l, ht, hs = 3, 7, 64, 32
    t = [torch.randn(b, l, ht, generator=g) for _ in range(3)]
    s = [torch.randn(b, l, hs, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.ones(b, l, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    # Garbage in padded positions must not matter.
    for x in t:
        x[1, 4:] = 1e3
    got = relation_kl(t, s, mask, r)
    want = reference_relation_kl(t, s, mask, r)
    assert got.item() == pytest.approx(want, rel=1e-4)
    got.backward()
    assert torch.all(s[0].grad[1, 4:] == 0)  # padded student tokens get no gradient


def autograd_relation_kl(t_qkv, s_qkv, mask, r):
    """The loss written plainly, with autograd through every [B * R, L, L] relation tensor."""
    valid = mask.bool()
    b, l = valid.shape
    bias = torch.zeros(b, 1, l).masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min)
    bias = bias.unsqueeze(1).expand(b, r, 1, l).reshape(b * r, 1, l)

    def log_rel(x):
        xs = x.float().view(b, l, r, -1).transpose(1, 2).reshape(b * r, l, -1)
        return torch.log_softmax(xs @ xs.transpose(1, 2) / math.sqrt(xs.shape[-1]) + bias, -1)

    rows = valid[:, None, :].expand(b, r, l).reshape(-1)
    losses = []
    for t, s in zip(t_qkv, s_qkv):
        t_logp = log_rel(t.detach())
        kl = (t_logp.exp() * (t_logp - log_rel(s))).sum(-1).view(-1)
        losses.append(kl[rows].mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("chunk", [1 << 22, 2 * 7 * 7, 7 * 7])  # one chunk; two rows; one row at a time
def test_fused_loss_and_gradient_equal_autograd_through_the_relations(chunk):
    g = torch.Generator().manual_seed(1)
    b, l, r = 3, 7, 4
    t = [torch.randn(b, l, 48, generator=g) for _ in range(3)]
    s = [torch.randn(b, l, 32, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.ones(b, l, dtype=torch.long)
    mask[0, 5:] = 0
    want = autograd_relation_kl(t, s, mask, r)
    want_grads = torch.autograd.grad(want * 3.0, s)
    got = relation_kl(t, s, mask, r, chunk_elements=chunk)
    (got * 3.0).backward()
    # Measured: the loss within 1.4e-7 relative, the gradients within 5.4e-9 (their largest entry 1.6e-2).
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for x, w in zip(s, want_grads):
        torch.testing.assert_close(x.grad, w, rtol=1e-6, atol=5e-8)
    with torch.no_grad():  # evaluation: the value alone
        assert relation_kl(t, s, mask, r).item() == pytest.approx(want.item(), rel=1e-6)


def test_relation_kl_is_zero_for_identical_relations():
    x = [torch.randn(2, 5, 32) for _ in range(3)]
    assert relation_kl(x, x, torch.ones(2, 5), 8).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_kl_rejects_bad_heads():
    x = [torch.randn(1, 3, 30)] * 3
    with pytest.raises(ValueError, match="relation heads 8 must divide hidden size 30"):
        relation_kl(x, x, torch.ones(1, 3), 8)


def test_load_balance_uniform_is_one_and_collapse_is_e():
    e = 4
    uniform = torch.zeros(8, e)
    counts = torch.tensor([2, 2, 2, 2])
    assert load_balance_loss(uniform, counts).item() == pytest.approx(1.0)
    collapsed = torch.full((8, e), -1e4)
    collapsed[:, 0] = 1e4
    assert load_balance_loss(collapsed, torch.tensor([8, 0, 0, 0])).item() == pytest.approx(e)


def test_load_balance_ignores_padding_tokens():
    logits = torch.randn(6, 3)
    used = torch.tensor([1, 1, 1, 1, 0, 0])
    counts = torch.bincount(logits[:4].argmax(-1), minlength=3)
    masked = load_balance_loss(logits, counts, used)
    assert masked.item() == pytest.approx(load_balance_loss(logits[:4], counts).item(), rel=1e-6)


def test_logits_kd_matches_the_definition():
    from minimoe.losses import logits_kd
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    temp = 2.0
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * temp ** 2
    assert logits_kd(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    assert logits_kd(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # token tasks: only the masked positions count
    s3, t3 = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert logits_kd(s3, t3, 1.0, mask).item() == pytest.approx(logits_kd(s3[mask], t3[mask]).item())
    # regression: squared error to the teacher
    assert logits_kd(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])).item() == pytest.approx(2.5)
