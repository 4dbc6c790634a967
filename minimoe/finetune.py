"""Task-specific fine-tuning: a distilled MiniMoE student (or a dense HF encoder) + a task head, trained
with DeepSpeed (ZeRO-1/2, experts over ``ep_size`` ranks), evaluated on dev, early-stopped, exported.

Order of work: validate (no process group) -> process group -> task data, tokenised -> task model and
engine -> loop with periodic evaluation (every rank runs the same number of forwards; predictions are
gathered so every rank takes the same early-stopping decision) -> export of the best model on rank 0.
Encoding, batching, prediction and scoring are ``task_eval.py``'s.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import checkpoint, runlock
from .commands import dry_run
from .config import ConfigError, FinetuneConfig, check_output_dir
from .data.assets import check_tokenizer, resolve_model
from .data.batches import GlobalBatches
from .data.tasks import Task, dev_split_names, get_task, load_split, offline_dir, split_file
from .distributed import accelerator_name, agree, device
from .engine import build_student_engine, fill_schedule, pop_precision, student_ds_config, zero_stage
from .errors import reading
from .export.card import command_line
from .export.hf import save_task_model
from .model_folder import TASK_META
from .heads import (TaskModel, check_positions, is_minimoe_folder, load_encoder, tokenizer_folder,
                    tokenizer_for)
from .layout import Layout, StudentShape, plan_layout, run_world
from .losses import logits_kd
from .monitor import gather_peak_rss
from .student import student_config_of, student_shape
from .task_eval import IGNORE, collate, encode, evaluate
from .teacher import parameter_count
from .trainer import Cadence, Member, Trainer, start


# ---------------------------------------------------------------------- the task loss


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


# ---------------------------------------------------------------------- the loop


@dataclass
class Plan:
    model: str
    task: Task
    tokenizer: object
    encoder_type: str
    accelerator: str
    data_dir: object
    layout: Layout
    ds: dict                    # merged; the schedule's step counts are filled once the data is known
    splits: dict                # {"train": examples, dev split name: examples}: read before any work
    resume: Optional[tuple]     # (checkpoints root, tag), or None
    resume_clients: dict        # the checkpoint's loop state ({"": ...}: one model)

    @property
    def world_size(self) -> int:
        return self.layout.world_size


def plan(cfg: FinetuneConfig) -> Plan:
    task = get_task(cfg.task)
    world, accel = run_world(cfg.launch, dict(os.environ)), accelerator_name()
    model = resolve_model(cfg.model, "--model")
    _check_not_a_run_folder(model)
    minimoe = is_minimoe_folder(model)
    tokenizer = tokenizer_for(model)
    model_cfg = _model_config(model, minimoe)
    check_positions(model_cfg, cfg.max_seq_length, f"--model {model!r}")
    check_tokenizer(tokenizer, model_cfg.vocab_size, model, "--model")
    check_output_dir(cfg.output_dir)
    shape = student_shape(model_cfg) if minimoe else StudentShape(parameter_count(model_cfg), 0, 1)
    ds = student_ds_config(cfg, world.size, accel)
    precision = pop_precision(ds)
    layout = plan_layout(world, cfg.ep_size, shape, ds["train_micro_batch_size_per_gpu"],
                         ds["gradient_accumulation_steps"], zero_stage(ds), precision)
    if cfg.teacher:
        _check_teacher(cfg.teacher, task, tokenizer)
    data_dir = cfg.data or (offline_dir(task) if task.hub is None else None)
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise ConfigError(f"--data {data_dir!r} is not a folder")
        for split in ["train", *dev_split_names(task, local=True)]:
            split_file(task, data_dir, split)  # raises, naming the missing file
    if cfg.launch.dry_run:
        splits = {}
    else:  # every split read (and its labels checked) before the process group starts
        splits = {name: load_split(task, name, data_dir)
                  for name in ["train", *dev_split_names(task, data_dir is not None)]}
    source = _source(cfg, model, task)

    def same_source(member: str, client: dict) -> None:
        saved = client.get("minimoe_finetune")
        if saved != source:
            raise ConfigError(f"--resume: the checkpoint fine-tuned {saved}, this run is {source}")

    resume, resume_clients = checkpoint.plan_resume(
        cfg, layout.global_batch, f"{layout.micro_batch} x {layout.grad_accum} x {layout.world_size} ranks",
        same_source)
    return Plan(model, task, tokenizer, "minimoe" if minimoe else "hf", accel, data_dir, layout, ds, splits,
                resume, resume_clients)


def _check_not_a_run_folder(model: str) -> None:
    """A distillation run folder, one of its checkpoints, or a fine-tuned model, in place of a student."""
    if os.path.isfile(os.path.join(model, TASK_META)):
        raise ConfigError(f"--model {model!r} is a fine-tuned task model; fine-tune the student or encoder "
                          f"it came from (\"source\" in its {TASK_META})")
    if os.path.isdir(os.path.join(model, "student")) and os.path.isdir(os.path.join(model, "checkpoints")):
        raise ConfigError(f"--model {model!r} is a distillation run folder; fine-tune its exported student: "
                          f"--model {os.path.join(model, 'student')}")
    if os.path.isfile(os.path.join(model, "mp_rank_00_model_states.pt")) or \
            os.path.isfile(os.path.join(model, "latest")):
        raise ConfigError(f"--model {model!r} is a DeepSpeed checkpoint, not a model folder; fine-tune the "
                          "run's exported student/ (a distillation run exports it at its end, or when "
                          "resumed)")


def _model_config(model: str, minimoe: bool):
    """A MiniMoE student's StudentConfig, or a dense HF encoder's config (no weights read)."""
    if minimoe:
        return student_config_of(model)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {model!r} is not a loadable Hugging Face model: {str(e).splitlines()[0]}")


def _check_teacher(folder: str, task: Task, tokenizer) -> None:
    meta_path = os.path.join(folder, TASK_META)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"--teacher {folder!r} is not a fine-tuned model folder (no {TASK_META})")
    with reading(meta_path, "; fine-tune the teacher again"), open(meta_path) as fh:
        meta = json.load(fh)
    if meta["task"] != task.name:
        raise ConfigError(f"--teacher {folder!r} was fine-tuned on {meta['task']}, not {task.name}")
    if tokenizer_for(tokenizer_folder(folder)).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--teacher {folder!r} has another tokenizer than --model: the logits would "
                          "not align")


def run(cfg: FinetuneConfig) -> dict:
    p = plan(cfg)
    if cfg.launch.dry_run:
        return dry_run(cfg, p.layout, "launchers/finetune.py")
    info = start(cfg.seed)
    import torch.distributed as dist
    dev = device()
    task, tok = p.task, p.tokenizer
    train = encode(task, p.splits["train"], tok, cfg.max_seq_length)
    dev_names = dev_split_names(task, p.data_dir is not None)
    dev_sets = {n: encode(task, p.splits[n], tok, cfg.max_seq_length) for n in dev_names}

    teacher = None
    if cfg.teacher:  # small next to training; every rank keeps a plain copy in eval mode
        from .heads import load_task_model
        teacher = agree(lambda: load_task_model(cfg.teacher))[0].to(dev).requires_grad_(False)
    encoder, _ = agree(lambda: load_encoder(p.model, cfg.ep_size, p.layout.ep_rank(info.rank)))
    model = TaskModel(encoder, p.encoder_type, task.kind, task.num_labels, cfg.classifier_dropout)
    ds = copy.deepcopy(p.ds)
    micro, accum = p.layout.micro_batch, p.layout.grad_accum
    batches = GlobalBatches(train, micro, accum, p.world_size, info.rank, cfg.seed, tok.pad_token_id)
    total = batches.total_steps(cfg.max_steps, cfg.num_epochs, f"task {task.name} train split")
    eval_every = cfg.eval_every or batches.steps_per_epoch
    engine = build_student_engine(model, fill_schedule(ds, cfg, total), f"--ds_config {cfg.ds_config}")

    def client_state(step: int) -> dict:
        return {"minimoe_global_batch": batches.global_batch, "minimoe_world_size": p.world_size,
                "minimoe_ep_size": cfg.ep_size, "minimoe_finetune": _source(cfg, p.model, task)}

    spec = FineTuning(cfg, task, train, dev_sets, batches, teacher, tok.pad_token_id, dev, info, micro)
    trainer = Trainer(spec, [Member(engine, p.layout, client_state, cfg=cfg)], cfg, info,
                      Cadence(total, cfg.log_every, cfg.save_every, eval_every), best_tag=BEST)
    start_step = trainer.resume(p.resume, p.resume_clients)
    run_config = {**cfg.to_dict(), "command": command_line(), "encoder_type": p.encoder_type,
                  "world_size": p.world_size, "global_batch": batches.global_batch, "total_steps": total,
                  "train_examples": len(train), "layout": p.layout.describe().splitlines()}
    monitor = trainer.open_run(run_config, start_step)
    t0 = time.perf_counter()
    trainer.fit(start_step)
    wall = time.perf_counter() - t0
    best, history = spec.best, spec.history
    results = {"task": task.name, "model": cfg.model, "encoder_type": p.encoder_type,
               "main_metric": task.main_metric, "best": best, "history": history, "wall_s": wall,
               "steps": history[-1]["step"] if history else 0,
               "train_examples": len(train), "world_size": p.world_size, "ep_size": cfg.ep_size,
               "peak_rss_mib_per_rank": gather_peak_rss()}
    if info.is_main:
        state = checkpoint.gather_state_dict(os.path.join(trainer.ckpt_root, BEST))
        save_task_model(os.path.join(cfg.output_dir, "model"), state, task, p.encoder_type, p.model, tok,
                        cfg.classifier_dropout, cfg.max_seq_length, command_line(), results)
        write_results(cfg.output_dir, results)
        monitor.write(f"best dev {task.main_metric} {best['main']:.4f} at step {best['step']} "
                      f"({wall:.0f} s); model in {os.path.join(cfg.output_dir, 'model')}")
        if task.kind == "ner" and best["main"] == 0.0:
            monitor.write(NO_ENTITY)
    monitor.close({"best_" + task.main_metric: best["main"]})
    dist.barrier()
    runlock.release()
    return results


BEST = "best"  # the checkpoint tag of the best dev score so far: what the run exports
# Printed under an NER run's last line when its best entity F1 is 0.0: what a newcomer would read as broken.
NO_ENTITY = ("entity F1 0.0 means no entity span was tagged right: most tokens of an NER set are O, and a "
             "model that has not yet learnt to see entities tags every token O (its loss still falls). Small "
             "students distilled briefly (make demo: 60 steps) end there after a few epochs at a low "
             "--lr; more epochs and a higher --lr move them off zero (experiments/finetune_demo/README.md "
             "has the measured --lr and --num_epochs, for the demo student and a 2L H128 one).")


def _source(cfg: FinetuneConfig, model: str, task: Task) -> dict:
    """What a fine-tuning checkpoint continues: a resume must train the same model on the same task."""
    return {"model": os.path.abspath(model) if os.path.isdir(model) else model, "task": task.name,
            "teacher": os.path.abspath(cfg.teacher) if cfg.teacher else ""}


class FineTuning:
    """The fine-tuning stage of the training loop (``trainer.TrainSpec``): the task loss (plus logits KD
    from a fine-tuned teacher, whose forward is the shared one), dev evaluation every ``eval_every`` steps,
    the best dev score kept as the ``best`` checkpoint, early stopping after ``patience`` evaluations."""

    def __init__(self, cfg: FinetuneConfig, task: Task, train: list, dev_sets: dict, batches: GlobalBatches,
                 teacher, pad_id: int, dev, info, micro: int):
        self.cfg, self.task, self.train, self.dev_sets, self.batches = cfg, task, train, dev_sets, batches
        self.teacher, self.pad_id, self.dev, self.info, self.micro = teacher, pad_id, dev, info, micro
        self.desc = f"finetune {task.name}"
        self.best: Optional[dict] = None
        self.history: list[dict] = []           # one row per evaluation
        self.bad_evals = 0

    def micro_batches(self, step: int) -> list[dict]:
        return [collate([self.train[i] for i in idx], self.pad_id, self.task.kind, self.dev)
                for idx in self.batches.indices(step)]

    def shared_forward(self, batch: dict):
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0]

    def loss(self, member, batch: dict, t_logits):
        logits, aux = member.engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        loss = task_loss(self.task.kind, logits, batch["labels"])
        total, kd = loss, None
        if t_logits is not None:
            tokens = batch["labels"] != IGNORE if self.task.kind == "ner" else None
            kd = logits_kd(logits, t_logits, self.cfg.temperature, tokens)
            total = (1 - self.cfg.kd_weight) * loss + self.cfg.kd_weight * kd
        return total + self.cfg.load_balance_weight * aux, (loss, kd)

    def window(self, member) -> "_LossWindow":
        return _LossWindow()

    def evaluate(self, members, step: int) -> list[tuple[dict, str]]:
        scores = evaluate(members[0].engine, self.task, self.dev_sets, self.micro, self.info.rank,
                          self.info.world_size, self.pad_id, self.dev)
        main = scores[next(iter(self.dev_sets))][self.task.main_metric]
        self.history.append({"step": step, "epoch": step / self.batches.steps_per_epoch, "dev": scores})
        self._improved = self.best is None or main > self.best["main"]
        if self._improved:
            self.best, self.bad_evals = {"step": step, "main": main, "dev": scores}, 0
        else:
            self.bad_evals += 1
        return [({f"dev/{s}/{k}": v for s, m in scores.items() for k, v in m.items()},
                 f"step {step}: dev {self.task.main_metric} {main:.4f}")]

    def improved(self) -> bool:
        return self._improved

    def should_stop(self) -> str:
        if self.cfg.patience and self.bad_evals >= self.cfg.patience:
            return f"early stop: no better dev {self.task.main_metric} in {self.bad_evals} evaluations"
        return ""

    def loop_state(self) -> dict:
        return {"best": self.best, "history": self.history, "bad_evals": self.bad_evals}

    def load_loop_state(self, state: dict) -> None:
        self.best, self.history = state.get("best"), state.get("history", [])
        self.bad_evals = state.get("bad_evals", 0)


class _LossWindow:
    """Task (and KD) loss sums between two log lines, averaged over every rank's micro-batches."""

    def __init__(self):
        self.loss = self.kd = 0.0
        self.n = self.steps = 0
        self.step_time = self.member_s = 0.0

    def add(self, batch: dict, record) -> None:
        loss, kd = record
        self.loss += float(loss.detach())
        self.kd += float(kd.detach()) if kd is not None else 0.0
        self.has_kd = kd is not None
        self.n += 1

    def reduce(self, world_size: int):
        import torch.distributed as dist
        sums = torch.tensor([self.loss, self.kd, float(self.n)], dtype=torch.float64)
        dist.all_reduce(sums)
        loss, kd, n = sums.tolist()
        metrics = {"train_loss": loss / max(n, 1.0)}
        if getattr(self, "has_kd", False):
            metrics["kd_loss"] = kd / max(n, 1.0)
        return metrics, None


def write_results(output_dir: str, results: dict) -> None:
    with open(os.path.join(output_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as fh:
        fh.write(results_table([results]))


def results_table(rows: list[dict]) -> str:
    """A markdown table of best dev scores, one row per run, with the average of the main metrics."""
    lines = ["| task | model | split | metrics | best step |", "|---|---|---|---|---|"]
    for r in rows:
        for split, m in r["best"]["dev"].items():
            scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items())
            lines.append(f"| {r['task']} | {r['model']} | {split} | {scores} | {r['best']['step']} |")
    mains = [r["best"]["main"] for r in rows]
    lines.append(f"\naverage of the main metrics: {100 * sum(mains) / len(mains):.2f}\n")
    return "\n".join(lines)
