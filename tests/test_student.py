import pytest
import torch

from minimoe import ConfigError, MiniMoEModel, StudentConfig, count_parameters, flops_per_sequence
from minimoe.student import localize_experts


def tiny(**kw):
    base = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_size=64, num_experts=4, vocab_size=100)
    base.update(kw)
    return StudentConfig(**base)


@pytest.mark.parametrize("layers,dense,moe,gflops", [(3, 17.4, 28.0, 0.68), (4, 19.2, 33.3, 0.91),
                                                     (6, 22.7, 44.0, 1.36)])
def test_parameter_and_flop_counts_match_the_paper(layers, dense, moe, gflops):
    d = count_parameters(StudentConfig(num_layers=layers, num_experts=1))
    m = count_parameters(StudentConfig(num_layers=layers, num_experts=4))
    assert round(d["total"] / 1e6, 1) == dense
    assert round(m["total"] / 1e6, 1) == moe
    # More parameters, the same compute: active params differ only by the gates.
    assert m["active"] - d["active"] == layers * (384 * 4 + 4)
    f = flops_per_sequence(StudentConfig(num_layers=layers, num_experts=4))
    assert round(f["paper_gflops"], 2) == gflops


@pytest.mark.parametrize("experts", [1, 4])
def test_analytic_counts_equal_real_parameters(experts):
    cfg = tiny(num_experts=experts)
    model = MiniMoEModel(cfg)
    real = sum(p.numel() for p in model.parameters())
    counts = count_parameters(cfg)
    assert real == counts["total"] + counts["distillation_only"]


def test_moefy_shares_two_thirds_of_neurons():
    model = MiniMoEModel(tiny(ffn_size=60, num_experts=3))
    experts = model.layers[0].ffn.local_experts
    w = list(experts.fc1_weight)
    shared = round(60 * 2 / 3)
    for a in w[1:]:
        assert torch.equal(a[:shared], w[0][:shared])
        # the expert-specific neurons are distinct rows of the wide FFN
        assert not torch.equal(a[shared:], w[0][shared:])
    assert torch.equal(experts.fc2_weight[1][:, :shared], experts.fc2_weight[0][:, :shared])


def test_ep_rank_builds_its_slice_of_the_same_experts():
    torch.manual_seed(0)
    full = MiniMoEModel(tiny(), ep_size=1)
    torch.manual_seed(0)
    half = MiniMoEModel(tiny(), ep_size=2, ep_rank=1)
    got = half.layers[1].ffn.local_experts
    want = full.layers[1].ffn.local_experts
    assert got.num_local_experts == 2
    assert torch.equal(got.fc1_weight[0], want.fc1_weight[2])
    assert torch.equal(got.fc2_weight[1], want.fc2_weight[3])
    # and a global state dict localises onto exactly that slice
    state = localize_experts(full.state_dict(), half)
    half.load_state_dict(state, strict=True)


