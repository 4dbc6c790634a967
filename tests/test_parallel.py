"""Expert parallelism is exact: one clipped step at ep_size 2 equals the same step at ep_size 1."""
import pytest
import torch

from helpers import spawn
from minimoe import MiniMoEModel, StudentConfig
from minimoe.checkpoint import gather_state_dict

CFG = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_size=64, num_experts=4, vocab_size=100,
           hidden_dropout=0.0, attention_dropout=0.0, gate_noise=0.0)


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[rank, 7:] = 0
    return ids, mask


def _step_worker(rank, ep_size, stage, clip, out):
    from minimoe.distributed import init_distributed
    from minimoe.engine import build_student_engine
    init_distributed()
    torch.manual_seed(0)
    model = MiniMoEModel(StudentConfig(**CFG), ep_size=ep_size, ep_rank=rank % ep_size)
    ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "train_batch_size": 6,
          "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage}, "gradient_clipping": clip}
    engine = build_student_engine(model, ds)
    ids, mask = _batch(rank)
    o = engine(ids, mask, output_qkv=True)
    loss = sum(x.pow(2).mean() for x in o.qkv) + 0.01 * o.aux_loss
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="t")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [
    pytest.param(0, marks=pytest.mark.xfail(strict=True, reason="DeepSpeed 0.19: ZeRO-0 + EP misses "
                                                                "remote experts in the clip norm; minimoe "
                                                                "refuses this combination")),
    1, 2])
def test_one_clipped_step_at_ep2_equals_ep1(tmp_path, stage):
    torch.manual_seed(0)
    before = MiniMoEModel(StudentConfig(**CFG)).state_dict()
    states = {}
    for ep in (1, 2):
        spawn(_step_worker, 2, ep, stage, 0.05, str(tmp_path / f"ep{ep}"))
        states[ep] = gather_state_dict(str(tmp_path / f"ep{ep}" / "t"))
    assert states[1].keys() == states[2].keys() == before.keys()
    # Compare the updates, not the weights: an update is small next to its weight, and a wrongly
    # clipped step (ZeRO-0 + expert parallelism in DeepSpeed 0.19) differs only in the update's scale.
    moved = 0
    for k in before:
        d1, d2 = states[1][k] - before[k], states[2][k] - before[k]
        scale = float(d1.abs().max())
        # An update read back as after - before carries the fp32 rounding of weight + update, up to an ulp of
        # the weight: for an expert that few tokens reached (an update of 1e-6 on weights of 0.03) that is
        # 1.9e-9, more than any fraction of the update worth asking for. Beyond it, measured: ZeRO-1 and 2
        # differ by 1.9e-7 of the update's scale at most; ZeRO-0's wrong clip norm by 2.2e-5 on every tensor.
        # 1e-12 absorbs the key biases, whose gradient is rounding noise (softmax ignores them).
        ulp = torch.finfo(torch.float32).eps * float(before[k].abs().max())
        torch.testing.assert_close(d2, d1, atol=2e-6 * scale + ulp + 1e-12, rtol=0, msg=k)
        moved += int(scale > 0)
    assert moved > len(before) // 2  # the step really changed the weights, experts included
    expert = "layers.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"
    assert not torch.equal(states[2][expert], before[expert])
