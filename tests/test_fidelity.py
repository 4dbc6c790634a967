"""The paper's options: routers, relation dropout, the bert pair recipe, the preset; the held-out split."""
import math
import os
import random

import pytest
import torch

from helpers import spawn
from minimoe.config import ConfigError, DistillConfig, StudentConfig
from minimoe.data import corpus as corpus_lib
from minimoe.experts import per_expert
from minimoe.flags import from_flags
from minimoe.losses import relation_kl
from minimoe.moe import MoEFeedForward, fixed_route
from minimoe.student import MiniMoEModel, count_parameters

H, FFN, E = 16, 32, 4


# ---------------------------------------------------------------------- routers


def test_hash_router_sends_every_occurrence_of_a_token_to_one_expert_and_spreads_the_vocabulary():
    ids = torch.randint(0, 30522, (8, 64), generator=torch.Generator().manual_seed(0))
    experts = fixed_route("hash", ids, layer=0, num_experts=E).view(8, 64)
    by_token = {}
    for t, e in zip(ids.reshape(-1).tolist(), experts.reshape(-1).tolist()):
        assert by_token.setdefault(t, e) == e
    vocab = fixed_route("hash", torch.arange(30522)[None], 0, E)
    share = torch.bincount(vocab, minlength=E).float() / 30522
    assert share.min() > 0.23 and share.max() < 0.27
    assert not torch.equal(vocab, fixed_route("hash", torch.arange(30522)[None], 1, E))  # layers differ


def test_random_router_is_uniform_fixed_by_seed_and_salt_and_new_each_step():
    ids = torch.full((64, 128), 7)  # one token everywhere: only the position, seed and salt decide
    a = fixed_route("random", ids, 0, E, seed=776, salt=3)
    assert torch.equal(a, fixed_route("random", ids, 0, E, seed=776, salt=3))
    share = torch.bincount(a[:128], minlength=E).float() / 128  # one row: the positions spread the tokens
    assert share.min() > 0.1
    share = torch.bincount(fixed_route("random", torch.randint(0, 30522, (64, 128)), 0, E, 776, 3),
                           minlength=E).float() / (64 * 128)
    assert share.min() > 0.23 and share.max() < 0.27
    for other in (dict(seed=777, salt=3), dict(seed=776, salt=4)):
        b = fixed_route("random", ids, 0, E, **other)
        assert 0.6 < float((a != b).float().mean()) < 0.9  # about 3/4 of the tokens move


@pytest.mark.parametrize("router", ["random", "hash"])
def test_fixed_routers_have_no_gate_no_balance_loss_and_weight_one(router):
    torch.manual_seed(0)
    cfg = StudentConfig(num_layers=2, hidden_size=H, num_heads=2, ffn_size=FFN, num_experts=E, vocab_size=100,
                        router=router, hidden_dropout=0.0, attention_dropout=0.0)
    model = MiniMoEModel(cfg)
    assert not any("gate" in n for n, _ in model.named_parameters())
    assert count_parameters(cfg)["total"] == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("relation_proj"))
    ffn = model.layers[0].ffn
    x, ids = torch.randn(2, 5, H), torch.randint(1, 100, (2, 5))
    y, l_aux, counts = ffn(x, torch.ones(2, 5), ids)
    assert float(l_aux) == 0.0 and int(counts.sum()) == 10
    expert = fixed_route(router, ids, 0, E, cfg.router_seed, 0)
    for i, e in enumerate(expert.tolist()):  # each token: its expert's output, weight 1
        torch.testing.assert_close(y.reshape(-1, H)[i], ffn.local_experts.expert(e, x.reshape(-1, H)[i]))
    with pytest.raises(ValueError, match="token_ids"):
        ffn(x, None)


