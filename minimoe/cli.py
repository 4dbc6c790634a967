"""The shared command-line front of every launcher: --help from the config dataclass, fire for the
flags, DeepSpeed's ``--local_rank`` taken out, and user errors as one line with exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .config import ConfigError
from .flags import from_flags, help_text


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (fire would read it as a flag); LOCAL_RANK is in the env."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(a)
    return out


def main(config_cls, run: Callable | str, prog: str, argv: list[str] | None = None) -> int:
    """Parse flags into ``config_cls`` and call ``run(config)``. ``run`` may be "module:function", imported
    only after --help and flag parsing, so both answer without loading torch and DeepSpeed."""
    import fire
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(config_cls, prog))
        return 0

    def entry(**flags):
        cfg = from_flags(config_cls, flags)
        fn = run
        if isinstance(fn, str):
            import importlib
            module, _, name = fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
        fn(cfg)

    try:
        fire.Fire(entry, command=argv, name=prog)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank raises the same error; say it once
            print(f"error: {e}", file=sys.stderr)
        from .distributed import shutdown
        shutdown(wait=False)
        return 2
    except fire.core.FireExit as e:
        return int(e.code or 0)
    from .distributed import shutdown
    shutdown()
    return 0
