"""Expert parallelism when the ranks' micro-batches differ in length (issue 19).

Every all-to-all of an expert-parallel group must see one buffer shape on every rank. Micro-batches
padded to their own longest sequence give the ranks different token counts, so the layer's capacity
has to be agreed across the group; these tests give the ranks unequal batches on purpose.
"""
import os

import pytest
import torch

from helpers import spawn
from minimoe.experts import per_expert
from minimoe.moe import MoEFeedForward

H, FFN, E = 16, 32, 4
# (padded width, real lengths) per rank: 26, 12, 3 and 16 token slots, of 18, 10, 1 and 16 real tokens.
LENGTHS = {0: (13, [13, 5]), 1: (4, [4, 4, 2]), 2: (3, [1]), 3: (8, [8, 8])}


def _inputs(rank):
    width, lengths = LENGTHS[rank]
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(len(lengths), width, H, generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    weight = torch.randn(len(lengths), width, H, generator=g)  # the loss is sum(out * weight)
    return x, mask, weight


def _layer(ep_size, drop_tokens, capacity_factor):
    return MoEFeedForward(H, FFN, E, ep_size, dropout=0.0, gate_noise=0.0, drop_tokens=drop_tokens,
                          capacity_factor=capacity_factor, route_padding=False)


def _reference_state():
    torch.manual_seed(0)
    layer = _layer(1, False, 1.0)
    for p in layer.parameters():  # random biases too: a zero bias hides a wrong combine weight
        torch.nn.init.normal_(p, std=0.3)
    return layer.state_dict()


def _global_expert(name, ep_rank, ep_size):
    """A local expert parameter's name in the ep_size-1 layer: local j of ep_rank is global
    ep_rank * E / ep_size + j (DeepSpeed's numbering)."""
    head, tail = name.split(".deepspeed_experts.")
    j, rest = tail.split(".", 1)
    return f"{head}.deepspeed_experts.{ep_rank * E // ep_size + int(j)}.{rest}"


def _ep_worker(rank, ep_size, drop_tokens, capacity_factor, out):
    from minimoe.distributed import init_distributed
    init_distributed()
    layer = _layer(ep_size, drop_tokens, capacity_factor)
    layer.moe.set_deepspeed_parallelism()
    def full_name(n):
        return _global_expert(n, rank % ep_size, ep_size) if ".deepspeed_experts." in n else n

    full = _reference_state()
    layer.load_state_dict({n: full[full_name(n)] for n in layer.state_dict()})
    x, mask, weight = _inputs(rank)
    x.requires_grad_(True)
    y, l_aux, counts = layer(x, mask)
    (y * weight).sum().backward()
    grads = {full_name(n): g for n, g in per_expert({n: p.grad for n, p in layer.named_parameters()}).items()}
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads, "counts": counts},
               os.path.join(out, f"{rank}.pt"))


def _kept(layer, rank, capacity):
    """Tokens an expert keeps when dropping: its first ``capacity`` routed tokens on that rank."""
    x, mask, _ = _inputs(rank)
    expert = layer.gate.logits(x.reshape(-1, H)).argmax(-1).tolist()
    keep, seen = [], [0] * E
    for e, used in zip(expert, mask.reshape(-1).tolist()):
        keep.append(bool(used) and seen[e] < capacity)
        seen[e] += bool(used)
    return torch.tensor(keep)


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size,drop_tokens,capacity_factor", [
    (2, 2, False, 1.0), (2, 2, True, float(E)), (2, 2, True, 0.5), (4, 4, False, 1.0), (4, 2, False, 1.0),
    (4, 2, True, 0.5)], ids=["w2-ep2-dropless", "w2-ep2-drop-roomy", "w2-ep2-drop-tight", "w4-ep4-dropless",
                             "w4-ep2-dropless", "w4-ep2-drop-tight"])
