"""The run's layout, planned before launch: pure planning, the dry run through the launcher, and the
expert groups it promises checked against the ones DeepSpeed really builds."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, spawn
from minimoe.config import ConfigError
from minimoe.layout import StudentShape, World, expand_nodelist, plan_layout, run_world

MOE16 = StudentShape(dense_params=20_000_000, expert_params=16 * 4 * 1_200_000, num_experts=16)


def _hostfile(tmp_path, text):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


def test_four_nodes_of_eight_with_16_experts_over_ep8(tmp_path):
    world = World.from_hostfile(_hostfile(tmp_path, "# the job\ngpu01 slots=8\ngpu02 slots=8\n\n"
                                                    "gpu03 slots=8\ngpu04 slots=8  # last\n"))
    layout = plan_layout(world, 8, MOE16, micro_batch=16, grad_accum=2, zero_stage=2, precision="bf16")
    assert (layout.world_size, world.nodes, layout.global_batch) == (32, 4, 16 * 2 * 32)
    assert layout.experts_per_rank == 2 and layout.expert_replicas == 4
    assert layout.ep_rank(9) == 1 and list(layout.experts_of(9)) == [2, 3] and \
        list(layout.experts_of(31)) == [14, 15]
    assert layout.ep_groups()[1] == list(range(8, 16)) and world.node_of(15) == 1 and world.node_of(16) == 2
    assert not layout.notes  # every all-to-all stays inside a node
    text = layout.describe()
    assert "32 ranks = 4 nodes x 8" in text and "7: experts 14-15" in text and "ranks 24-31 (node 3)" in text


def test_student_memory_follows_zero_accounting():
    world = World.from_counts(2, 4)
    s1 = plan_layout(world, 4, MOE16, 8, 1, zero_stage=1, precision="bf16").student_bytes_per_rank()
    s2 = plan_layout(world, 4, MOE16, 8, 1, zero_stage=2, precision="bf16").student_bytes_per_rank()
    local = MOE16.dense_params + MOE16.expert_params // 4        # experts split over 4 ranks
    assert s1["weights"] == s2["weights"] == 2 * local
    # Adam moments + fp32 master (12 bytes) over 8 ranks for shared weights, over 2 replicas for experts
    assert s1["optimizer"] == s2["optimizer"] == int(12 * (MOE16.dense_params / 8
                                                           + MOE16.expert_params / 4 / 2))
    assert s1["grads"] == 2 * local and s2["grads"] < s1["grads"] / 2


def test_invalid_layouts_are_one_line_errors(tmp_path):
    world = World.from_counts(1, 6)
    for ep, stage, shape, msg in [
        (4, 2, MOE16, "--ep_size 4 must divide the world size 6"),
        (5, 2, MOE16, "--ep_size 5 must divide the student's 16 experts"),
        (2, 3, MOE16, "ZeRO stage 3 is not supported for a MoE student"),
        (2, 0, MOE16, "ZeRO stage 0 with --ep_size 2 clips gradients wrongly"),
        (2, 2, StudentShape(10, 0, 1), "--ep_size 2 needs a MiniMoE student with experts"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            plan_layout(world, ep, shape, 8, 1, stage, "fp32")
    with pytest.raises(ConfigError, match="line 2: 'gpu02 slots=x' is not 'hostname slots=N'"):
        World.from_hostfile(_hostfile(tmp_path, "gpu01 slots=8\ngpu02 slots=x\n"))
    with pytest.raises(ConfigError, match="host 'a' is listed twice"):
        World.from_hostfile(_hostfile(tmp_path, "a slots=1\na slots=1\n"))
    spans = plan_layout(World.from_counts(2, 2), 4, MOE16, 8, 1, 2, "fp32")
    assert "spans nodes" in spans.notes[0]


def test_slurm_and_launcher_worlds():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]

    class Launch:
        dry_run, hostfile, num_nodes, gpus_per_node = True, "", 0, 0

    slurm = run_world(Launch, {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_PER_NODE": "h100:4"})
    assert slurm.hosts == (("n1", 4), ("n2", 4))
    Launch.dry_run = False  # a real run: the launcher's world, whatever Slurm says
    launched = run_world(Launch, {"SLURM_JOB_NODELIST": "n[1-2]", "WORLD_SIZE": "4", "LOCAL_SIZE": "2"})
    assert launched.hosts == (("node0", 2), ("node1", 2))


def _dry_run(args, env=None):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "launchers/distill.py", "--dry_run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_plan_and_every_nodes_command(tmp_path):
    hosts = _hostfile(tmp_path, "".join(f"gpu0{i} slots=8\n" for i in range(1, 5)))
    out = tmp_path / "never"
    p = _dry_run(["--hostfile", hosts, "--num_experts", "16", "--ep_size", "8", "--output_dir", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "world: 32 ranks = 4 nodes x 8" in p.stdout and "global 1024" in p.stdout
    per_node = [l for l in p.stdout.splitlines() if "--no_ssh --node_rank" in l]
    assert len(per_node) == 4 and "--node_rank 3 --master_addr gpu01" in per_node[3]
    assert all("--num_experts 16 --ep_size 8" in l and "--dry_run" not in l for l in per_node)
    assert "torchrun --nnodes 4 --nproc_per_node 8 --node_rank 0" in p.stdout
    assert not out.exists()  # nothing written, no process group
    p = _dry_run(["--ep_size", "2"], env={"SLURM_JOB_NODELIST": "a[1-2]", "SLURM_GPUS_ON_NODE": "2"})
    assert p.returncode == 0 and \
        "sbatch --nodes 2 --gpus-per-node 2 launchers/slurm/distill.sbatch --ep_size 2" in p.stdout
    p = _dry_run(["--hostfile", hosts, "--ep_size", "3"])
    assert p.returncode == 2 and \
        p.stderr.strip().splitlines()[-1] == "error: --ep_size 3 must divide the student's 4 experts"


def _groups_worker(rank, out):
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.distributed import init_distributed
    init_distributed()
    layout = plan_layout(World.from_counts(2, 2), 2, StudentShape(1, 4, 4), 1, 1, 2, "fp32")
    model = MiniMoEModel(StudentConfig(num_layers=1, hidden_size=32, num_heads=2, ffn_size=32, num_experts=4,
                                       vocab_size=100), ep_size=2, ep_rank=layout.ep_rank(rank))
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.set_deepspeed_parallelism()  # what deepspeed.initialize does: build the groups
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"ep": list(groups._EXPERT_PARALLEL_GROUP_RANKS["ep_size_2"]),
                   "edp": list(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS["ep_size_2"]),
                   "ep_rank": groups._get_expert_parallel_rank("ep_size_2"),
                   "planned": layout.ep_groups(), "planned_ep_rank": layout.ep_rank(rank)}, fh)
    del model


@pytest.mark.slow
def test_planned_expert_groups_are_the_ones_deepspeed_builds(tmp_path):
    spawn(_groups_worker, 4, str(tmp_path / "g"))
    for rank in range(4):
        got = json.load(open(tmp_path / f"g.{rank}"))
        assert got["ep_rank"] == got["planned_ep_rank"] == rank % 2
        assert got["ep"] in got["planned"] and rank in got["ep"]
        assert got["edp"] == list(range(rank % 2, 4, 2))
