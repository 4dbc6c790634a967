"""Stacked experts (one tensor per projection) against the per-expert modules they replace: same outputs and
gradients on both dispatch paths, DeepSpeed's per-expert state-dict keys, biases without weight decay."""
import pytest
import torch

from minimoe.engine import optimizer_groups
from minimoe.experts import StackedExperts, per_expert
from minimoe.moe import ExpertFFN

E, H, F = 3, 8, 16


def _pair():
    """A stacked module with random weights and the per-expert modules loaded from its state dict."""
    torch.manual_seed(0)
    stacked = StackedExperts(E, H, F, dropout=0.0)
    with torch.no_grad():
        for p in stacked.parameters():
            p.normal_(0.0, 0.5)
    state = stacked.state_dict()
    modules = []
    for j in range(E):
        m = ExpertFFN(H, F, dropout=0.0)
        prefix = f"deepspeed_experts.{j}."
        m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        modules.append(m)
    return stacked, modules


def _same_as_modules(x: torch.Tensor, stacked_fn, modules_fn, stacked, modules) -> None:
    """Outputs, input gradients and every expert's parameter gradients of the stacked experts on ``x``
    equal those of the per-expert modules (an expert without rows: zero gradients)."""
    weight = torch.randn(x.shape)
    xs, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = stacked_fn(xs), modules_fn(xm)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xs.grad, xm.grad, atol=1e-6, rtol=1e-6)
    got = per_expert({n: p.grad for n, p in stacked.named_parameters()})
    for j, m in enumerate(modules):
        for n, p in m.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got[f"deepspeed_experts.{j}.{n}"], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("counts", [[5, 0, 7], [1, 1, 1], [0, 0, 4]])
def test_grouped_rows_equal_each_expert_module_on_its_own_rows(counts):
    stacked, modules = _pair()
    _same_as_modules(torch.randn(sum(counts), H), lambda x: stacked.grouped(x, counts),
                     lambda x: torch.cat([m(r) for m, r in zip(modules, x.split(counts))]), stacked, modules)


def test_deepspeed_buffers_equal_each_expert_module_on_its_slots():
    """MOELayer hands the experts ``[ep_size, E_local, C, H]``: expert j serves slots [:, j] of every
    group."""
    stacked, modules = _pair()
    _same_as_modules(torch.randn(2, E, 4, H), stacked,
                     lambda x: torch.stack([m(x[:, j]) for j, m in enumerate(modules)], dim=1), stacked,
                     modules)


def test_state_dict_has_deepspeeds_per_expert_keys_and_loads_back():
    stacked, _ = _pair()
    state = stacked.state_dict()
    assert sorted(state) == sorted(f"deepspeed_experts.{j}.{m}.{p}" for j in range(E) for m in ("fc1", "fc2")
                                   for p in ("weight", "bias"))
    assert state["deepspeed_experts.1.fc1.weight"].shape == (F, H)
    # a copy, not a view
    assert state["deepspeed_experts.1.fc1.weight"].untyped_storage().nbytes() == F * H * 4
    fresh = StackedExperts(E, H, F, dropout=0.0)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.parameters(), stacked.parameters()):
        assert torch.equal(a, b)
    del state["deepspeed_experts.2.fc2.bias"]
    with pytest.raises(RuntimeError, match="fc2_bias"):  # a missing expert is reported, not filled in
        fresh.load_state_dict(state)


def test_stacked_parameters_are_flagged_for_deepspeeds_expert_groups_and_biases_not_decayed():
    stacked = StackedExperts(E, H, F, dropout=0.0, group_name="ep_size_2")
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in stacked.parameters())
    decayed = {id(p) for g in optimizer_groups(stacked) if g.get("weight_decay", None) != 0.0
               for p in g["params"]}
    assert decayed == {id(stacked.fc1_weight), id(stacked.fc2_weight)}
