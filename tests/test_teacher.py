import pytest
import torch

from helpers import spawn, tiny_teacher
from minimoe.teacher import truncate_and_capture

ZERO3 = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _plain_qkv(path, layer):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path).eval()
    captured = {}
    attn = model.encoder.layer[layer].attention
    mods = (attn.self.query, attn.self.key, attn.self.value) if hasattr(attn, "self") else (attn.attn.q, attn.attn.k, attn.attn.v)
    for i, m in enumerate(mods):
        m.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out))
    b = _batch()
    kw = {k: v for k, v in b.items() if k != "token_type_ids" or model.config.model_type == "bert"}
    with torch.no_grad():
        model(**kw)
    return [captured[i] for i in range(3)]


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_capture_and_truncate_on_a_plain_model(tmp_path, kind):
    from transformers import AutoModel
    path = tiny_teacher(str(tmp_path / kind), kind)
    want = _plain_qkv(path, 1)
    model = AutoModel.from_pretrained(path).eval()
    cap = truncate_and_capture(model, 3, 1)
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    b = _batch()
    kw = {k: v for k, v in b.items() if k != "token_type_ids" or kind == "bert"}
    with torch.no_grad():
        model(**kw)
    for got, exp in zip(cap.pop(), want):
        torch.testing.assert_close(got, exp)


def _zero3_worker(rank, path, want):
    from minimoe.distributed import init_distributed
    from minimoe.teacher import Teacher
    init_distributed()
    teacher = Teacher(path, dict(ZERO3), layer=-1)
    # Really partitioned: each rank holds half of every weight matrix, never the whole model.
    params = list(teacher.engine.module.parameters())
    held = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    assert held <= total / 2 + 64 * len(params), (held, total)
    got = teacher.qkv(_batch())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_zero3_teacher_over_two_ranks_matches_the_plain_model(tmp_path, kind):
    path = tiny_teacher(str(tmp_path / kind), kind)
    want = _plain_qkv(path, 2)
    spawn(_zero3_worker, 2, path, want)
