"""What needs a CUDA device (marker ``gpu``: ``pytest -m gpu``, run by ``make gpu-check``), and the CI's
check that ``make gpu-check`` still resolves every step on a machine without one.

The gpu tests are skipped where ``torch.cuda.is_available()`` is False. Each compares its CUDA result with
the CPU's or with the plain model, at a stated tolerance. Every CUDA process is a child (the deepspeed
launcher, or a spawned worker) given ``DS_ACCELERATOR=cuda``: DeepSpeed fixes its accelerator on first use,
and this process's is the CPU (conftest).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, STEPS, deepspeed_cmd, env, flags, read_jsonl, run_ok, spawn, tiny_teacher
from test_teacher import _batch, _plain_qkv

CUDA = torch.cuda.is_available()


def gpu(test):
    """A test of ``pytest -m gpu``, skipped where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device "
                                              "(torch.cuda.is_available() is False)")(test))


def _use_cuda() -> None:
    """A spawned worker's first call: DeepSpeed's accelerator is CUDA before anything asks for it."""
    os.environ["DS_ACCELERATOR"] = "cuda"
    from deepspeed.accelerator import get_accelerator
    assert get_accelerator().device_name() == "cuda", get_accelerator().device_name()


# ---------------------------------------------------------------------------------------------
# The public launcher on one GPU: the student's ZeRO-2 engine and the teacher's ZeRO-3 engine.

# Dropout and gate noise off (gate noise follows hidden dropout): the CPU and CUDA draw different random
# numbers, so only without them is a CUDA step the CPU's computation, up to the kernels' rounding.
SAME_STEP = dict(ep_size=1, teacher_placement="zero3", hidden_dropout=0.0, attention_dropout=0.0,
                 save_every=STEPS)


def _relation(run) -> list[float]:
    return [m["relation"] for m in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def cpu_run(assets):
    out = assets / "gpu-cpu-reference"
    run_ok([sys.executable, f"{REPO}/launchers/distill.py", *flags(assets, out, **SAME_STEP)])
    return out


@pytest.fixture(scope="module")
def cuda_run(assets):
    out = assets / "gpu-fp32"
    # minimoe refuses DS_ACCELERATOR=cuda where CUDA is missing, so a run that finishes ran on the GPU
    run_ok(deepspeed_cmd(flags(assets, out, **SAME_STEP), procs=1), DS_ACCELERATOR="cuda")
    return out


@gpu
def test_the_two_engine_step_on_cuda_follows_the_same_run_on_the_cpu(cpu_run, cuda_run):
    """deepspeed --num_gpus 1: the student (ZeRO-2, fp32, DeepSpeed's FusedAdam) and the teacher (ZeRO-3) in
    one process, 24 steps, checkpoints and the export. Its relation loss is the CPU run's within 1e-3 at
    step 1 (the same weights and batch; only the kernels' rounding differs) and within 3% at every step
    (Adam carries the rounding on; test_distill's bf16 bound, which fails a run that stops learning or
    one whose weights or batches differ); it falls by more than 10%, as the CPU run's does."""
    cfg = json.loads((cuda_run / "run_config.json").read_text())
    assert cfg["teacher_placement"]["kind"] == "zero3"
    assert any("(ZeRO-2, fp32)" in line for line in cfg["layout"]), cfg["layout"]
    gpu_loss, cpu_loss = _relation(cuda_run), _relation(cpu_run)
    assert len(gpu_loss) == STEPS and all(map(math.isfinite, gpu_loss))
    assert gpu_loss[-1] < 0.9 * gpu_loss[0], (gpu_loss[0], gpu_loss[-1])
    assert gpu_loss[0] == pytest.approx(cpu_loss[0], rel=1e-3)
    assert gpu_loss == pytest.approx(cpu_loss, rel=0.03)
    assert (cuda_run / "student" / "model.safetensors").is_file()


@gpu
def test_a_bf16_student_on_cuda_follows_the_fp32_run(assets, cuda_run):
    """--precision bf16 on one GPU: DeepSpeed's bf16 engine (bf16 weights, its bf16 optimizer's files), the
    teacher in bf16 too (--teacher_precision auto). The loss is finite, falls, stays within 3% of the CUDA
    fp32 run's at every step and is not its numbers (test_distill's bf16 bound: the runs differ by bf16
    rounding alone, 8 significant bits)."""
    out = assets / "gpu-bf16"
    run_ok(deepspeed_cmd(flags(assets, out, precision="bf16", **SAME_STEP), procs=1), DS_ACCELERATOR="cuda")
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["precision"] == "bf16" and any("(ZeRO-2, bf16)" in line for line in cfg["layout"]), \
        cfg["layout"]
    tag = out / "checkpoints" / f"step_{STEPS:08d}"
    state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert {v.dtype for v in state["module"].values()} == {torch.bfloat16}
    assert [f.name for f in tag.glob("*optim_states.pt")] == \
        ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    bf16, fp32 = _relation(out), _relation(cuda_run)
    assert len(bf16) == STEPS and all(map(math.isfinite, bf16))
    assert bf16[-1] < 0.9 * bf16[0], (bf16[0], bf16[-1])
    assert bf16 == pytest.approx(fp32, rel=0.03)
    assert bf16 != fp32


# ---------------------------------------------------------------------------------------------
# The teacher's partitions on the GPU, and in host memory.

def _cuda_teacher_worker(rank, path, kind, want):
    _use_cuda()
    from minimoe.distributed import init_distributed
    from minimoe.placement import Placement
    from minimoe.teacher import Teacher
    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
          "zero_optimization": {"stage3_param_persistence_threshold": 0}}  # every weight partitioned
    teacher = Teacher(path, ds, layer=-1, placement=Placement(kind, "test"))
    homes = {p.ds_tensor.device.type for p in teacher.engine.module.parameters()}
    assert homes == {"cpu" if kind == "zero3_offload" else "cuda"}, homes
    got = teacher.qkv({k: v.cuda() for k, v in _batch().items()})
    for g, w in zip(got, want):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.parametrize("kind", ["zero3", "zero3_offload"])
