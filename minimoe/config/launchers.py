"""The other launchers' settings: fine-tuning, evaluation, export, and sweeps over models, tasks and seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .base import ConfigError, _help
from .train import DEMO_RUN, TrainConfig


@dataclass
class FinetuneConfig(TrainConfig):
    """Task-specific fine-tuning of a distilled MiniMoE student (experts included, any --ep_size) or a
    dense Hugging Face encoder, with evaluation on the dev set and early stopping on the task's metric.

    Tasks: sst2 mrpc stsb qqp mnli qnli rte cola conll2003 (hub, or --data DIR with GLUE TSV / CoNLL
    files), and the offline sentiment and wnut16 tasks (`make tasks` prepares them in data/tasks/).
    """

    model: str = field(default=f"{DEMO_RUN}/student", metadata=_help(
        "An exported MiniMoE student folder, or a hub name / local folder of a dense HF encoder.", path=True))
    task: str = field(default="sentiment", metadata=_help("Task name (see above)."))
    data: str = field(default="", metadata=_help(
        "Local task folder (train/dev[/test] .tsv or CoNLL .txt). Default: the hub, or "
        "data/tasks/<task>.", path=True))
    output_dir: str = field(default="runs/finetune", metadata=_help(
        "Run folder: model/ (the best fine-tuned model), results.json, results.md, "
        "metrics.jsonl.", path=True))
    num_epochs: float = field(default=3.0, metadata=_help("Training epochs when max_steps is -1."))
    lr: Optional[float] = field(default=5e-5, metadata=_help("Peak learning rate (overrides the ds_config)."))
    warmup_ratio: float = field(default=0.1, metadata=_help("Fraction of steps for linear warmup."))
    seed: int = field(default=42, metadata=_help("Random seed."))
    eval_every: int = field(default=0, metadata=_help(
        "Evaluate every N optimizer steps (0: at each epoch's end)."))
    patience: int = field(default=2, metadata=_help(
        "Stop after this many evaluations without a better dev score (0: never stop early)."))
    classifier_dropout: float = field(default=0.1, metadata=_help("Dropout in the task head."))
    teacher: str = field(default="", metadata=_help(
        "Task-specific distillation: a fine-tuned model folder (launchers/finetune.py's output_dir/model) "
        "for the same task and tokenizer, whose logits the student also learns.", path=True))
    kd_weight: float = field(default=0.5, metadata=_help(
        "With --teacher: loss = (1 - kd_weight) * task loss + kd_weight * logits KD."))
    temperature: float = field(default=1.0, metadata=_help("With --teacher: softmax temperature of the KD."))

    def validate(self) -> "FinetuneConfig":
        super().validate()
        if not 0.0 <= self.kd_weight <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"--kd_weight {self.kd_weight} must be in [0, 1] and --temperature "
                              f"{self.temperature} > 0")
        if self.eval_every < 0 or self.patience < 0:
            raise ConfigError(f"--eval_every {self.eval_every} and --patience {self.patience} must be >= 0")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"--classifier_dropout {self.classifier_dropout} must be in [0, 1)")
        return self


@dataclass
class EvaluateConfig:
    """Score a fine-tuned model folder (launchers/finetune.py's output_dir/model) on a split, in one
    plain process (experts gathered, no launcher). Writes a JSON and a markdown table."""

    model: str = field(default="runs/finetune/model", metadata=_help(
        "A fine-tuned model folder (task.json inside).", path=True))
    split: str = field(default="dev", metadata=_help("dev or test (local files), or a hub split name."))
    data: str = field(default="", metadata=_help(
        "Local task folder. Default: the hub, or data/tasks/<task>.", path=True))
    max_seq_length: int = field(default=128, metadata=_help("Maximum tokens per sequence."))
    batch_size: int = field(default=64, metadata=_help("Sequences per forward."))
    output: str = field(default="", metadata=_help(
        "Result JSON path. Default: <model>/../eval_<split>.json.", path=True))

    def validate(self) -> "EvaluateConfig":
        if self.batch_size < 1 or self.max_seq_length < 8:
            raise ConfigError(f"--batch_size {self.batch_size} must be >= 1 and --max_seq_length >= 8")
        return self


EXPORT_FORMATS = ("onnx", "hf")


@dataclass
class ExportConfig:
    """Deployable artefacts from a finished run: an ONNX graph in which every token still runs only its
    top-1 expert (checked against PyTorch in onnxruntime before it is kept), or a Hugging Face folder
    with a model card (the format runs already export; this also converts students of earlier versions)."""

    model: str = field(default=DEMO_RUN, metadata=_help(
        "A finished distillation or fine-tuning run folder, or the student / model folder it "
        "exported.", path=True))
    format: str = field(default="onnx", metadata=_help("onnx or hf."))
    output_dir: str = field(default="", metadata=_help(
        "Where to write. Default: <model folder>/onnx (onnx), <model folder>-hf (hf).", path=True))
    opset: int = field(default=18, metadata=_help("ONNX opset (torch's exporter needs >= 18)."))
    tolerance: float = field(default=1e-4, metadata=_help(
        "Largest |onnxruntime - PyTorch| accepted on the check batches; past it nothing is written."))

    def validate(self) -> "ExportConfig":
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format {self.format!r} is invalid: choose one of "
                              f"{', '.join(EXPORT_FORMATS)}")
        if self.opset < 18:
            raise ConfigError(f"--opset {self.opset} is too old: torch's ONNX exporter needs >= 18")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise ConfigError(f"--tolerance {self.tolerance} must be a positive number")
        return self


@dataclass
class SweepConfig:
    """Fine-tune several models on several tasks and seeds (one launcher run each) and print the table
    the paper reports: the main dev metric per task (mean over seeds) and the average over tasks. With
    --students, the students are distilled first, together, from one teacher pass."""

    models: str = field(default="", metadata=_help(
        f"Comma-separated models (students or HF). Default: {DEMO_RUN}/student, or none with "
        "--students.", path=True))
    students: str = field(default="", metadata=_help(
        "Distil these students first, in one run from one teacher pass (launchers/distill.py --students, "
        "into <output_dir>/distill; a rerun continues it), then fine-tune and score each of them.",
        path=True))
    distill_extra: str = field(default="", metadata=_help(
        "With --students: the distillation's other flags, given with '=': --distill_extra='--teacher "
        "bert-base-uncased --max_steps 20000'."))
    tasks: str = field(default="sentiment,wnut16", metadata=_help("Comma-separated task names."))
    seeds: str = field(default="42", metadata=_help("Comma-separated seeds."))
    output_dir: str = field(default="runs/sweep", metadata=_help(
        "Root folder: <model>/<task>/seed<S>/ per run.", path=True))
    launcher: str = field(default="python", metadata=_help(
        "How each run starts, e.g. 'python' or 'deepspeed --num_gpus 8' (python, deepspeed and torchrun are "
        "the ones of the Python running the sweep)."))
    extra: str = field(default="", metadata=_help(
        "Extra finetune flags for every run, given with '=': --extra='--num_epochs 5 --lr 1e-4'."))

    def validate(self) -> "SweepConfig":
        for name in ("tasks", "seeds"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"--{name} is empty")
        if self.distill_extra and not self.students:
            raise ConfigError("--distill_extra configures the distillation of --students; give --students")
        return self
