"""minimoe: DeepSpeed knowledge distillation of Hugging Face encoders into MiniMoE students."""
from .config import ConfigError, DistillConfig, StudentConfig
from .student import MiniMoEModel, count_parameters, flops_per_sequence

__version__ = "0.1.0"
__all__ = ["ConfigError", "DistillConfig", "StudentConfig", "MiniMoEModel", "count_parameters",
           "flops_per_sequence", "__version__"]