def test_the_zero3_teacher_on_cuda_matches_the_plain_model(tmp_path, kind):
    """Teacher under ZeRO-3 on one GPU: its partitions live on the GPU (zero3) or in host memory
    (zero3_offload, fetched a layer at a time), and its captured Q/K/V equal the plain transformers model's
    on the CPU within 1e-4 (fp32; CUDA and CPU kernels round differently, a misplaced weight is off by
    O(1))."""
    path = tiny_teacher(str(tmp_path / "bert"), "bert")
    spawn(_cuda_teacher_worker, 1, path, kind, _plain_qkv(path, 2))


# ---------------------------------------------------------------------------------------------
# The optimizer a GPU run gets: DeepSpeed's FusedAdam.

def _fused_adam_worker(rank):
    _use_cuda()
    import copy
    from deepspeed.ops.adam import FusedAdam
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.config import DistillConfig
    from minimoe.distributed import init_distributed
    from minimoe.engine import build_student_engine, pop_precision, student_ds_config
    init_distributed()
    cfg = DistillConfig(ds_config=f"{REPO}/ds_configs/zero2_moe.json", micro_batch_size=2, lr=1e-3)
    fused_ds = student_ds_config(cfg, 1, "cuda")  # the merge a GPU run's student engine gets
    assert "torch_adam" not in fused_ds["optimizer"]["params"], fused_ds["optimizer"]
    fused_ds.pop("scheduler")  # a constant lr: the warm-up's first step has lr 0 and would move nothing
    pop_precision(fused_ds)
    torch_ds = copy.deepcopy(fused_ds)
    torch_ds["optimizer"]["params"]["torch_adam"] = True
    student = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128, num_experts=2,
                            hidden_dropout=0.0, attention_dropout=0.0)  # the two forwards identical
    engines = []
    for ds in (fused_ds, torch_ds):
        torch.manual_seed(0)
        model = MiniMoEModel(student)
        model.pooler.requires_grad_(False)  # as a distillation run: the loss does not reach it
        engines.append(build_student_engine(model, ds))
    fused, reference = engines
    assert type(fused.basic_optimizer) is FusedAdam, type(fused.basic_optimizer)
    assert type(reference.basic_optimizer) is torch.optim.AdamW, type(reference.basic_optimizer)
    start = {n: p.detach().clone() for n, p in fused.module.named_parameters()}
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        ids = torch.randint(1000, 5000, (2, 16), generator=g).cuda()
        for engine in engines:
            out = engine(ids, torch.ones_like(ids), output_qkv=True)
            engine.backward(sum(t.pow(2).mean() for t in out.qkv) + 0.01 * out.aux_loss)
            engine.step()
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in fused.module.named_parameters())
    assert moved > 5e-4, moved  # Adam's first step moves a weight by about lr (1e-3)
    for (name, p), q in zip(fused.module.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)


