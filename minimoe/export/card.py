"""Model cards: the README.md of every exported folder, in the Hugging Face Hub's format (YAML front
matter from ``huggingface_hub.ModelCardData``, then markdown). What made the model, what it costs, how
well it did, and the three ways to load it."""
from __future__ import annotations

import os
import shlex
import sys

CARD_NAME = "README.md"
TAGS = ["minimoe", "mixture-of-experts", "knowledge-distillation", "bert"]
PIPELINES = {"base": "feature-extraction", "sequence": "text-classification", "token": "token-classification"}


def command_line() -> str:
    """This process's command as one would type it: the launcher (from the environment it set up) and the
    script's flags, without the per-rank ``--local_rank``."""
    from ..distributed import env_local_world_size
    args = [a for a in sys.argv if not a.startswith("--local_rank")]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), env_local_world_size()
    nodes = world // local if local and world > local else 1
    if world == 1:
        start = ["python"]
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun sets it
        start = ["torchrun", "--nproc_per_node", str(local)] + (["--nnodes", str(nodes)] if nodes > 1 else [])
    else:
        start = ["deepspeed", "--num_gpus", str(local)] + (["--num_nodes", str(nodes)] if nodes > 1 else [])
    script = [os.path.relpath(args[0])] if args else []
    return " ".join(shlex.quote(a) for a in start + script + args[1:])


def _front_matter(head: str, eval_results: list | None = None, name: str | None = None) -> str:
    from huggingface_hub import ModelCardData
    data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINES[head], tags=list(TAGS),
                         model_name=name if eval_results else None, eval_results=eval_results or None)
    return f"---\n{data.to_yaml()}\n---\n"


def _how_to_load(head: str, moe: bool) -> str:
    auto = {"base": "AutoModel", "sequence": "AutoModelForSequenceClassification",
            "token": "AutoModelForTokenClassification"}[head]
    remote = ", trust_remote_code=True" if moe else ""
    lines = ["## How to load", "", "```python", 'path = "."  # this folder',
             f"from transformers import AutoTokenizer, {auto}",
             f"model = {auto}.from_pretrained(path{remote})  # transformers and torch only",
             f"tokenizer = AutoTokenizer.from_pretrained(path{remote})"]
    if head != "base":
        lines += ["", "from transformers import pipeline",
                  f'classify = pipeline("{PIPELINES[head]}", model=path{remote})']
    lines += ["", "import minimoe  # the training library: expert parallelism, fine-tuning",
              "model = minimoe.MiniMoEModel.from_pretrained(path)" if head == "base" else
              "model, meta = minimoe.heads.load_task_model(path)  # with task.json", "```", ""]
    if moe:
        lines += ["The folder carries its modeling code (`modeling_minimoe.py`), hence `trust_remote_code`; "
                  "it needs no minimoe or DeepSpeed.", ""]
    lines += ["ONNX, in which each token still runs only its top-1 expert: "
              "`python launchers/export.py --model PATH --format onnx`.", ""]
    return "\n".join(lines)


def _architecture(student, params: dict, flops: dict, seq_len: int) -> list[str]:
    e = student.num_experts
    kind = f"{e} experts per FFN, top-1 routing" if e > 1 else "dense (one FFN per layer)"
    return [
        f"| architecture | {student.num_layers} layers, hidden {student.hidden_size}, "
        f"{student.num_heads} heads, FFN {student.ffn_size}; {kind} |",
        f"| parameters | {params['total'] / 1e6:.1f}M in total, {params['active'] / 1e6:.1f}M active per "
        "token |",
        f"| compute | {flops['forward_flops'] / 1e9:.2f} GFLOPs per {seq_len}-token sequence (forward; "
        f"{flops['paper_gflops']:.2f} G multiply-adds of the Linear layers, the paper's measure) |",
    ]


