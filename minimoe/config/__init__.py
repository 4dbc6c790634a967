"""Typed configuration: what a student *is*, and what a distillation run *does*.

Every user-facing setting lives in one dataclass field with its default and its help text; the
launchers build their ``--help`` and their flag parsing from these fields (``flags.py``), and
``validate()`` is the one place that checks them. Validation happens before any process group starts, so
a bad value costs a one-line error and no partial output.

``student`` (what a student is), ``train`` (what a training run does: every launcher's shared settings and
distillation's), ``launchers`` (fine-tuning, evaluation, export, sweeps), ``base`` (errors, file checks).
"""
from .base import ConfigError, check_output_dir, check_output_file, load_json
from .launchers import EXPORT_FORMATS, EvaluateConfig, ExportConfig, FinetuneConfig, SweepConfig
from .student import ROUTERS, StudentConfig
from .train import (DEMO_RUN, PACKAGED_CHAT, PACKAGED_CORPUS, PACKAGED_MPNET, PACKAGED_TEACHER, PAIR_RECIPES,
                    PRECISIONS, PRESETS, TEACHER_PLACEMENTS, DistillConfig, LaunchConfig, TrainConfig)

__all__ = ["ConfigError", "check_output_dir", "check_output_file", "load_json", "EXPORT_FORMATS",
           "EvaluateConfig", "ExportConfig", "FinetuneConfig", "SweepConfig", "ROUTERS", "StudentConfig",
           "PACKAGED_CHAT", "PACKAGED_CORPUS", "PACKAGED_MPNET", "PACKAGED_TEACHER", "PAIR_RECIPES",
           "PRECISIONS", "PRESETS", "TEACHER_PLACEMENTS", "DistillConfig", "LaunchConfig", "TrainConfig",
           "DEMO_RUN"]
