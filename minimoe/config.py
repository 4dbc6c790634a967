"""Typed configuration: what a student *is*, and what a distillation run *does*.

Every user-facing setting lives in one dataclass field with its default and its help text; the
launchers build their ``--help`` and their flag parsing from these fields (``flags.py``), and
``validate()`` is the one place that checks them. Validation happens before any process group starts, so a bad value
costs a one-line error and no partial output.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union


class ConfigError(ValueError):
    """A user error: bad flag, bad file, bad combination. Launchers print it as one line and exit 2."""


def _help(text: str, cli: bool = True) -> dict:
    return {"help": text, "cli": cli}


@dataclass
class StudentConfig:
    """Architecture of a MiniMoE student: a post-LN BERT encoder whose FFNs are top-1 expert mixtures.

    Nothing here says how the model is parallelised: ``ep_size`` is a run-time choice.
    """

    num_layers: int = field(default=4, metadata=_help("Student transformer layers."))
    hidden_size: int = field(default=384, metadata=_help("Student hidden size H."))
    num_heads: int = field(default=12, metadata=_help("Student attention heads (must divide H)."))
    ffn_size: int = field(default=1536, metadata=_help("FFN inner size of each expert (the dense student's FFN)."))
    num_experts: int = field(default=4, metadata=_help("Experts per FFN; 1 gives the dense MiniLM student."))
    gate_noise: Optional[float] = field(
        default=None,
        metadata=_help("Half-width of the uniform noise added to gate logits in training (paper: = hidden "
                       "dropout). Default: hidden_dropout."))
    drop_tokens: bool = field(
        default=False,
        metadata=_help("Drop tokens past an expert's capacity (DeepSpeed's default). The paper is dropless: False."))
    capacity_factor: float = field(default=1.0, metadata=_help("Expert capacity factor, used only with drop_tokens."))
    route_padding: bool = field(
        default=False,
        metadata=_help("Route padding tokens through experts and count them in the load balance (the authors' "
                       "code does). Default False: padding is masked out."))
    moefy_shared_fraction: float = field(
        default=2 / 3,
        metadata=_help("Fraction of each expert's neurons copied from one shared FFN at init (paper: 2/3)."))
    relation_projection: Optional[bool] = field(
        default=None,
        metadata=_help("Take the student's Q/K/V for distillation from a separate projection of the final hidden "
                       "states (so the last layer's experts get a gradient). Default: True when num_experts > 1."))
    hidden_dropout: float = field(default=0.1, metadata=_help("Dropout on hidden states and expert outputs."))
    attention_dropout: float = field(default=0.1, metadata=_help("Dropout on attention probabilities."))
    max_position_embeddings: int = field(default=512, metadata=_help("Position table size.", cli=False))
    type_vocab_size: int = field(default=2, metadata=_help("Segment (token type) vocabulary.", cli=False))
    layer_norm_eps: float = field(default=1e-12, metadata=_help("LayerNorm epsilon.", cli=False))
    initializer_range: float = field(default=0.02, metadata=_help("Std of the normal init.", cli=False))
    vocab_size: int = field(default=30522, metadata=_help("Set from the teacher's tokenizer.", cli=False))
    pad_token_id: int = field(default=0, metadata=_help("Set from the teacher's tokenizer.", cli=False))

    def __post_init__(self) -> None:
        if self.gate_noise is None:
            self.gate_noise = self.hidden_dropout
        if self.relation_projection is None:
            self.relation_projection = self.num_experts > 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> "StudentConfig":
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_size", "num_experts", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--num_heads {self.num_heads} must divide --hidden_size {self.hidden_size}")
        for name in ("hidden_dropout", "attention_dropout", "gate_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be in [0, 1)")
        if not 0.0 <= self.moefy_shared_fraction <= 1.0:
            raise ConfigError(f"--moefy_shared_fraction {self.moefy_shared_fraction} must be in [0, 1]")
        if self.capacity_factor <= 0:
            raise ConfigError(f"--capacity_factor {self.capacity_factor} must be > 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"model_type", "minimoe_version"})
        if unknown:
            raise ConfigError(f"unknown student config keys {unknown}; allowed: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known}).validate()


PACKAGED_TEACHER = "packaged:all-MiniLM-L6-v2"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEACHER_PLACEMENTS = ("auto", "replicated", "zero3", "zero3_offload")
PACKAGED_CORPUS = "packaged:wikipedia"


@dataclass
class LaunchConfig:
    """Planning a job without starting it: the world it will run on and the commands that start it."""

    dry_run: bool = field(default=False, metadata=_help(
        "Print the run's layout (ranks, expert groups, batch, memory per rank, teacher placement) and the "
        "launch commands for every node, then exit without starting a process group."))
    hostfile: str = field(default="", metadata=_help(
        "With --dry_run: the job's DeepSpeed hostfile ('hostname slots=N' lines)."))
    num_nodes: int = field(default=0, metadata=_help("With --dry_run: nodes of the planned job."))
    gpus_per_node: int = field(default=0, metadata=_help("With --dry_run: processes (GPUs) per node."))
    master_port: int = field(default=29500, metadata=_help("With --dry_run: the rendezvous port in the commands."))

    def validate(self) -> "LaunchConfig":
        if self.num_nodes < 0 or self.gpus_per_node < 0:
            raise ConfigError(f"--num_nodes {self.num_nodes} and --gpus_per_node {self.gpus_per_node} must be >= 1")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"--master_port {self.master_port} is invalid: must be in 1..65535")
        if (self.hostfile or self.num_nodes or self.gpus_per_node) and not self.dry_run:
            raise ConfigError("--hostfile, --num_nodes and --gpus_per_node plan a job with --dry_run; a real "
                              "multi-node run takes them from its launcher (deepspeed --hostfile, torchrun --nnodes)")
        return self


@dataclass
class TrainConfig:
    """Settings every training launcher shares: the run folder, the DeepSpeed engine and its overrides,
    the step budget, logging. Launchers subclass it and may redeclare a field to change its default."""

    output_dir: str = field(default="runs/train", metadata=_help("Run folder."))
    ep_size: int = field(default=1, metadata=_help(
        "Expert-parallel size: ranks that share one copy of the experts (divides num_experts and world size)."))
    max_seq_length: int = field(default=128, metadata=_help("Maximum tokens per sequence."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps to run; -1 means num_epochs full passes."))
    num_epochs: float = field(default=1.0, metadata=_help(
        "Passes over the data when max_steps is -1 (given alone, it sets max_steps to -1)."))
    micro_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Sequences per rank per micro-step (overrides ds_config train_micro_batch_size_per_gpu)."))
    grad_accum: Optional[int] = field(default=None, metadata=_help(
        "Micro-steps per optimizer step (overrides ds_config gradient_accumulation_steps)."))
    lr: Optional[float] = field(default=None, metadata=_help("Peak learning rate (overrides the ds_config)."))
    warmup_ratio: float = field(default=0.01, metadata=_help("Fraction of steps for linear warmup."))
    weight_decay: Optional[float] = field(default=None, metadata=_help(
        "AdamW weight decay, not applied to biases and LayerNorm (overrides the ds_config)."))
    gradient_clipping: Optional[float] = field(default=None, metadata=_help(
        "Global grad-norm clip (overrides the ds_config; DeepSpeed's silent default is 1.0, ours is 5)."))
    precision: str = field(default="auto", metadata=_help(
        "fp32, bf16, fp16, or auto (whatever the ds_config enables)."))
    seed: int = field(default=776, metadata=_help("Random seed."))
    ds_config: str = field(default="ds_configs/zero2_moe.json", metadata=_help("DeepSpeed config of the trained model."))
    strict_ds_config: bool = field(default=True, metadata=_help(
        "Refuse ds_config keys DeepSpeed does not read (a misspelt key is otherwise ignored without a word); "
        "False only warns."))
    load_balance_weight: float = field(default=0.01, metadata=_help("Weight of the load-balance loss (MoE models)."))
    log_every: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    wandb: str = field(default="offline", metadata=_help("wandb mode: offline, online or disabled."))
    wandb_project: str = field(default="minimoe", metadata=_help("wandb project name."))
    resume: Union[bool, str] = field(default=False, metadata=_help(
        "Resume: True for the latest checkpoint in output_dir, a checkpoint folder, or auto (the latest "
        "checkpoint when there is one, else a fresh start: for jobs a scheduler requeues)."))
    resume_weights_only: bool = field(default=False, metadata=_help(
        "With --resume: restore the weights, step, schedule and data position but start the "
        "optimizer state afresh (for a checkpoint whose optimizer state cannot be carried over)."))
    save_every: int = field(default=0, metadata=_help("Save a checkpoint every N optimizer steps (0: only at the end)."))
    keep_checkpoints: int = field(default=2, metadata=_help("Checkpoints kept on disk (older ones are deleted)."))
    launch: LaunchConfig = field(default_factory=LaunchConfig, metadata=_help("Job planning (--dry_run)."))

    @classmethod
    def settle_given(cls, given: dict) -> dict:
        """The flags given on the command line, settled before the config is built: ``--num_epochs`` alone
        trains that many epochs (``--max_steps``' default would otherwise win without a word), and a
        step count given with it is refused rather than silently preferred."""
        if "num_epochs" not in given:
            return given
        if "max_steps" not in given:
            return {**given, "max_steps": -1}
        if given["max_steps"] != -1:
            raise ConfigError(f"--max_steps {given['max_steps']} and --num_epochs {given['num_epochs']} both set "
                              "the run's length: give one (--max_steps -1 trains --num_epochs)")
        return given

    def validate(self):
        self.launch.validate()
        for name in ("max_seq_length", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be >= 1")
        if self.max_seq_length < 8:
            raise ConfigError(f"--max_seq_length {self.max_seq_length} is too short: must be >= 8")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max_steps {self.max_steps} is invalid: must be > 0, or -1 for num_epochs")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise ConfigError(f"--num_epochs {self.num_epochs} must be > 0 when --max_steps is -1")
        if self.ep_size < 1:
            raise ConfigError(f"--ep_size {self.ep_size} is invalid: must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is invalid: allowed {', '.join(PRECISIONS)}")
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"--wandb {self.wandb!r} is invalid: allowed offline, online, disabled")
        for name in ("micro_batch_size", "grad_accum"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name} {v} is invalid: must be >= 1")
        for name in ("lr", "weight_decay", "gradient_clipping", "warmup_ratio", "load_balance_weight", "num_epochs"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"--{name} {v} is invalid: must be a finite number")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        for name in ("weight_decay", "gradient_clipping", "load_balance_weight"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name} {v} is invalid: must be >= 0")
        if self.save_every < 0:
            raise ConfigError(f"--save_every {self.save_every} must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep_checkpoints {self.keep_checkpoints} is invalid: must be >= 1")
        if self.resume_weights_only and self.resume in (False, "", "false", "False"):
            raise ConfigError("--resume_weights_only needs --resume")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seed range
            raise ConfigError(f"--seed {self.seed} is invalid: must be in [0, 2**32)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DistillConfig(TrainConfig):
    """Task-agnostic distillation of a Hugging Face teacher into a MiniMoE student (MiniLMv2 relations).

    With no flags it runs the embedded default: the packaged MiniLM-L6-H384 teacher, the packaged
    Wikipedia sample and a small 4-expert student, a few minutes on 2 CPU cores.
    """

    teacher: str = field(default=PACKAGED_TEACHER, metadata=_help(
        "Teacher: a Hugging Face hub name or local folder of an encoder (BERT, RoBERTa, MPNet, ...)."))
    teacher_layer: int = field(default=-1, metadata=_help(
        "Teacher layer whose Q/K/V are distilled (negative counts from the end)."))
    data: str = field(default=PACKAGED_CORPUS, metadata=_help(
        "Raw text: a datasets hub name, or local .txt/.json/.jsonl/.parquet files (comma-separated or a glob)."))
    text_column: str = field(default="text", metadata=_help("Column holding the text in json/parquet/hub data."))
    streaming: bool = field(default=False, metadata=_help(
        "Stream the corpus, tokenising on the fly, instead of tokenising it once into the cache (for "
        "corpora larger than memory; needs --max_steps)."))
    short_seq_prob: float = field(default=0.1, metadata=_help("Probability of a shorter target length (BERT)."))
    cache_dir: str = field(default="", metadata=_help(
        "Where tokenised corpora are cached. Default: $MINIMOE_CACHE or ~/.cache/minimoe."))
    output_dir: str = field(default="runs/distill", metadata=_help(
        "Run folder: checkpoints/, student/ (the export), metrics.jsonl, run_config.json."))
    relation_heads: int = field(default=32, metadata=_help(
        "Relation heads R for Q-Q/K-K/V-V relations (must divide both hidden sizes)."))
    max_steps: int = field(default=60, metadata=_help(
        "Optimizer steps to run; -1 means num_epochs full passes."))
    seed: int = field(default=776, metadata=_help("Random seed (paper: 776)."))
    teacher_placement: str = field(default="auto", metadata=_help(
        "Where the teacher's weights live: replicated (a copy per rank, fastest), zero3 (1/N per rank, "
        "gathered a layer at a time), zero3_offload (GPU runs: partitions in pinned host memory), or auto "
        "(the teacher ds_config's ZeRO stage if it states one, else by teacher size vs memory per rank)."))
    teacher_precision: str = field(default="auto", metadata=_help(
        "Teacher weights and compute: fp32, bf16, fp16 (GPU), or auto (the same as --precision)."))
    teacher_ds_config: str = field(default="ds_configs/teacher.json", metadata=_help(
        "DeepSpeed config of the frozen teacher (inference, no optimizer): ZeRO-3 knobs; the stage "
        "follows --teacher_placement."))
    save_every: int = field(default=20, metadata=_help("Save a checkpoint every N optimizer steps (0: only at the end)."))
    students: str = field(default="", metadata=_help(
        "Several students from one teacher pass: a .json/.yaml file listing objects of student flags (name, "
        "num_layers, hidden_size, num_heads, ffn_size, num_experts, ep_size, relation_heads, lr, ...), or inline "
        "'name:key=value,key=value;name2:key=value'. The student flags given here are every entry's defaults. "
        "Each student gets output_dir/students/<name>/ (student/, metrics.jsonl, summary.json)."))
    student: StudentConfig = field(default_factory=StudentConfig, metadata=_help("Student architecture."))

    def validate(self) -> "DistillConfig":
        super().validate()
        self.student.validate()
        for name in ("relation_heads",):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be >= 1")
        if self.max_seq_length > self.student.max_position_embeddings:
            raise ConfigError(f"--max_seq_length {self.max_seq_length} exceeds the student's "
                              f"{self.student.max_position_embeddings} positions")
        if self.streaming and self.max_steps == -1:
            raise ConfigError("--streaming needs --max_steps > 0 (a stream's length is unknown up front)")
        if self.student.hidden_size % self.relation_heads:
            raise ConfigError(f"--relation_heads {self.relation_heads} must divide the student hidden size "
                              f"{self.student.hidden_size}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError(f"--short_seq_prob {self.short_seq_prob} must be in [0, 1]")
        if self.teacher_placement not in TEACHER_PLACEMENTS:
            raise ConfigError(f"--teacher_placement {self.teacher_placement!r} is invalid: allowed "
                              f"{', '.join(TEACHER_PLACEMENTS)}")
        if self.teacher_precision not in PRECISIONS:
            raise ConfigError(f"--teacher_precision {self.teacher_precision!r} is invalid: allowed "
                              f"{', '.join(PRECISIONS)}")
        return self



@dataclass
class FinetuneConfig(TrainConfig):
    """Task-specific fine-tuning of a distilled MiniMoE student (experts included, any --ep_size) or a
    dense Hugging Face encoder, with evaluation on the dev set and early stopping on the task's metric.

    Tasks: sst2 mrpc stsb qqp mnli qnli rte cola conll2003 (hub, or --data DIR with GLUE TSV / CoNLL
    files), and the offline sentiment and wnut16 tasks (`make tasks` prepares them in data/tasks/).
    """

    model: str = field(default="runs/demo/student", metadata=_help(
        "An exported MiniMoE student folder, or a hub name / local folder of a dense HF encoder."))
    task: str = field(default="sentiment", metadata=_help("Task name (see above)."))
    data: str = field(default="", metadata=_help(
        "Local task folder (train/dev[/test] .tsv or CoNLL .txt). Default: the hub, or data/tasks/<task>."))
    output_dir: str = field(default="runs/finetune", metadata=_help(
        "Run folder: model/ (the best fine-tuned model), results.json, results.md, metrics.jsonl."))
    num_epochs: float = field(default=3.0, metadata=_help("Training epochs when max_steps is -1."))
    lr: Optional[float] = field(default=5e-5, metadata=_help("Peak learning rate (overrides the ds_config)."))
    warmup_ratio: float = field(default=0.1, metadata=_help("Fraction of steps for linear warmup."))
    seed: int = field(default=42, metadata=_help("Random seed."))
    eval_every: int = field(default=0, metadata=_help("Evaluate every N optimizer steps (0: at each epoch's end)."))
    patience: int = field(default=2, metadata=_help(
        "Stop after this many evaluations without a better dev score (0: never stop early)."))
    classifier_dropout: float = field(default=0.1, metadata=_help("Dropout in the task head."))
    teacher: str = field(default="", metadata=_help(
        "Task-specific distillation: a fine-tuned model folder (launchers/finetune.py's output_dir/model) "
        "for the same task and tokenizer, whose logits the student also learns."))
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

    model: str = field(default="runs/finetune/model", metadata=_help("A fine-tuned model folder (task.json inside)."))
    split: str = field(default="dev", metadata=_help("dev or test (local files), or a hub split name."))
    data: str = field(default="", metadata=_help("Local task folder. Default: the hub, or data/tasks/<task>."))
    max_seq_length: int = field(default=128, metadata=_help("Maximum tokens per sequence."))
    batch_size: int = field(default=64, metadata=_help("Sequences per forward."))
    output: str = field(default="", metadata=_help("Result JSON path. Default: <model>/../eval_<split>.json."))

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

    model: str = field(default="runs/demo", metadata=_help(
        "A finished distillation or fine-tuning run folder, or the student / model folder it exported."))
    format: str = field(default="onnx", metadata=_help("onnx or hf."))
    output_dir: str = field(default="", metadata=_help(
        "Where to write. Default: <model folder>/onnx (onnx), <model folder>-hf (hf)."))
    opset: int = field(default=18, metadata=_help("ONNX opset (torch's exporter needs >= 18)."))
    tolerance: float = field(default=1e-4, metadata=_help(
        "Largest |onnxruntime - PyTorch| accepted on the check batches; past it nothing is written."))

    def validate(self) -> "ExportConfig":
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format {self.format!r} is invalid: choose one of {', '.join(EXPORT_FORMATS)}")
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
        "Comma-separated models (students or HF). Default: runs/demo/student, or none with --students."))
    students: str = field(default="", metadata=_help(
        "Distil these students first, in one run from one teacher pass (launchers/distill.py --students, into "
        "<output_dir>/distill; a rerun continues it), then fine-tune and score each of them."))
    distill_extra: str = field(default="", metadata=_help(
        "With --students: the distillation's other flags, given with '=': --distill_extra='--teacher "
        "bert-base-uncased --max_steps 20000'."))
    tasks: str = field(default="sentiment,wnut16", metadata=_help("Comma-separated task names."))
    seeds: str = field(default="42", metadata=_help("Comma-separated seeds."))
    output_dir: str = field(default="runs/sweep", metadata=_help("Root folder: <model>/<task>/seed<S>/ per run."))
    launcher: str = field(default="python", metadata=_help(
        "How each run starts, e.g. 'python' or 'deepspeed --num_gpus 8'."))
    extra: str = field(default="", metadata=_help(
        "Extra finetune flags for every run, given with '=': --extra='--num_epochs 5 --lr 1e-4'."))

    def validate(self) -> "SweepConfig":
        for name in ("tasks", "seeds"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"--{name} is empty")
        if self.distill_extra and not self.students:
            raise ConfigError("--distill_extra configures the distillation of --students; give --students")
        return self


# ----------------------------------------------------------------------------------------------
# Files


def load_json(path: str, what: str) -> dict:
    """Read a JSON file with one-line errors for the usual mistakes. A relative path that is not found
    here is looked up in the minimoe checkout, so the default ``ds_configs/...`` work from any folder."""
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(shipped):
        path = shipped
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a folder, not a JSON file")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path!r} is not a JSON text file (not UTF-8)")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def check_output_dir(path: str, what: str = "--output_dir") -> None:
    """The run folder must be a folder we can create or write: found now, not after the engines are built."""
    if not str(path).strip():
        raise ConfigError(f"{what} is empty: give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path!r} cannot be written ({existing!r} is not a writable folder); choose "
                          f"another {what}")


def check_output_file(path: str, what: str) -> None:
    """A file the run will write at its end: checked before the work, not after it."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a folder; give a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), f"{what}'s folder")