@gpu
def test_a_gpu_student_steps_with_deepspeeds_fused_adam_as_torch_adamw_would(tmp_path):
    """minimoe's ds_config merge leaves a GPU run's AdamW to DeepSpeed (no ``torch_adam``, which it sets
    on CPU only), so the engine's optimizer is DeepSpeed's FusedAdam (its CUDA kernel, built on first use).
    Two steps of it equal torch's AdamW on the same engine within 1e-5 (an Adam step moves a weight by about
    lr = 1e-3; the two order the decoupled weight decay differently, by lr^2 x decay)."""
    spawn(_fused_adam_worker, 1)


# ---------------------------------------------------------------------------------------------
# ONNX in onnxruntime's CUDA provider.

@gpu
def test_the_onnx_export_runs_in_onnxruntimes_cuda_provider(tmp_path):
    """The exported graph of an MoE student runs in the CUDA provider (``onnxruntime-gpu``; skipped with
    the plain CPU ``onnxruntime``), within 1e-4 of PyTorch on the CPU: the export's own tolerance."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (pip install onnxruntime-gpu)")
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.export.onnx import GRAPH_NAME, INPUTS, check_batches, export_onnx
    torch.manual_seed(0)
    cfg = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128, num_experts=4,
                        relation_projection=False)
    model = MiniMoEModel(cfg).eval()
    model.save_pretrained(str(tmp_path / "student"))
    export_onnx(str(tmp_path / "student"), str(tmp_path / "onnx"))
    # TF32 off: the provider's default on Ampere and later rounds fp32 matmul inputs to 10 mantissa bits
    session = ort.InferenceSession(str(tmp_path / "onnx" / GRAPH_NAME),
                                   providers=[("CUDAExecutionProvider", {"use_tf32": 0})])
    assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
    for batch in check_batches(cfg.vocab_size, cfg.pad_token_id):
        with torch.no_grad():
            want = model(*(batch[k] for k in INPUTS)).last_hidden_state
        got = session.run(None, {k: batch[k].numpy() for k in INPUTS})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Without CUDA (CI): make gpu-check checks that every step resolves, in one line.

SCRIPT = "benchmarks/gpu_check.sh"
no_cuda_only = pytest.mark.skipif(CUDA, reason="on a CUDA machine gpu_check.sh runs every step (minutes)")


def _gpu_check(root, tmp_path, **environ) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(root, SCRIPT)], env={**env(), "GPU_CHECK_OUT": str(tmp_path / "out"),
                                                              **environ},
                          capture_output=True, text=True, timeout=300)


@no_cuda_only
def test_gpu_check_without_cuda_resolves_every_step_and_says_so_in_one_line(tmp_path):
    p = _gpu_check(REPO, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == "" and p.stdout.count("\n") == 1, p.stdout + p.stderr
    assert p.stdout.startswith("gpu-check: no CUDA device here (torch.cuda.is_available() is False); checked "
                               "that its 7 steps resolve: gpu tests demo inference distill_step authors_step "
                               "teacher_scaling"), p.stdout
    assert p.stdout.rstrip().endswith("; ran nothing") and "pytest -m gpu selects 6 tests" in p.stdout
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    with open(os.path.join(REPO, "README.md")) as fh:
        assert p.stdout in fh.read(), "README's GPU check section shows another line"


@no_cuda_only
@pytest.mark.parametrize("broken", ["flag", "script"])
def test_a_step_that_does_not_resolve_stops_the_check_in_one_line(tmp_path, broken):
    """A flag a benchmark does not take (GPU_CHECK_EXTRA_FLAGS), or a script missing from a copy of the
    tree: exit 2, one line naming the step and why."""
    if broken == "flag":
        p = _gpu_check(REPO, tmp_path, GPU_CHECK_EXTRA_FLAGS="--no_such_flag 1")
        want = ("gpu-check: step inference does not resolve: TypeError: bench() got an unexpected keyword "
                "argument 'no_such_flag'\n")
    else:
        tree = tmp_path / "tree"
        for part in ("benchmarks", "launchers", "tests"):
            shutil.copytree(os.path.join(REPO, part), tree / part, ignore=shutil.ignore_patterns("results"))
        os.remove(tree / "benchmarks" / "authors_step.py")
        p = _gpu_check(str(tree), tmp_path)
        want = "gpu-check: step authors_step does not resolve: benchmarks/authors_step.py is missing\n"
    assert (p.returncode, p.stdout, p.stderr) == (2, want, "")