def test_moe_layer_with_unequal_token_counts_equals_ep1(tmp_path, world, ep_size, drop_tokens,
                                                        capacity_factor):
    """Outputs and gradients at ep_size > 1, ranks holding different token counts, equal the ep_size-1
    layer on the concatenated tokens (with token dropping: the tokens each expert keeps on each rank)."""
    spawn(_ep_worker, world, ep_size, drop_tokens, capacity_factor, str(tmp_path))
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]

    ref = _layer(1, False, 1.0)
    ref.load_state_dict(_reference_state())
    xs, masks, weights = zip(*(_inputs(r) for r in range(world)))
    flat = torch.cat([x.reshape(1, -1, H) for x in xs], 1).requires_grad_(True)
    y, _, counts = ref(flat, torch.cat([m.reshape(1, -1) for m in masks], 1))
    if drop_tokens:  # the capacity each expert-parallel group (consecutive ranks) agreed on
        group_of = [range(r - r % ep_size, r - r % ep_size + ep_size) for r in range(world)]
        capacity = [max(-(-max(int(masks[q].sum()) for q in group_of[r]) * capacity_factor // E), 4)
                    for r in range(world)]
        keep = torch.cat([_kept(ref, r, int(capacity[r])) for r in range(world)])
        real = torch.cat([m.reshape(-1) for m in masks]).bool()
        assert capacity_factor >= E or not keep[real].all()  # the tight cases really drop tokens
        y = y * keep[None, :, None]
    (y * torch.cat([w.reshape(1, -1, H) for w in weights], 1)).sum().backward()

    sizes = [x.numel() // H for x in xs]
    for r, (ref_y, ref_gx) in enumerate(zip(y[0].split(sizes), flat.grad[0].split(sizes))):
        torch.testing.assert_close(got[r]["y"].reshape(-1, H), ref_y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["x_grad"].reshape(-1, H), ref_gx, atol=1e-5, rtol=1e-5)
    assert torch.equal(sum(g["counts"] for g in got), counts)
    # Each rank's gradient covers the tokens of its own group: summed over the groups (what the engine's
    # data-parallel all-reduce does), the gate's and every expert's equal the ep_size-1 gradients.
    for name, grad in per_expert({n: p.grad for n, p in ref.named_parameters()}).items():
        mine = sum(g["grads"][name] for g in got if name in g["grads"])
        torch.testing.assert_close(mine, grad, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# The launchers, long enough to meet many unequal batches.

def _mixed_corpus(path, wiki, long_docs=1, short_docs=300):
    """A long Wikipedia article (windows of max_seq_length) and many one-line documents (a few
    tokens): a random micro-batch is short on one rank and long on the other most of the time."""
    import json
    import random
    rng = random.Random(0)
    with open(wiki) as fh:
        long_docs = [json.loads(line)["text"] for _, line in zip(range(long_docs), fh)]
    words = ["cats", "sleep", "dogs", "run", "rain", "falls", "rivers", "flow", "birds", "sing"]
    docs = long_docs + [" ".join(rng.choices(words, k=rng.randint(2, 6))).capitalize() + "."
                        for _ in range(short_docs)]
    rng.shuffle(docs)
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return path


def _unequal_steps(flags, steps):
    """How many of the run's steps give the two ranks micro-batches of different padded length."""
    from transformers import AutoTokenizer
    from minimoe.config import DistillConfig
    from minimoe.data import corpus as corpus_lib
    from minimoe.data.batches import GlobalBatches
    from minimoe.flags import from_flags
    cfg = from_flags(DistillConfig, flags)
    tok = AutoTokenizer.from_pretrained(cfg.teacher)
    corpus = corpus_lib.build_or_load(cfg.data, cfg.text_column, tok, cfg.max_seq_length, cfg.short_seq_prob,
                                      cfg.seed, cfg.cache_dir)
    ranks = [GlobalBatches(corpus, cfg.micro_batch_size, 1, 2, r, cfg.seed, 0) for r in (0, 1)]
    longest = [[[max(len(corpus.example(i)[0]) for i in idx) for idx in b.indices(s)] for b in ranks]
               for s in range(steps)]
    return sum(a != b for a, b in longest)


@pytest.mark.slow
@pytest.mark.parametrize("micro,resume", [(1, False), (2, True)])
def test_ep2_distillation_over_unequal_lengths_runs_to_the_end_and_resumes(assets, tmp_path, micro, resume):
    import json
    import shutil
    from helpers import deepspeed_cmd, flag_dict, read_jsonl, run_ok
    from minimoe.checkpoint import tag_for
    corpus = _mixed_corpus(tmp_path / "mixed.jsonl", assets / "wiki.jsonl")
    steps = 40
    f = flag_dict(assets, tmp_path / "run", data=str(corpus), micro_batch_size=micro, max_steps=steps,
                  save_every=10, log_every=2, cache_dir=str(tmp_path / "cache"))
    run_ok(deepspeed_cmd([f"--{k}={v}" for k, v in f.items()]))
    assert _unequal_steps(f, steps) >= steps // 3  # the run really met many unequal batches
    straight = {m["step"]: m["relation"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert max(straight) == steps and all(v == v for v in straight.values())
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["steps"] == steps
    if not resume:
        return

    # Resume from step 20 in a copy of the run folder: the same losses after it.
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "run", again, ignore=shutil.ignore_patterns("student", "summary.json"))
    resumed = {**f, "output_dir": str(again), "resume": str(again / "checkpoints" / tag_for(20))}
    run_ok(deepspeed_cmd([f"--{k}={v}" for k, v in resumed.items()]))
    rows = read_jsonl(again / "metrics.jsonl")  # the rows after step 20 were dropped, then logged again
    assert [m["step"] for m in rows] == sorted(straight)
    for m in rows:
        assert m["relation"] == pytest.approx(straight[m["step"]], rel=1e-5, abs=1e-7)


def _varied_sentiment(path, train=120, dev=25):
    """Sentiment files whose sentences run from 2 to 60 words (the label word first), dev of odd size."""
    import random
    from helpers import BAD, GOOD
    rng = random.Random(3)
    filler = ["the", "film", "was", "long", "and", "its", "plot", "kept", "going", "on", "with", "scenes"]
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", train), ("dev", dev), ("test", dev)):
        with open(os.path.join(path, f"{split}.tsv"), "w") as fh:
            fh.write("sentence\tlabel\n")
            for _ in range(n):
                y = rng.randint(0, 1)
                words = [rng.choice(GOOD if y else BAD)] + rng.choices(filler, k=rng.randint(1, 59))
                fh.write(f"{' '.join(words)}\t{y}\n")
    return str(path)


def _finetune_worker(rank, f):
    from minimoe.config import FinetuneConfig
    from minimoe.finetune import run
    from minimoe.flags import from_flags
    run(from_flags(FinetuneConfig, f))


@pytest.mark.slow
def test_ep2_finetuning_over_2_to_60_words_and_an_odd_dev_set_scores_as_one_process(tmp_path):
    """Micro-batch 3 of sentences of 2-60 words at ep_size 2, a dev set of 25 (13 + 12 over the ranks):
    training runs to the end and the engine's dev scores equal the exported model's in one process."""
    import json
    import shutil
    from helpers import TOKENIZER_FILES
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.config import PACKAGED_TEACHER
    from minimoe.data.assets import resolve_model
    from minimoe.task_eval import evaluate_folder
    student = tmp_path / "student"
    MiniMoEModel(StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128,
                               num_experts=4)).save_pretrained(str(student))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model(PACKAGED_TEACHER), name), student)
    data = _varied_sentiment(tmp_path / "sent")
    out = tmp_path / "run"
    f = {"model": str(student), "task": "sentiment", "data": data, "output_dir": str(out), "ep_size": 2,
         "micro_batch_size": 3, "max_seq_length": 64, "lr": 1e-3, "max_steps": 60, "eval_every": 20,
         "log_every": 10, "wandb": "disabled", "patience": 0}
    spawn(_finetune_worker, 2, f)
    res = json.load(open(out / "results.json"))
    assert [h["step"] for h in res["history"]] == [20, 40, 60]
    best = res["best"]
    again = evaluate_folder(str(out / "model"), "dev", data, 64, 4)
    assert again["examples"] == 25
    assert again["scores"] == pytest.approx(best["dev"]["dev"])
