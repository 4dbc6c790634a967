"""Command-line flags <-> config dataclasses: one flat namespace over a config and its nested dataclasses
(the student, the launch plan), typed from the fields' annotations; --help generated from the docstrings
and field metadata. The dataclasses themselves (what the settings are) live in ``config.py``."""
from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from typing import Any, Optional, Union

from .config import ConfigError


def _cli_fields(cls) -> list[tuple[Optional[str], dataclasses.Field]]:
    """(section, field) for every flag: the launcher's own fields, the nested dataclasses' (the student),
    then the shared ones inherited from TrainConfig."""
    out = []
    hints = typing.get_type_hints(cls)
    own = set(cls.__dict__.get("__annotations__", {}))
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [(f.name, g) for g in dataclasses.fields(hints[f.name]) if g.metadata.get("cli", True)]
        elif f.metadata.get("cli", True):
            out.append((None, f))
    return out


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a fire-parsed value of flag ``--name`` to ``annotation`` (bool, int, float, str or an Optional
    of them), or raise a one-line ConfigError. Scripts with flags of their own use it too: fire passes
    ``--flag false`` as the text "false", which ``bool()`` would read as True."""
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin is Union else (annotation,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                return float(value)  # fire leaves these as text; validation then names them as not finite
        elif t is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, (tuple, list)):  # fire splits "a.txt,b.txt" into a tuple
                return ",".join(str(v) for v in value)
    allowed = " or ".join("true or false" if t is bool else getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"--{name} {value!r} is invalid: expected {allowed}")


def expand_home(value: Any) -> Any:
    """``~`` at the start of each comma-separated path, expanded: the shell leaves it alone after
    ``--output_dir=~/run``, and the run would create a folder named ``~``. Hub and packaged names never
    start with ``~``."""
    if not isinstance(value, str) or "~" not in value:
        return value
    return ",".join(os.path.expanduser(v.strip()) if v.strip().startswith("~") else v
                    for v in value.split(","))


def coerce_fields(cls, values: dict) -> dict:
    """``values`` converted to the types of ``cls``'s fields (a file's or an inline entry's settings)."""
    hints = typing.get_type_hints(cls)
    return {name: coerce(name, value, hints[name]) for name, value in values.items()}


def from_flags(cls, flags: dict):
    """Build ``cls`` from a flat ``{flag: value}`` dict (as fire gives it) and validate it."""
    fields = {f.name: (section, f) for section, f in _cli_fields(cls)}
    hints = typing.get_type_hints(cls)
    top, nested = {}, {}
    for name, value in flags.items():
        name = name.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown flag --{name}; see --help for the allowed flags")
        section, f = fields[name]
        owner = hints[section] if section else cls
        value = coerce(name, value, typing.get_type_hints(owner)[f.name])
        if f.metadata.get("path"):
            value = expand_home(value)
        (nested.setdefault(section, {}) if section else top)[name] = value
    for section, values in nested.items():
        top[section] = hints[section](**values)
    if hasattr(cls, "settle_given"):  # what one flag given alone implies for another's default
        top = cls.settle_given(top)
    return cls(**top).validate()


def help_text(cls, prog: str) -> str:
    """The --help page, generated from the dataclass docstrings and field metadata."""
    lines = [f"usage: {prog} [--flag value ...]", "", inspect.cleandoc(cls.__doc__ or ""), "", "flags:"]
    for _, f in _cli_fields(cls):
        lines.append(f"  --{f.name:<24} {f.metadata['help']} [default: {f.default}]")
    return "\n".join(lines)


def to_flags(cfg, skip_sections: tuple = ("launch",)) -> list[tuple[str, Any]]:
    """(flag, value) for every setting of ``cfg`` that differs from its default: the command line that
    rebuilds it (what --dry_run prints into the launch commands)."""
    default = type(cfg)()
    out = []
    for section, f in _cli_fields(type(cfg)):
        if section in skip_sections or not f.metadata.get("replayed", True):
            continue
        value = getattr(getattr(cfg, section) if section else cfg, f.name)
        if value != getattr(getattr(default, section) if section else default, f.name):
            out.append((f.name, value))
    return out
