"""Deployable artefacts from finished runs: Hugging Face folders, model cards, ONNX graphs.

Apart from the DeepSpeed checkpoint code (``minimoe.checkpoint``): that one saves and resumes training
state; this one writes what a user deploys. Submodules are imported where used (``names`` is pure and
is what ``minimoe.student`` reads its own folders with).
"""
