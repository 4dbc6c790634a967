"""The code written into every exported MoE student folder, so ``transformers`` loads it with
``trust_remote_code=True`` and no minimoe or DeepSpeed installed. Torch and transformers only."""
