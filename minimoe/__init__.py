"""minimoe: DeepSpeed knowledge distillation of Hugging Face encoders into MiniMoE students.

The model classes are imported on first use, so ``launchers/*.py --help`` and config validation do not
load torch and DeepSpeed.
"""
from .config import ConfigError, DistillConfig, FinetuneConfig, StudentConfig

__version__ = "0.1.0"
_LAZY = {"MiniMoEModel": "student", "count_parameters": "student", "flops_per_sequence": "student"}
__all__ = ["ConfigError", "DistillConfig", "FinetuneConfig", "StudentConfig", *_LAZY, "__version__"]


def __getattr__(name):
    import importlib
    import importlib.util
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    # Submodules too, on first use: `import minimoe; minimoe.heads.load_task_model(...)` (the README and
    # every task model card say so) without importing torch for --help, and without import cycles.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'minimoe' has no attribute {name!r}")
