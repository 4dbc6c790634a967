"""Task-agnostic distillation: teacher Q/K/V relations -> MiniMoE student, one DeepSpeed step at a time.

Order of work (data flows one way): validate everything that can be checked without a process group
-> start the process group -> teacher engine -> tokenised corpus -> student engine (+ resume) -> loop
-> checkpoint / export -> summary. Nothing is written to ``output_dir`` before the corpus is ready.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import checkpoint, heldout, placement as placement_lib, plots, runlock, weights
from .commands import dry_run
from .config import ConfigError, DistillConfig, StudentConfig, check_output_dir
from .data import assets, corpus as corpus_lib, readers
from .data.batches import GlobalBatches, StreamingBatches
from .distributed import accelerator_name, agree, device
from .engine import (build_student_engine, dtype_of, fill_schedule, pop_precision, student_ds_config,
                     teacher_ds_config, zero_stage)
from .export.card import command_line, student_card
from .export.hf import export_student
from .layout import Layout, plan_layout, run_world
from .losses import relation_kl
from .monitor import expert_utilisation, gather_peak_rss
from .student import MiniMoEModel, count_parameters, flops_per_sequence, student_shape
from .students import StudentPlan, check_fit, describe_students, expand
from .teacher import Teacher, parameter_count, resolve_layer, teacher_info, truncated_config
from .trainer import Cadence, Member, Trainer, start


@dataclass
class Plan:
    """Everything validated before the process group starts."""

    accelerator: str
    teacher: str
    data: str
    tokenizer: object
    students: list[StudentPlan]
    resume: Optional[tuple]
    teacher_ds: dict
    resume_clients: dict        # each student's checkpoint loop state (step, global batch, student, layout)
    held: Optional[heldout.HeldOutSet] = None  # the held-out pairs (--eval_data / --eval_fraction)

    @property
    def layout(self) -> Layout:
        """The run's world, batch and teacher placement (the same for every student)."""
        return self.students[0].layout

    @property
    def world_size(self) -> int:
        return self.layout.world_size


