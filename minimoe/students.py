"""``--students``: several students distilled from one teacher pass, each described by the flags of a
single-student run. Pure parsing, validation and planning (no torch): an entry becomes the
``DistillConfig`` its own single-student run would have, so every rule of a single run (shapes, ep_size,
relation heads) checks it; ``StudentPlan`` is an entry planned (its layout), ``check_fit`` and
``describe_students`` are what the run's plan and ``--dry_run`` say of them together.

Two forms of ``--students``:

- a ``.json``, ``.yaml`` or ``.yml`` file holding a list of objects (or ``{"students": [...]}``)::

      - {name: moe4, num_experts: 4, ep_size: 2}
      - {name: dense, num_experts: 1, ffn_size: 1536}

- inline, entries separated by ``;``, each ``name:key=value,key=value``::

      --students 'moe4:num_experts=4,ep_size=2;dense:num_experts=1'

The student flags of the command line are the defaults of every entry; an entry's keys override them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, DistillConfig, StudentConfig
from .flags import coerce_fields
from .layout import Layout, gib
from .monitor import member_folder
from .placement import GiB

# What an entry may set besides the student's architecture: the run-level flags that are the student's own.
RUN_KEYS = ("ep_size", "relation_heads", "lr", "load_balance_weight", "relation_dropout")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DERIVED = ("gate_noise", "relation_projection")  # StudentConfig fills these from others when not given


def student_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(StudentConfig) if f.metadata.get("cli", True)]


def allowed_keys() -> list[str]:
    return ["name", *student_keys(), *RUN_KEYS]


def read_entries(value: str) -> list[dict]:
    """The raw entries of ``--students``: a file's list, or the inline form."""
    text = str(value).strip()
    if text.lower().endswith((".json", ".yaml", ".yml")):
        return _read_file(text)
    entries = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, colon, rest = part.partition(":")
        entry: dict[str, Any] = {"name": name.strip()}
        for item in (i.strip() for i in rest.split(",") if i.strip()) if colon else ():
            key, eq, raw = item.partition("=")
            if not eq:
                raise ConfigError(f"--students {value!r}: {item!r} in entry {name.strip()!r} is not "
                                  "key=value; inline form: 'name:key=value,key=value;name2:key=value'")
            entry[key.strip()] = _scalar(raw.strip())
        entries.append(entry)
    if not entries:
        raise ConfigError(f"--students {value!r} names no student: give a .json/.yaml file or "
                          "'name:key=value,...;name2:...'")
    return entries


