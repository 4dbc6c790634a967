"""The run's layout, planned before any process starts: the world (nodes x processes), expert-parallel
groups and which global experts each rank holds, the global batch, where the teacher lives, and what
each rank's memory must hold. One pure function builds it (``plan_layout``) and validates every
combination in one place; the loops ask it for ``ep_rank`` and friends instead of recomputing them.

DeepSpeed's grouping (0.19, ``groups._create_expert_and_data_parallel``): expert-parallel groups are
consecutive ranks ``[i*ep, (i+1)*ep)``, so with ``ep_size`` <= GPUs per node the all-to-all stays inside a
node; expert-data-parallel groups (the replicas of one expert) are the strided ranks ``j, j+ep, ...``;
a rank's ``ep_rank`` is ``rank % ep_size`` and it holds global experts ``[ep_rank*E/ep, (ep_rank+1)*E/ep)``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError
from .placement import GiB, Placement


@dataclass(frozen=True)
class World:
    """Hosts and processes per host, in rank order (node 0's ranks first)."""

    hosts: tuple[tuple[str, int], ...]
    source: str = "environment"

    @property
    def size(self) -> int:
        return sum(slots for _, slots in self.hosts)

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    def node_of(self, rank: int) -> int:
        for node, first in enumerate(self.first_ranks()):
            if first <= rank < first + self.hosts[node][1]:
                return node
        raise IndexError(rank)

    def first_ranks(self) -> list[int]:
        out, n = [], 0
        for _, slots in self.hosts:
            out.append(n)
            n += slots
        return out

    @property
    def uniform(self) -> bool:
        return len({slots for _, slots in self.hosts}) == 1

    @classmethod
    def from_counts(cls, nodes: int, per_node: int, source: str = "--num_nodes/--gpus_per_node") -> "World":
        if nodes < 1 or per_node < 1:
            raise ConfigError(f"--num_nodes {nodes} and --gpus_per_node {per_node} must both be >= 1")
        return cls(tuple((f"node{i}", per_node) for i in range(nodes)), source)

    @classmethod
    def from_hostfile(cls, path: str) -> "World":
        """DeepSpeed's hostfile: one ``hostname slots=N`` per line; ``#`` comments and blank lines allowed."""
        if not os.path.isfile(path):
            raise ConfigError(f"--hostfile {path!r} does not exist")
        hosts = []
        with open(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
                if not m or int(m.group(2)) < 1:
                    raise ConfigError(f"--hostfile {path!r} line {lineno}: {line!r} is not "
                                      "'hostname slots=N' (N >= 1)")
                if any(h == m.group(1) for h, _ in hosts):
                    raise ConfigError(f"--hostfile {path!r} line {lineno}: "
                                      f"host {m.group(1)!r} is listed twice")
                hosts.append((m.group(1), int(m.group(2))))
        if not hosts:
            raise ConfigError(f"--hostfile {path!r} lists no hosts")
        return cls(tuple(hosts), f"--hostfile {path}")

    @classmethod
    def from_slurm(cls, env: dict) -> "World":
        """The allocation Slurm describes: SLURM_JOB_NODELIST and GPUs (or tasks) per node."""
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        per_node = _slurm_per_node(env)
        return cls(tuple((h, per_node) for h in hosts), "Slurm allocation (SLURM_JOB_NODELIST)")

    @classmethod
    def from_env(cls, world_size: int, local_world_size: int) -> "World":
        """The world a launcher started: WORLD_SIZE ranks, LOCAL_WORLD_SIZE of them per node."""
        local = local_world_size if local_world_size and world_size % local_world_size == 0 else world_size
        return cls(tuple((f"node{i}", local) for i in range(world_size // local)), "environment")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``gpu[01-03,07],login1``) -> host names, as
    ``scontrol show hostnames``."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hi = hi or lo
            if not (lo.isdigit() and hi.isdigit()):
                raise ConfigError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read the range {part!r}")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST {nodelist!r} names no hosts")
    return hosts


def _slurm_per_node(env: dict) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "")
        m = re.search(r"(\d+)(?:\(x\d+\))?$", value)  # "8", "h100:8", "8(x2)"
        if m:
            return int(m.group(1))
    raise ConfigError("the Slurm environment says neither SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE nor "
                      "SLURM_NTASKS_PER_NODE: pass --gpus_per_node")


def run_world(launch, env: dict) -> World:
    """The world of this run: the launcher's (WORLD_SIZE, LOCAL_WORLD_SIZE), or, with --dry_run, the job
    being planned: a hostfile, explicit counts, a Slurm allocation, else the launcher's."""
    world = int(env.get("WORLD_SIZE", "1"))
    launched = World.from_env(world, int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world))))
    if not launch.dry_run:
        return launched
    hostfile, num_nodes, gpus_per_node = launch.hostfile, launch.num_nodes, launch.gpus_per_node
    if hostfile and (num_nodes or gpus_per_node):
        raise ConfigError("give either --hostfile or --num_nodes/--gpus_per_node, not both")
    if hostfile:
        return World.from_hostfile(hostfile)
    if num_nodes or gpus_per_node:
        return World.from_counts(num_nodes or 1, gpus_per_node or 1)
    if "SLURM_JOB_NODELIST" in env:
        return World.from_slurm(env)
    return launched


