"""The commands that start a planned job on every node, for each launcher a cluster may offer (what
``--dry_run`` prints). Pure string work: nothing here starts a process."""
from __future__ import annotations

import shlex

from .flags import to_flags
from .layout import Layout, World

SLURM_SCRIPT = "launchers/slurm/distill.sbatch"
DEFAULT_SCRIPT = "launchers/distill.py"


def launch_commands(world: World, script: str, flags: list[str], port: int) -> list[tuple[str, list[str]]]:
    """[(how, [command per node or one command])] for deepspeed (pdsh/ssh and no-ssh), torchrun, Slurm."""
    head = world.hosts[0][0]
    args = " ".join([script, *flags])
    rendezvous = f"--master_addr {head} --master_port {port}"
    hostfile = "hostfile"
    ways = [
        (f"the hostfile the deepspeed commands read: save these lines as ./{hostfile}",
         [f"{h} slots={s}" for h, s in world.hosts]),
        ("deepspeed over pdsh/ssh: one command, on node 0 (passwordless ssh, the same paths on every node; "
         "variables other than NCCL*/PYTHON*/UCX* go in .deepspeed_env)",
         [f"deepspeed --hostfile {hostfile} {rendezvous} {args}"]),
        ("deepspeed without ssh: one command per node, each started on its node",
         [f"deepspeed --hostfile {hostfile} --no_ssh --node_rank {i} {rendezvous} {args}"
          for i in range(world.nodes)]),
    ]
    if world.uniform:
        per_node = world.hosts[0][1]
        ways.append(("torchrun: one command per node, each started on its node",
                     [f"torchrun --nnodes {world.nodes} --nproc_per_node {per_node} --node_rank {i} "
                      f"{rendezvous} {args}" for i in range(world.nodes)]))
        export = "" if script == DEFAULT_SCRIPT else f"--export=ALL,LAUNCHER={script} "
        ways.append(("Slurm: one batch job (srun starts torchrun on every node; rendezvous on the first)",
                     [f"sbatch --nodes {world.nodes} --gpus-per-node {per_node} {export}{SLURM_SCRIPT} "
                      f"{' '.join(flags)}"]))
    return ways


def format_commands(ways: list[tuple[str, list[str]]]) -> str:
    lines = []
    for how, commands in ways:
        lines.append(f"# {how}")
        lines += [f"  {c}" for c in commands]
    return "\n".join(lines)


def quote_flags(pairs: list[tuple[str, object]]) -> list[str]:
    return [f"--{name} {shlex.quote(str(value))}" for name, value in pairs]


def dry_run(cfg, layout: Layout, script: str, more: str = "") -> dict:
    """--dry_run: print the layout (and ``more`` of the plan), then the commands that start the job
    (``script`` with ``cfg``'s flags) on every node; start nothing."""
    commands = launch_commands(layout.world, script, quote_flags(to_flags(cfg)), cfg.launch.master_port)
    print("\n".join([
        layout.describe(), *([more] if more else []),
        "note: memory per rank above is this machine's; run --dry_run on a node of the job for its own",
        "", "launch commands (the same flags on every node):", format_commands(commands)]))
    return {"dry_run": True, "world_size": layout.world_size, "global_batch": layout.global_batch}