def _scalar(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _read_file(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"--students {path!r} does not exist (a .json or .yaml file, or the inline form "
                          "'name:key=value,...;name2:...')")
    try:
        with open(path, encoding="utf-8") as fh:
            if path.lower().endswith(".json"):
                data = json.load(fh)
            else:
                import yaml
                data = yaml.safe_load(fh)
    except UnicodeDecodeError:
        raise ConfigError(f"--students {path!r} is not a text file (not UTF-8)")
    except json.JSONDecodeError as e:
        raise ConfigError(f"--students {path!r} is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}")
    except Exception as e:  # yaml.YAMLError: its first line names the place
        raise ConfigError(f"--students {path!r} is not valid YAML: {str(e).splitlines()[0]}")
    if isinstance(data, dict) and set(data) == {"students"}:
        data = data["students"]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise ConfigError(f"--students {path!r} must hold a non-empty list of objects (one per student), "
                          "e.g. [{\"name\": \"moe4\", \"num_experts\": 4}]")
    return data


def _base_student(cfg: StudentConfig) -> dict:
    """The command line's student as entry defaults: a derived field left at its derived value is derived
    again for each entry (a dense entry of a MoE command line gets no relation projection)."""
    base = cfg.to_dict()
    if base["gate_noise"] == base["hidden_dropout"]:
        base["gate_noise"] = None
    if base["relation_projection"] == (base["num_experts"] > 1):
        base["relation_projection"] = None
    return base


def expand(cfg: DistillConfig) -> list[tuple[str, DistillConfig]]:
    """``[(name, the single-student config of that entry)]``; ``[("", cfg)]`` without ``--students``.
    Each entry is validated as its own run would be; a bad one is named in the one-line error."""
    if not cfg.students:
        return [("", cfg)]
    out, allowed = [], allowed_keys()
    base = _base_student(cfg.student)
    for i, entry in enumerate(read_entries(cfg.students)):
        # YAML reads 2e-4 as text (only 2.0e-4 as a number): read values as the inline form does
        entry = {k: _scalar(v) if isinstance(v, str) and k != "name" else v for k, v in entry.items()}
        name = str(entry.get("name", "")).strip()
        if not _NAME.match(name):
            raise ConfigError(f"--students entry {i + 1}: name {name!r} is invalid: give each student a "
                              "name of letters, digits, '_', '.', '-' (it names the folder students/<name>/)")
        if name in (n for n, _ in out):
            raise ConfigError(f"--students: the name {name!r} is used twice; each student needs its own")
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ConfigError(f"--students entry {name!r}: unknown key {unknown[0]!r}; allowed: "
                              f"{', '.join(allowed)}")
        student = {**base, **{k: v for k, v in entry.items() if k in base}}
        run = {k: entry[k] for k in RUN_KEYS if k in entry}
        try:
            student = coerce_fields(StudentConfig, student)
            run = coerce_fields(DistillConfig, run)
            one = dataclasses.replace(cfg, students="", student=StudentConfig(**student), **run)
            one.validate()
        except ConfigError as e:
            raise ConfigError(f"--students entry {name!r}: {e}") from None
        out.append((name, one))
    return out


@dataclass
class StudentPlan:
    """One student of the run, planned: the config its own single-student run would have, its layout
    (expert groups, memory per rank) and merged ds_config."""

    name: str                   # "" without --students
    cfg: DistillConfig
    student: StudentConfig      # with the teacher's vocabulary and padding id
    layout: Layout
    ds: dict                    # merged; the schedule's step counts are filled once the data is known
    target: dict                # the teacher layer, its width and the relation heads the student matches

    @property
    def folder(self) -> str:
        """Where its student/, metrics.jsonl and summary.json go, inside the run folder."""
        return member_folder(self.name)


def check_fit(students: list[StudentPlan], memory_per_rank: int) -> None:
    """Every student's training state and the teacher's share live on each rank at once."""
    teacher = students[0].layout.teacher_bytes_per_rank()["device"]
    need = teacher + sum(sp.layout.student_bytes_per_rank()["total"] for sp in students)
    if need > memory_per_rank:
        raise ConfigError(f"the {len(students)} students and the teacher need {need / GiB:.2f} GiB per rank "
                          f"before activations, over the {memory_per_rank / GiB:.1f} GiB each rank has; "
                          "list fewer or smaller students (--dry_run shows each one's share)")


def describe_students(students: list[StudentPlan]) -> str:
    """Each student's shape and memory per rank, and the total (the run's --dry_run and first lines)."""
    lines = [f"students: {len(students)}, each trained on every micro-batch of one teacher pass"]
    total = 0
    for sp in students:
        s, b = sp.student, sp.layout.student_bytes_per_rank()
        total += b["total"]
        lines.append(f"  {sp.name}: {s.num_layers}L H{s.hidden_size} FFN {s.ffn_size} x {s.num_experts} "
                     f"experts, ep_size {sp.cfg.ep_size}, relation heads {sp.cfg.relation_heads}: "
                     f"per rank {gib(b['total'])} + activations")
    teacher = students[0].layout.teacher_bytes_per_rank()
    lines.append(f"  total per rank: students {gib(total)} + teacher {gib(teacher['device'])} + activations")
    return "\n".join(lines)