def test_gate_noise_only_in_training_and_padding_not_routed():
    model = MiniMoEModel(tiny())
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    model.eval()
    a = model(ids, mask)
    b = model(ids, mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert int(a.expert_counts[0].sum()) == int(mask.sum())
    model.train()
    out = model(ids, mask)
    assert 0.9 < out.aux_loss.item() <= 4.0 + 1e-5


def test_dense_twin_has_no_gate_and_zero_aux():
    model = MiniMoEModel(tiny(num_experts=1))
    out = model(torch.randint(1, 100, (2, 5)), output_qkv=True)
    assert out.aux_loss.item() == 0 and out.expert_counts == []
    assert model.relation_proj is None and len(out.qkv) == 3


def test_save_and_load_round_trip(tmp_path):
    model = MiniMoEModel(tiny()).eval()
    model.save_pretrained(str(tmp_path))
    again = MiniMoEModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(1, 100, (2, 6))
    assert torch.equal(model(ids).last_hidden_state, again(ids).last_hidden_state)


def test_bad_student_configs_fail_with_one_line():
    with pytest.raises(ConfigError, match="--num_heads 5 must divide --hidden_size 32"):
        MiniMoEModel(tiny(num_heads=5))
    with pytest.raises(ConfigError, match="ep_size 3 must divide num_experts 4"):
        MiniMoEModel(tiny(), ep_size=3)
    with pytest.raises(ConfigError, match="not a MiniMoE student folder"):
        MiniMoEModel.from_pretrained("/nonexistent")


@pytest.mark.parametrize("route_padding", [False, True])
def test_local_dispatch_equals_deepspeed_dispatch(route_padding):
    """Same gate, same experts: exact per-expert slices give what DeepSpeed's padded buffers give."""
    torch.manual_seed(0)
    model = MiniMoEModel(tiny(gate_noise=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                              route_padding=route_padding)).double()  # float64: only real differences show
    ids = torch.randint(1, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    results = []
    for local in (True, False):
        for layer in model.layers:
            layer.ffn.local_dispatch = local
        model.zero_grad()
        out = model(ids, mask, output_qkv=True)
        (out.last_hidden_state.pow(2).sum() + out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert [c.tolist() for c in a.expert_counts] == [c.tolist() for c in b.expert_counts]
    assert ga.keys() == gb.keys()
    for n in ga:  # the gate computes in float32 on both paths, so compare at the scale of each gradient
        scale = float(gb[n].abs().max())
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6 * scale + 1e-12, rtol=1e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_bucketed_rows_are_few_and_pad_little():
    """oneDNN compiles a kernel per matmul shape: expert rows are padded to few counts, at a small price."""
    from minimoe.moe import bucketed_rows
    rows = [bucketed_rows(n) for n in range(1, 16385)]
    assert all(n <= r <= max(n + 63, n * 1.125) for n, r in zip(range(1, 16385), rows))
    assert len(set(rows)) == 48  # 8 counts below 512, then 8 per doubling up to 16384


@pytest.mark.parametrize("local", [True, False])
def test_bucketed_expert_rows_change_nothing_but_the_shapes(local, monkeypatch):
    """The rows that fill a bucket (copies of a token on the local path, zero rows in DeepSpeed's buffers)
    change no output and no gradient. Forced on in float64, where only a real difference would show."""
    import minimoe.moe as moe
    torch.manual_seed(0)
    model = MiniMoEModel(tiny(gate_noise=0.0, hidden_dropout=0.0, attention_dropout=0.0)).double()
    for layer in model.layers:
        layer.ffn.local_dispatch = local
    ids = torch.randint(1, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    shapes, results = [], []
    for bucketed in (False, True):
        monkeypatch.setattr(moe, "compiles_per_shape", lambda x, on=bucketed: on)
        seen = []  # rows of the first expert with any: a segment of the local path, DeepSpeed's capacity
        experts = model.layers[0].ffn.local_experts
        grouped = experts.grouped
        experts.grouped = lambda rows, counts: (seen.append(next(n for n in counts if n))
                                                or grouped(rows, counts))
        hook = experts.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[2]))
        model.zero_grad()
        out = model(ids, mask)
        (out.last_hidden_state.pow(2).sum() + out.aux_loss).backward()
        hook.remove()
        del experts.grouped
        shapes.append(seen)
        results.append((out.last_hidden_state, {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
    assert shapes[1][0] % 64 == 0 and shapes[1][0] > shapes[0][0]  # the bucket really was filled
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-12, rtol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("capacity_factor,capacity", [(1.0, 6), (2.0, 11), (None, 22)])
def test_drop_tokens_keeps_an_experts_first_capacity_tokens_and_zeroes_the_rest(capacity_factor, capacity):
    """A gate skewed to send every token to expert 0; 22 of 24 tokens routed (2 padding). With --drop_tokens
    the capacity is capacity_factor x the even share, ceil(22 / 4 x cf) (6, 11): expert 0 keeps its first
    ``capacity`` routed tokens, scaled by their gate probability, and the tokens past it get zero output.
    Dropless (None), every routed token is kept. Padding takes no place in the queue."""
    from minimoe.moe import MoEFeedForward
    torch.manual_seed(0)
    drop = capacity_factor is not None
    layer = MoEFeedForward(8, 16, 4, ep_size=1, dropout=0.0, gate_noise=0.0, drop_tokens=drop,
                           capacity_factor=capacity_factor or 1.0, route_padding=False,
                           local_dispatch=False).eval()
    with torch.no_grad():
        layer.gate.wg.weight.normal_(0.0, 0.01)
        layer.gate.wg.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    x = torch.randn(1, 24, 8)
    mask = torch.ones(1, 24, dtype=torch.long)
    mask[0, :2] = 0
    out, _, counts = layer(x, mask)
    assert counts.tolist() == [22, 0, 0, 0]  # counts are the routing, before any token is dropped
    with torch.no_grad():
        prob = torch.softmax(layer.gate.logits(x[0]), -1)[:, 0]
        want = layer.local_experts.expert(0, x[0]) * prob[:, None]
    kept = torch.zeros(24, dtype=torch.bool)
    kept[2:2 + capacity] = True
    torch.testing.assert_close(out[0][kept], want[kept])
    assert torch.count_nonzero(out[0][~kept]) == 0