def plan(cfg: DistillConfig) -> Plan:
    from transformers import AutoTokenizer
    members = expand(cfg)  # --students: each entry as its own run's config, validated
    world = run_world(cfg.launch, dict(os.environ))
    accel = accelerator_name()
    teacher = assets.resolve_model(cfg.teacher)
    info = teacher_info(teacher)
    for name, one in members:
        if info.hidden_size % one.relation_heads:
            raise ConfigError(f"{_who(name)}--relation_heads {one.relation_heads} must divide the teacher "
                              f"hidden size {info.hidden_size}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher {teacher!r} has no loadable tokenizer: {str(e).splitlines()[0]}")
    assets.check_tokenizer(tokenizer, info.vocab_size, teacher, "--teacher")
    if os.path.isdir(teacher):  # a hub name is fetched (and checked by the hub's hashes) later
        weights.check_files(teacher)
    check_output_dir(cfg.output_dir)
    check_output_dir(assets.default_cache_dir(cfg.cache_dir), "--cache_dir")
    layer = resolve_layer(cfg.teacher_layer, info.num_layers)
    teacher_params = parameter_count(truncated_config(teacher, layer))
    memory = placement_lib.memory_per_rank(world.hosts[0][1])
    students, t_ds, placement = [], None, None
    for name, one in members:
        student = dataclasses.replace(one.student, vocab_size=info.vocab_size,
                                      pad_token_id=tokenizer.pad_token_id,
                                      router_seed=cfg.seed if one.student.router == "random" else 0)
        s_ds = student_ds_config(one, world.size, accel)
        precision = pop_precision(s_ds)
        micro = s_ds["train_micro_batch_size_per_gpu"]
        if t_ds is None:  # the teacher is planned once, from the run's (the first student's) batch
            t_ds = teacher_ds_config(cfg, world.size, micro, accel,
                                     layer_params=teacher_params // (layer + 1))
            teacher_bytes = teacher_params * dtype_of(t_ds["_minimoe_precision"]).itemsize
            placement = placement_lib.choose(cfg.teacher_placement, placement_lib.file_placement(t_ds),
                                             teacher_bytes, world.size, accel, *memory)
        try:
            layout = plan_layout(world, one.ep_size, student_shape(student), micro,
                                 s_ds["gradient_accumulation_steps"], zero_stage(s_ds), precision, placement,
                                 teacher_bytes)
        except ConfigError as e:
            raise ConfigError(f"{_who(name)}{e}") from None
        # What the student learns to match: a resumed run must keep it.
        target = {"teacher_hidden_size": info.hidden_size, "teacher_layer": layer,
                  "relation_heads": one.relation_heads}
        students.append(StudentPlan(name, one, student, layout, s_ds, target))
    if len(students) > 1:
        check_fit(students, memory[0])
    data = assets.resolve_corpus(cfg.data, cfg.cache_dir)
    eval_data = assets.resolve_corpus(cfg.eval_data, cfg.cache_dir) if cfg.eval_data else ""
    for source in filter(None, (data, eval_data)):
        readers.check_source(source, cfg.text_column)
    held = heldout.build(data, eval_data, cfg.eval_fraction, cfg.text_column, tokenizer, cfg.max_seq_length,
                         cfg.short_seq_prob, cfg.pair_recipe, cfg.eval_pairs)
    by_name = {sp.name: sp for sp in students}

    def same_student_and_target(member: str, client: dict) -> None:
        sp = by_name[member]
        saved_target = client.get("minimoe_target", sp.target)  # older checkpoints did not record it
        changed = sorted(k for k in sp.target if saved_target.get(k) != sp.target[k])
        if changed:
            raise ConfigError(f"--resume: {_who(member)}the checkpoint distilled another target: {changed} "
                              f"were {[saved_target.get(k) for k in changed]}, this run has "
                              f"{[sp.target[k] for k in changed]}")
        # a key the checkpoint lacks is a field added since: it had that field's default
        saved = {**StudentConfig().to_dict(), **(client.get("minimoe_student") or {})}
        diff = sorted(k for k, v in sp.student.to_dict().items() if saved.get(k) != v)
        if diff:
            raise ConfigError(f"--resume: {_who(member)}the checkpoint's student differs from this run's "
                              f"in {diff}")

    layout = students[0].layout
    resume, resume_clients = checkpoint.plan_resume(
        cfg, layout.global_batch, f"{layout.micro_batch} x {layout.grad_accum} x {layout.world_size} ranks",
        same_student_and_target, members=tuple(by_name))
    return Plan(accel, teacher, data, tokenizer, students, resume, t_ds, resume_clients, held)


def _who(name: str) -> str:
    return f"student {name!r}: " if name else ""


def _load_corpus(cfg: DistillConfig, p: Plan):
    """Rank 0 tokenises (or finds the cache); the others wait, then load. Errors reach every rank."""
    cache = assets.default_cache_dir(cfg.cache_dir)
    args = (p.data, cfg.text_column, p.tokenizer, cfg.max_seq_length, cfg.short_seq_prob, cfg.seed, cache)
    kw = {"split": (cfg.eval_fraction, "train"), "recipe": cfg.pair_recipe}
    agree(lambda: corpus_lib.build_or_load(*args, progress=True, **kw), main_only=True)
    return corpus_lib.build_or_load(*args, **kw)


def _streaming_batches(cfg: DistillConfig, p: Plan, rank: int, micro: int, accum: int) -> StreamingBatches:
    template = corpus_lib.PairTemplate.from_tokenizer(p.tokenizer)

    def make_examples(epoch: int, rank: int, world: int):
        docs = corpus_lib.select_documents(readers.iter_documents(p.data, cfg.text_column, streaming=True),
                                           cfg.eval_fraction, "train")
        docs = (d for i, d in enumerate(docs) if i % world == rank)
        return corpus_lib.iter_examples(docs, p.tokenizer, template, cfg.max_seq_length, cfg.short_seq_prob,
                                        cfg.seed + 7919 * epoch + rank, recipe=cfg.pair_recipe)

    return StreamingBatches(make_examples, micro, accum, p.world_size, rank, cfg.seed,
                            p.tokenizer.pad_token_id)


def run(cfg: DistillConfig) -> dict:
    p = plan(cfg)
    multi = p.students[0].name != ""
    if cfg.launch.dry_run:
        return dry_run(cfg, p.layout, "launchers/distill.py", describe_students(p.students) if multi else "")
    dist_info = start(cfg.seed)
    import torch.distributed as dist
    dev = device()

    t_ds = copy.deepcopy(p.teacher_ds)
    micro, accum = p.layout.micro_batch, p.layout.grad_accum
    if cfg.streaming:
        batches, corpus_size = _streaming_batches(cfg, p, dist_info.rank, micro, accum), None
        total_steps = cfg.max_steps
    else:
        corpus = _load_corpus(cfg, p)
        corpus_size = len(corpus)
        batches = GlobalBatches(corpus, micro, accum, p.world_size, dist_info.rank, cfg.seed,
                                p.tokenizer.pad_token_id)
        total_steps = batches.total_steps(cfg.max_steps, cfg.num_epochs, f"--data {cfg.data!r}")

    placement = p.layout.placement
    if dist_info.is_main:  # the plan of the run, as --dry_run shows it (also in run_config.json)
        print(p.layout.describe() + ("\n" + describe_students(p.students) if multi else ""), flush=True)
    teacher = Teacher(p.teacher, t_ds, cfg.teacher_layer, dtype_of(pop_precision(t_ds)), placement)

    members = []
    init_rng = torch.get_rng_state()
    for sp in p.students:
        torch.set_rng_state(init_rng)  # each student starts from the weights its own run would draw
        model = MiniMoEModel(sp.student, ep_size=sp.cfg.ep_size, ep_rank=sp.layout.ep_rank(dist_info.rank))
        model.pooler.requires_grad_(False)  # not part of the distillation loss; fine-tuning trains it
        ds = fill_schedule(copy.deepcopy(sp.ds), sp.cfg, total_steps)
        engine = build_student_engine(model, ds, f"--ds_config {cfg.ds_config}")

        def client_state(step: int, sp=sp) -> dict:
            return {"minimoe_global_batch": batches.global_batch, "minimoe_student": sp.student.to_dict(),
                    "minimoe_samples_seen": step * batches.global_batch, "minimoe_world_size": p.world_size,
                    "minimoe_ep_size": sp.cfg.ep_size, "minimoe_target": sp.target}

        members.append(Member(engine, sp.layout, client_state, name=sp.name, cfg=sp.cfg))

    held = p.held and heldout.HeldOutLoss(p.held, micro, dist_info.rank, p.world_size,
                                          p.tokenizer.pad_token_id, dev)
    spec = Distillation(batches, teacher, dev, held)
    eval_every = (cfg.eval_every or total_steps) if held else 0  # 0: at the end only
    trainer = Trainer(spec, members, cfg, dist_info,
                      Cadence(total_steps, cfg.log_every, cfg.save_every, eval_every))
    start_step = trainer.resume(p.resume, p.resume_clients)
    common = {"command": command_line(), "world_size": p.world_size, "global_batch": batches.global_batch,
              "total_steps": total_steps, "corpus_pairs": corpus_size,
              "teacher_placement": {"kind": placement.kind, "reason": placement.reason,
                                    "teacher_bytes": p.layout.teacher_bytes,
                                    "bytes_per_rank": teacher.bytes_per_rank()}}
    configs = {sp.name: {**sp.cfg.to_dict(), **common, "student": sp.student.to_dict(),
                         "layout": sp.layout.describe().splitlines()} for sp in p.students}
    run_config = configs[""] if not multi else {
        **cfg.to_dict(), **common, "students": configs, "layout": p.layout.describe().splitlines()}
    monitor = trainer.open_run(run_config, start_step)

    wall0 = time.perf_counter()
    trainer.fit(start_step)
    wall = time.perf_counter() - wall0

    rss = gather_peak_rss()
    summaries = {}
    for sp, m in zip(p.students, members):
        summary = summaries[sp.name] = _summary(sp, p, m.history, wall, total_steps - start_step, total_steps,
                                                rss, teacher, batches.global_batch, spec.heldout.get(sp.name))
        if dist_info.is_main:
            folder = os.path.join(cfg.output_dir, sp.folder)
            plots.relation_curves(os.path.join(folder, "metrics.jsonl"), os.path.join(folder, "relation.png"),
                                  sp.name or os.path.basename(os.path.abspath(cfg.output_dir)))
            name = sp.name or os.path.basename(os.path.abspath(cfg.output_dir))
            final = os.path.join(trainer.ckpt_root, checkpoint.tag_for(total_steps), sp.name)
            card_text = student_card(name, sp.student, configs[sp.name], summary)
            export_student(checkpoint.gather_state_dict(final), os.path.join(folder, "student"), sp.student,
                           p.tokenizer, card_text, where=f"checkpoint {final!r}")
            if multi:  # a student's folder reads like a single-student run's (launchers/export.py takes it)
                with open(os.path.join(folder, "run_config.json"), "w") as fh:
                    json.dump(configs[sp.name], fh, indent=2, default=str)
            with open(os.path.join(folder, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            monitor.write((f"student {sp.name}: " if multi else "") + format_summary(summary))
    result = summaries[""] if not multi else {"students": summaries, "wall_s": wall,
                                              "steps": total_steps - start_step}
    if dist_info.is_main and multi:
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
            json.dump(result, fh, indent=2)
    monitor.close(summaries[""] if not multi else {f"{n}/{k}": v for n, s in summaries.items()
                                                  for k, v in s.items() if not isinstance(v, (dict, list))})
    dist.barrier()
    runlock.release()
    return result


class Distillation:
    """The distillation stage of the training loop (``trainer.TrainSpec``): the teacher's Q/K/V are the
    shared forward, each student's relation KL plus its load balance its loss."""

    desc = "distill"

    def __init__(self, batches, teacher: Teacher, dev, held: Optional[heldout.HeldOutLoss] = None):
        self.batches, self.teacher, self.dev, self.held = batches, teacher, dev, held
        self._teacher_s = 0.0
        self.heldout: dict[str, dict] = {}  # each student's last held-out scores

    def micro_batches(self, step: int) -> list[dict]:
        return [{k: v.to(self.dev) for k, v in b.items()} for b in self.batches.micro_batches(step)]

    def shared_forward(self, batch: dict):
        t0 = time.perf_counter()
        qkv = self.teacher.qkv(batch)
        self._teacher_s = time.perf_counter() - t0
        return qkv

    def loss(self, member, batch: dict, t_qkv):
        cfg = member.cfg
        out = member.engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            output_qkv=True)
        relation = relation_kl(t_qkv, out.qkv, batch["attention_mask"], cfg.relation_heads,
                               dropout=cfg.relation_dropout)
        return relation + cfg.load_balance_weight * out.aux_loss, (relation, out, self._teacher_s)

    def window(self, member) -> "_Window":
        return _Window(member.cfg.load_balance_weight)

    def evaluate(self, members, step: int) -> list[tuple[dict, str]]:
        out = []
        for m, scores in zip(members, self.held.evaluate(members, self.teacher)):
            self.heldout[m.name] = {"step": step, **scores}
            who = f"student {m.name} " if m.name else ""
            line = (f"step {step}: {who}held-out relation {scores['relation']:.4f} (Q-Q {scores['qq']:.4f}, "
                    f"K-K {scores['kk']:.4f}, V-V {scores['vv']:.4f})")
            if "routing_entropy" in scores:
                line += (f", routing entropy {scores['routing_entropy']:.3f}, "
                         f"max load {scores['max_load']:.2f}")
            out.append(({f"heldout_{k}": v for k, v in scores.items()}, line))
        return out

    def should_stop(self) -> str:
        return ""

    def improved(self) -> bool:
        return False

    def loop_state(self) -> dict:
        return {}

    def load_loop_state(self, state: dict) -> None:
        pass


class _Window:
    """Sums over the steps between two log lines; reduced across ranks when logged."""

    def __init__(self, load_balance_weight: float):
        self.weight = load_balance_weight
        self.relation = self.aux = self.micro = self.tokens = self.padded = 0.0
        self.teacher_s = self.step_time = self.member_s = 0.0
        self.counts = None
        self.steps = 0

    def add(self, batch, record):
        relation, out, teacher_s = record
        self.relation += float(relation.detach())
        self.aux += float(out.aux_loss.detach())
        self.micro += 1
        self.tokens += float(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.teacher_s += teacher_s
        if out.expert_counts:
            c = torch.stack([x.detach().float().cpu() for x in out.expert_counts])
            self.counts = c if self.counts is None else self.counts + c

    def reduce(self, world_size: int):
        import torch.distributed as dist
        v = torch.tensor([self.relation, self.aux, self.micro, self.tokens, self.padded, self.teacher_s,
                          self.step_time, self.member_s], dtype=torch.float64)
        dist.all_reduce(v)
        relation, aux, micro, tokens, padded, teacher_s, step_time, member_s = v.tolist()
        step_time /= world_size  # every rank times the same steps
        metrics = {"relation": relation / micro, "load_balance": aux / micro,
                   "tokens": tokens, "tokens_per_s": tokens / step_time,
                   "padded_tokens_per_s": padded / step_time,
                   "loss": (relation + self.weight * aux) / micro,
                   "step_s": step_time / self.steps, "teacher_share": teacher_s / world_size / step_time,
                   "student_share": member_s / world_size / step_time}
        util = None
        if self.counts is not None:
            c = self.counts.clone()
            dist.all_reduce(c)
            util = expert_utilisation(list(c))
        return metrics, util


def _summary(sp: StudentPlan, p: Plan, history, wall, steps, total_steps, rss, teacher, global_batch,
             held: Optional[dict]) -> dict:
    dense = dataclasses.replace(sp.student, num_experts=1, relation_projection=False)
    table = {}
    for name, sc in (("student", sp.student), ("dense_twin", dense)):
        c = count_parameters(sc)
        f = flops_per_sequence(sc, sp.cfg.max_seq_length)
        table[name] = {"params_total_M": c["total"] / 1e6, "params_active_M": c["active"] / 1e6,
                       "paper_gflops": f["paper_gflops"], "forward_gflops": f["forward_flops"] / 1e9}
    tokens_per_s = [h["tokens_per_s"] for h in history]
    return {
        "steps": steps, "total_steps": total_steps, "wall_s": wall,
        "steps_per_s": steps / wall if wall else 0.0,
        "tokens_per_s": sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else 0.0,
        "relation_first": history[0]["relation"] if history else None,
        "relation_last": history[-1]["relation"] if history else None,
        "tokens_seen": int(sum(h["tokens"] for h in history)),
        "global_batch": global_batch, "world_size": p.world_size, "ep_size": sp.cfg.ep_size,
        "peak_rss_mib_per_rank": rss,
        "teacher": {"name": p.teacher, "hidden_size": teacher.info.hidden_size,
                    "layers": teacher.info.num_layers, "placement": teacher.placement.kind,
                    "bytes_per_rank": teacher.bytes_per_rank()},
        "models": table,
        "heldout": None if held is None else {**held, "pairs": len(p.held.examples), "tokens": p.held.tokens,
                                              "source": p.held.source},
    }


def format_summary(s: dict) -> str:
    done = (f"done: {s['steps']} steps in {s['wall_s']:.1f} s ({s['steps_per_s']:.3f} steps/s, "
            f"{s['tokens_per_s']:.0f} tokens/s), relation loss {s['relation_first']:.4f} -> "
            f"{s['relation_last']:.4f}"
            if s["relation_first"] is not None
            else "done: the checkpoint was already at the last step; exported it")
    held = s.get("heldout")
    if held:
        done += (f"; held-out relation {held['relation']:.4f} ({held['pairs']} pairs, dropout and gate noise "
                 "off)")
    lines = [done, f"peak RSS per rank (MiB): {s['peak_rss_mib_per_rank']}",
             f"{'model':<12}{'params':>10}{'active':>10}{'paper GFLOPs':>14}{'fwd GFLOPs':>12}"]
    for name, m in s["models"].items():
        lines.append(f"{name:<12}{m['params_total_M']:>9.1f}M{m['params_active_M']:>9.1f}M"
                     f"{m['paper_gflops']:>14.2f}{m['forward_gflops']:>12.2f}")
    return "\n".join(lines)