@dataclass(frozen=True)
class StudentShape:
    """What the memory estimate needs of a student: parameters outside and inside the experts."""

    dense_params: int
    expert_params: int          # all experts of all layers
    num_experts: int


@dataclass(frozen=True)
class Layout:
    world: World
    ep_size: int
    student: StudentShape
    micro_batch: int
    grad_accum: int
    zero_stage: int
    precision: str
    placement: Optional[Placement] = None
    teacher_bytes: int = 0
    notes: tuple[str, ...] = field(default=())

    # ---- expert parallelism
    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def experts_per_rank(self) -> int:
        return self.student.num_experts // self.ep_size

    @property
    def expert_replicas(self) -> int:
        """Ranks holding each expert (its data-parallel group)."""
        return self.world_size // self.ep_size

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def experts_of(self, rank: int) -> range:
        first = self.ep_rank(rank) * self.experts_per_rank
        return range(first, first + self.experts_per_rank)

    def ep_groups(self) -> list[list[int]]:
        return [list(range(i, i + self.ep_size)) for i in range(0, self.world_size, self.ep_size)]

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    # ---- memory per rank
    def student_bytes_per_rank(self) -> dict:
        """ZeRO accounting (Rajbhandari et al.): weights and gradients in the training dtype, Adam's two
        fp32 moments (+ an fp32 master copy under bf16/fp16) partitioned over the data-parallel group:
        all ranks for shared weights, the expert's replicas for expert weights. Stage 2 partitions the
        gradients too. Activations are not counted."""
        width = 4 if self.precision == "fp32" else 2
        adam = 8 + (4 if width == 2 else 0)
        local_experts = self.student.expert_params // self.ep_size
        params = self.student.dense_params + local_experts
        optimizer = adam * (self.student.dense_params / self.world_size
                            + local_experts / self.expert_replicas)
        if self.zero_stage == 0:
            optimizer = adam * params
        grads = width * params
        if self.zero_stage >= 2:
            grads = width * (self.student.dense_params / self.world_size
                             + local_experts / self.expert_replicas)
        out = {"weights": width * params, "grads": int(grads), "optimizer": int(optimizer)}
        out["total"] = sum(out.values())
        return out

    def teacher_bytes_per_rank(self) -> dict:
        if self.placement is None:
            return {"device": 0, "host": 0}
        return self.placement.bytes_per_rank(self.teacher_bytes, self.world_size)

    def describe(self) -> str:
        w, s = self.world, self.student_bytes_per_rank()
        shape = (f"{w.nodes} nodes x {w.hosts[0][1]}" if w.uniform
                 else " + ".join(f"{h}:{n}" for h, n in w.hosts))
        groups = [f"ranks {g[0]}-{g[-1]} (node {_span(range(w.node_of(g[0]), w.node_of(g[-1]) + 1))})"
                  if len(g) > 1 else f"rank {g[0]} (node {w.node_of(g[0])})" for g in self.ep_groups()]
        lines = [
            f"world: {w.size} ranks = {shape}  ({w.source})",
            f"batch: micro {self.micro_batch} x accum {self.grad_accum} x {w.size} ranks = global "
            f"{self.global_batch}",
            f"experts: {self.student.num_experts} per layer, ep_size {self.ep_size}: "
            f"{self.experts_per_rank} per rank, each expert held by {self.expert_replicas} rank(s) "
            f"(its data-parallel group)",
            "  rank r holds by ep_rank = r % ep_size: "
            + ", ".join(f"{k}: experts {_span(self.experts_of(k))}" for k in range(self.ep_size)),
            "  expert-parallel groups (all-to-all): " + ", ".join(groups[:8])
            + (f", ... {len(groups) - 8} more" if len(groups) > 8 else ""),
            f"student per rank (ZeRO-{self.zero_stage}, {self.precision}): weights {gib(s['weights'])}, "
            f"grads {gib(s['grads'])}, optimizer {gib(s['optimizer'])} = {gib(s['total'])} + activations"]
        if self.placement is not None:
            t = self.teacher_bytes_per_rank()
            where = ", ".join(f"{k} {gib(v)}" for k, v in t.items() if v) or "0"
            lines.append(f"teacher: {gib(self.teacher_bytes)}, placement {self.placement.kind}: "
                         f"per rank {where}")
            lines.append(f"  why: {self.placement.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _span(r: range) -> str:
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.01 * GiB else f"{n / 2 ** 20:.1f} MiB"


def plan_layout(world: World, ep_size: int, student: StudentShape, micro_batch: int, grad_accum: int,
                zero_stage: int, precision: str, placement: Optional[Placement] = None,
                teacher_bytes: int = 0) -> Layout:
    """Validate the combination and return the Layout. Every ep_size rule lives here."""
    e = student.num_experts
    if ep_size < 1:
        raise ConfigError(f"--ep_size {ep_size} is invalid: must be >= 1")
    if e == 1 and ep_size > 1:
        raise ConfigError(f"--ep_size {ep_size} needs a MiniMoE student with experts; this one is dense")
    if e % ep_size:
        raise ConfigError(f"--ep_size {ep_size} must divide the student's {e} experts")
    if world.size % ep_size:
        raise ConfigError(f"--ep_size {ep_size} must divide the world size {world.size}")
    if zero_stage == 3 and e > 1:
        raise ConfigError("ZeRO stage 3 is not supported for a MoE student (DeepSpeed MoE refuses it); "
                          "use stage 1 or 2, e.g. ds_configs/zero2_moe.json")
    if zero_stage == 0 and ep_size > 1:
        # Measured on DeepSpeed 0.19.8: ZeRO-0 + expert parallelism computes the clipping norm
        # without the other ranks' experts, so clipping silently does nothing.
        raise ConfigError(f"ZeRO stage 0 with --ep_size {ep_size} clips gradients wrongly in DeepSpeed; "
                          "use stage 1 or 2")
    layout = Layout(world, ep_size, student, micro_batch, grad_accum, zero_stage, precision, placement,
                    teacher_bytes)
    if any(len({world.node_of(r) for r in group}) > 1 for group in layout.ep_groups()):
        note = (f"an expert-parallel group of {ep_size} ranks spans nodes: its all-to-all crosses the "
                f"network (keep --ep_size <= processes per node, {min(s for _, s in world.hosts)}, "
                f"when you can)")
        layout = dataclasses.replace(layout, notes=(note,))
    return layout