def student_card(name: str, student, run_config: dict, summary: dict) -> str:
    """A distilled student's card from its run's ``run_config.json`` and ``summary.json``."""
    from ..student import count_parameters, flops_per_sequence
    seq_len = run_config["max_seq_length"]
    teacher, rel = summary["teacher"], summary.get("relation_first")
    steps = summary.get("total_steps", summary["steps"])
    rows = ["| | |", "|---|---|",
           f"| teacher | `{run_config['teacher']}` ({teacher['layers']} layers, "
           f"hidden {teacher['hidden_size']}), frozen |",
            f"| data | `{run_config['data']}` |",
            f"| training | {steps} steps x {summary['global_batch']} sequences of up to {seq_len} tokens |"]
    if summary.get("tokens_seen") is not None:
        rows.append(f"| tokens seen | {summary['tokens_seen']:,} (not padding; the last launch's "
                    f"{summary['steps']} steps) |")
    if rel is not None:
        rows.append(f"| relation loss | {rel:.4f} at the first logged step, {summary['relation_last']:.4f} "
                    "at the end |")
    held = summary.get("heldout")
    if held:
        rows.append(f"| held-out relation loss | {held['relation']:.4f} (Q-Q {held['qq']:.4f}, "
                    f"K-K {held['kk']:.4f}, V-V {held['vv']:.4f}) at step {held['step']}, on "
                    f"{held['pairs']} pairs of {held['source']}; dropout and gate noise off |")
        if "routing_entropy" in held:
            rows.append(f"| routing (held-out) | entropy {held['routing_entropy']:.3f} of the maximum, "
                        f"busiest expert at {held['max_load']:.2f}x an even share |")
    if student.num_experts > 1 and student.router != "learned":
        rows.append(f"| router | {student.router}: a fixed hash of the token id"
                    f"{' and position' if student.router == 'random' else ''}, "
                    "no gate (a routing ablation) |")
    rows += _architecture(student, count_parameters(student), flops_per_sequence(student, seq_len), seq_len)
    return "\n".join([
        _front_matter("base"), f"# {name}", "",
        "A MiniMoE student distilled with minimoe (the method of Zhang et al., ACL 2023, \"Lifting the Curse "
        "of Capacity Gap in Distilling Language Models\"): task-agnostic distillation of the teacher's "
        "self-attention relations (MiniLMv2 Q-Q, K-K, V-V) into a small encoder whose FFNs are mixtures of "
        "minimal experts. Fine-tune it before use on a task.", "",
        *rows, "", _how_to_load("base", student.num_experts > 1),
        "## The command that made it", "", "```", run_config.get("command", "(not recorded)"), "```", ""])


def task_card(name: str, student, seq_len: int, task: dict) -> str:
    """``task``: task, kind, labels, main_metric, best (step, dev scores), source, steps, command."""
    from huggingface_hub import EvalResult
    from ..student import count_parameters, flops_per_sequence
    head = "token" if task["kind"] == "ner" else "sequence"
    results = [EvalResult(task_type=PIPELINES[head], dataset_type=task["task"], dataset_name=task["task"],
                          dataset_split=split, metric_type=metric, metric_value=round(value, 4))
               for split, scores in task["best"]["dev"].items() for metric, value in scores.items()]
    scores = [f"| {split} | " + ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items()) + " |"
              for split, m in task["best"]["dev"].items()]
    labels = ", ".join(f"`{x}`" for x in task["labels"]) if task["labels"] else "one score (regression)"
    return "\n".join([
        _front_matter(head, results, name), f"# {name}", "",
        f"`{task['source']}` fine-tuned on **{task['task']}** ({task['kind']}; labels: {labels}) with "
        f"minimoe. Best dev {task['main_metric']} at step {task['best']['step']} of {task['steps']}.", "",
        "| split | scores |", "|---|---|", *scores, "", "| | |", "|---|---|",
        *_architecture(student, count_parameters(student), flops_per_sequence(student, seq_len), seq_len), "",
        _how_to_load(head, student.num_experts > 1),
        "## The command that made it", "", "```", task["command"], "```", ""])