def test_a_random_router_draws_anew_each_training_forward_and_fixed_at_inference():
    torch.manual_seed(0)
    cfg = StudentConfig(num_layers=1, hidden_size=H, num_heads=2, ffn_size=FFN, num_experts=E,
                        vocab_size=1000, router="random", router_seed=5)
    ffn = MiniMoEModel(cfg).layers[0].ffn
    x, ids = torch.randn(4, 32, H), torch.randint(1, 1000, (4, 32))
    first, second = (ffn(x, None, ids)[2] for _ in range(2))
    assert int(ffn.route_draws) == 2 and not torch.equal(first, second)
    ffn.eval()
    assert torch.equal(ffn(x, None, ids)[2], ffn(x, None, ids)[2]) and int(ffn.route_draws) == 2
    with torch.no_grad():
        fresh = MiniMoEModel(cfg).layers[0].ffn.eval()
    assert torch.equal(fresh(x, None, ids)[2], ffn(x, None, ids)[2])  # inference: salt 0 in any process


def _layer(router, ep_size):
    return MoEFeedForward(H, FFN, E, ep_size, dropout=0.0, gate_noise=0.0, drop_tokens=False,
                          capacity_factor=1.0, route_padding=False, router=router, layer=1, router_seed=776)


def _inputs(rank):
    g = torch.Generator().manual_seed(10 + rank)
    width = (9, 14)[rank % 2]  # ranks of different lengths
    ids = torch.randint(1, 500, (3, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, width - 3:] = 0
    return torch.randn(3, width, H, generator=g), mask, ids, torch.randn(3, width, H, generator=g)


def _reference(router):
    torch.manual_seed(0)
    layer = _layer(router, 1)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _ep_worker(rank, router, out):
    from minimoe.distributed import init_distributed
    init_distributed()
    layer = _layer(router, 2)
    layer.moe.set_deepspeed_parallelism()
    full = _reference(router).state_dict()

    def name(n):  # local expert j of ep_rank r is global r * E / 2 + j
        if ".deepspeed_experts." not in n:
            return n
        head, tail = n.split(".deepspeed_experts.")
        j, rest = tail.split(".", 1)
        return f"{head}.deepspeed_experts.{rank * E // 2 + int(j)}.{rest}"

    layer.load_state_dict({n: full[name(n)] for n in layer.state_dict()})
    x, mask, ids, weight = _inputs(rank)
    x.requires_grad_(True)
    y, _, counts = layer(x, mask, ids)
    (y * weight).sum().backward()
    grads = per_expert({n: p.grad for n, p in layer.named_parameters()})
    torch.save({"y": y.detach(), "x_grad": x.grad, "counts": counts,
                "grads": {name(n): g for n, g in grads.items()}}, os.path.join(out, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("router", ["random", "hash"])
def test_fixed_routers_at_ep2_route_as_one_process_and_equal_it(tmp_path, router):
    """Each rank routes its own tokens as a single process would (the rule depends on the token, never on
    the rank), and outputs, input gradients and the experts' summed gradients equal the ep_size-1 layer."""
    spawn(_ep_worker, 2, router, str(tmp_path))
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    ref = _reference(router)
    for r in range(2):
        ref.route_draws.zero_() if router == "random" else None  # the first training forward of each rank
        x, mask, ids, weight = _inputs(r)
        x.requires_grad_(True)
        y, _, counts = ref(x, mask, ids)
        (y * weight).sum().backward()
        torch.testing.assert_close(got[r]["y"], y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[r]["counts"], counts)
    for name, grad in per_expert({n: p.grad for n, p in ref.named_parameters()}).items():
        torch.testing.assert_close(sum(g["grads"][name] for g in got if name in g["grads"]), grad,
                                   atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------- relation dropout


def _relations(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(2, 7, 24, generator=g) for _ in range(3)]
    s = [torch.randn(2, 7, 16, generator=g).requires_grad_(True) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return t, s, mask


def test_relation_dropout_off_is_the_plain_loss_and_draws_nothing():
    t, s, mask = _relations()
    state = torch.get_rng_state()
    off = relation_kl(t, s, mask, 4, dropout=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(off, relation_kl(t, s, mask, 4))


def test_relation_dropout_equals_the_authors_loss_and_its_gradient():
    """The fused loss with dropout p equals, value and gradient, autograd through the authors' form:
    ``KL(t || dropout(softmax(s)))`` with ``log(p + 1e-7)``, masks drawn in the same order."""
    t, s, mask = _relations()
    heads, p = 4, 0.1
    state = torch.get_rng_state()
    fused = relation_kl(t, s, mask, heads, dropout=p)
    g_fused = torch.autograd.grad(fused, s)
    torch.set_rng_state(state)

    def scores(x):
        b, n, h = x.shape
        xs = x.view(b, n, heads, h // heads).transpose(1, 2)
        sc = xs @ xs.transpose(-1, -2) / math.sqrt(h // heads)
        return sc.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)

    total = 0
    for tt, ss in zip(t, s):
        t_logp = torch.log_softmax(scores(tt), -1)
        keep = torch.empty(2 * heads, 7, 7).bernoulli_(1 - p).div_(1 - p).view(2, heads, 7, 7)
        s_logp = torch.log(torch.softmax(scores(ss), -1) * keep + 1e-7)
        rows = (t_logp.exp() * (t_logp - s_logp)).sum(-1) * mask[:, None, :]
        total = total + rows.sum() / (mask.sum() * heads)
    total = total / 3
    torch.testing.assert_close(fused, total, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, torch.autograd.grad(total, s)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # dropped mass costs log(1e-7)
    assert float(fused.detach()) > float(relation_kl(t, s, mask, heads).detach()) + 0.5


# ---------------------------------------------------------------------- pair recipes


def _documents(n=40, sentences=12):
    """Document d's sentences hold token ids d * 1000 + ...: a segment's document is readable from its ids."""
    rng = random.Random(1)
    return [[[d * 1000 + rng.randrange(1000) for _ in range(rng.randint(8, 20))] for _ in range(sentences)]
            for d in range(n)]


def test_bert_recipe_takes_segment_b_from_another_document_about_half_of_the_time():
    docs = _documents()
    rng = random.Random(0)
    own = other = 0
    for d, doc in enumerate(docs):
        for a, b in corpus_lib.document_pairs(doc, 125, 0.1, rng, docs[:d] + docs[d + 1:]):
            assert {t // 1000 for t in a} == {d}  # A is always the document's own text
            b_docs = {t // 1000 for t in b}
            assert len(b_docs) == 1
            own += b_docs == {d}
            other += b_docs != {d}
    assert 0.4 < other / (own + other) < 0.65, (own, other)
    rng = random.Random(0)  # the contiguous recipe: B is always the continuation
    for d, doc in enumerate(docs[:10]):
        for a, b in corpus_lib.document_pairs(doc, 125, 0.1, rng):
            assert {t // 1000 for t in a + b} == {d}


def test_bert_recipe_puts_back_the_sentences_a_random_b_did_not_use():
    docs = _documents(n=30)
    rng = random.Random(0)
    used = {d: 0 for d in range(len(docs))}
    for d, doc in enumerate(docs):
        for a, _ in corpus_lib.document_pairs(doc, 125, 0.0, rng, docs[:d] + docs[d + 1:]):
            used[d] += len(a)
    # A segments alone cover more of each document than half: the unused continuations were packed again
    assert sum(used.values()) > 0.6 * sum(len(s) for doc in docs for s in doc)


def test_bert_sentence_split_ends_at_semicolons_and_drops_short_sentences():
    text = ("The first sentence has exactly eight words in it; the second clause also has eight words here. "
            "Too short. lower case starts count too when it has eight words or more")
    assert corpus_lib.split_sentences(text, "bert") == [
        "The first sentence has exactly eight words in it;", "the second clause also has eight words here.",
        "lower case starts count too when it has eight words or more"]
    assert len(corpus_lib.split_sentences(text)) == 2  # the default: capitalised starts, no ';', all kept


# ---------------------------------------------------------------------- held-out split


def test_held_out_documents_are_chosen_by_their_text_alone_and_never_trained_on():
    docs = [f"document number {i} with some text" for i in range(2000)]
    held = [d for d in docs if corpus_lib.held_out(d, 0.1)]
    assert 150 < len(held) < 250
    assert list(corpus_lib.select_documents(reversed(docs), 0.1, "eval")) == held[::-1]  # order-free
    train = list(corpus_lib.select_documents(docs, 0.1, "train"))
    assert len(train) + len(held) == len(docs) and not set(train) & set(held)
    assert list(corpus_lib.select_documents(docs, 0.0, "train")) == docs
    assert set(held) <= {d for d in docs if corpus_lib.held_out(d, 0.2)}  # a larger fraction holds out more


# ---------------------------------------------------------------------- flags


def test_preset_paper_sets_the_recipe_and_the_command_line_wins():
    cfg = from_flags(DistillConfig, {"preset": "paper"})
    assert (cfg.teacher, cfg.global_batch, cfg.num_epochs, cfg.max_steps, cfg.lr, cfg.warmup_ratio,
            cfg.gradient_clipping, cfg.precision, cfg.seed, cfg.relation_dropout, cfg.pair_recipe) == (
        "bert-base-uncased", 1024, 5.0, -1, 3e-4, 0.01, 5.0, "mixed", 776, 0.1, "bert")
    cfg = from_flags(DistillConfig, {"preset": "paper", "max_steps": 100, "lr": 1e-4, "teacher": "x"})
    assert (cfg.max_steps, cfg.lr, cfg.teacher, cfg.relation_dropout) == (100, 1e-4, "x", 0.1)
    with pytest.raises(ConfigError, match="--preset 'bert'"):
        from_flags(DistillConfig, {"preset": "bert"})


def test_dry_run_commands_carry_the_presets_values_not_the_preset():
    """--dry_run's launch commands rebuild the same run: the preset's values one by one, so a flag the command
    line set back to its default (here the teacher) is not overridden again by the preset."""
    from minimoe.flags import to_flags
    cfg = from_flags(DistillConfig, {"preset": "paper", "teacher": "packaged:all-MiniLM-L6-v2"})
    replay = dict(to_flags(cfg))
    assert "preset" not in replay and replay["relation_dropout"] == 0.1
    import dataclasses
    assert from_flags(DistillConfig, replay) == dataclasses.replace(cfg, preset="")


@pytest.mark.parametrize("flags,message", [
    ({"router": "switch"}, "--router 'switch' is invalid: allowed learned, random, hash"),
    ({"pair_recipe": "nsp"}, "--pair_recipe 'nsp' is invalid"),
    ({"relation_dropout": 1.0}, "--relation_dropout 1.0 is invalid"),
    ({"eval_fraction": 0.5, "eval_data": "x.txt"}, "both name held-out text"),
    ({"eval_every": 10}, "--eval_every 10 scores held-out text"),
    ({"global_batch": 64, "grad_accum": 2}, "both set the gradient accumulation"),
])
def test_bad_option_values_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        from_flags(DistillConfig, flags)


def test_the_random_routers_draw_count_is_checkpointed_but_not_exported(tmp_path):
    from safetensors.torch import load_file
    cfg = StudentConfig(num_layers=2, hidden_size=H, num_heads=2, ffn_size=FFN, num_experts=E, vocab_size=100,
                        router="random")
    model = MiniMoEModel(cfg)
    assert "layers.1.ffn.route_draws" in model.state_dict()  # DeepSpeed checkpoints carry it: resumes draw on
    model.save_pretrained(str(tmp_path))
    assert not any("route_draws" in k for k in load_file(str(tmp_path / "model.safetensors")))
    assert MiniMoEModel.from_pretrained(str(tmp_path)).config.router == "random"


# ---------------------------------------------------------------------- the launchers


def _teacher_qkv(path, batch):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path).eval()
    captured = {}
    attn = model.encoder.layer[-1].attention.self
    for i, m in enumerate((attn.query, attn.key, attn.value)):
        m.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out))
    with torch.no_grad():
        model(**batch)
    return [captured[i] for i in range(3)]


@pytest.mark.slow
def test_held_out_scoring_leaves_training_unchanged_and_scores_what_it_says(assets, tmp_path):
    """Scoring every 2 steps trains exactly as scoring only at the end (same per-step losses, same weights),
    and the score equals the exported student's relation loss on the held-out pairs, recomputed here in
    eval mode (no dropout, no gate noise) from the plain teacher."""
    import json
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from helpers import deepspeed_cmd, flags, read_jsonl, run_ok
    from minimoe import heldout
    from minimoe.data.batches import collate
    runs = {}
    for every in (2, 0):
        out = tmp_path / f"every{every}"
        run_ok(deepspeed_cmd(flags(assets, out, max_steps=8, eval_fraction=0.3, eval_every=every,
                                   save_every=0)))
        runs[every] = out
    rows = {e: read_jsonl(str(o / "metrics.jsonl")) for e, o in runs.items()}
    train = {e: [(r["step"], r["relation"], r["load_balance"]) for r in rows[e] if "relation" in r]
             for e in runs}
    assert train[2] == train[0] and len(train[0]) == 8
    assert [r["step"] for r in rows[2] if "heldout_relation" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in rows[0] if "heldout_relation" in r] == [8]
    weights = {e: load_file(str(o / "student" / "model.safetensors")) for e, o in runs.items()}
    assert all(torch.equal(weights[2][k], weights[0][k]) for k in weights[0])

    summary = json.load(open(runs[0] / "summary.json"))["heldout"]
    assert summary["step"] == 8 and 0 < summary["routing_entropy"] <= 1 and summary["max_load"] >= 1
    tok = AutoTokenizer.from_pretrained(str(assets / "teacher"))
    held = heldout.build(str(assets / "wiki.jsonl"), "", 0.3, "text", tok, 64, 0.1, "contiguous", 512)
    assert summary["pairs"] == len(held.examples) and summary["tokens"] == held.tokens
    student = MiniMoEModel.from_pretrained(str(runs[0] / "student")).eval()
    total = {"qq": 0.0, "kk": 0.0, "vv": 0.0}
    tokens = 0
    for i in range(0, len(held.examples), 4):  # the run's micro-batches, each weighted by its tokens
        batch = collate(held.examples[i:i + 4], tok.pad_token_id)
        with torch.no_grad():
            s = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        output_qkv=True).qkv
        t = _teacher_qkv(str(assets / "teacher"), batch)
        n = int(batch["attention_mask"].sum())
        for k, tt, ss in zip(total, t, s):
            total[k] += float(relation_kl((tt,), (ss,), batch["attention_mask"], 8)) * n
        tokens += n
    for k in total:
        assert summary[k] == pytest.approx(total[k] / tokens, rel=1e-4), k
    assert summary["relation"] == pytest.approx(sum(total.values()) / tokens / 3, rel=1e-4)
    card = open(runs[0] / "student" / "README.md").read()
    assert "held-out relation loss" in card and (runs[0] / "relation.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("router", ["random", "hash"])
def test_a_fixed_router_student_trains_at_ep2_and_exports_with_its_rule(assets, tmp_path, router):
    """Distilled at ep_size 2 with the bert recipe and relation dropout, exported: the Hugging Face folder
    (remote code) and the ONNX graph give the student's own outputs, so they route by the same rule."""
    import subprocess
    import sys
    from transformers import AutoModel
    from helpers import REPO, deepspeed_cmd, env, flags, run_ok
    out = tmp_path / "run"
    run_ok(deepspeed_cmd(flags(assets, out, max_steps=4, save_every=0, router=router, pair_recipe="bert",
                               relation_dropout=0.1)))
    student = MiniMoEModel.from_pretrained(str(out / "student")).eval()
    assert (student.config.router == router
            and student.config.router_seed == (776 if router == "random" else 0))
    ids = torch.randint(1000, 2000, (3, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    with torch.no_grad():
        want = student(ids, mask).last_hidden_state
        hf = AutoModel.from_pretrained(str(out / "student"), trust_remote_code=True).eval()
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).last_hidden_state, want, atol=1e-6,
                                   rtol=1e-6)
    p = subprocess.run([sys.executable, f"{REPO}/launchers/export.py", "--model", str(out), "--format",
                        "onnx", "--output_dir", str(tmp_path / "onnx")], env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                             "token_type_ids": torch.zeros_like(ids).numpy()})[0]
    # measured: 9.5e-7 (random) and 1.4e-6 (hash); the Hugging Face folder gave exactly the student's outputs
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
