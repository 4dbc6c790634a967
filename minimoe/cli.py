"""The shared command-line front of every launcher: --help from the config dataclass, fire for the
flags, DeepSpeed's ``--local_rank`` taken out, and every failure as one line with an exit code."""
from __future__ import annotations

import sys
from typing import Callable

from .config import ConfigError
from .errors import report
from .flags import from_flags, help_text


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (fire would read it as a flag); LOCAL_RANK is in the
    env."""
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


def _check_positionals(argv: list[str]) -> None:
    """Every value belongs to a flag. fire would hand a stray one (an unquoted glob the shell expanded:
    ``--data dir/*.txt``) to the run's *result* after the whole run, and only then fail."""
    previous = None
    for token in argv:
        if token.startswith("--"):
            previous = token if "=" not in token else None
        elif previous is not None:
            previous = None  # the value of the flag before it
        else:
            raise ConfigError(f"unexpected argument {token!r}: every value belongs to a --flag; quote a "
                              "glob and join files with commas (--data 'dir/*.txt' or --data a.txt,b.txt)")


def main(config_cls, run: Callable | str, prog: str, argv: list[str] | None = None) -> int:
    """Parse flags into ``config_cls`` and call ``run(config)``. ``run`` may be "module:function", imported
    only after --help and flag parsing, so both answer without loading torch and DeepSpeed.

    Whatever stops the run ends in one line and an exit code (``errors.report``): 2 for bad input, 1 for
    a failure of the environment (files, disk, a peer rank), the traceback in a log file (``--debug``
    prints it too)."""
    import fire
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(config_cls, prog))
        print(f"  --{'debug':<24} Also print the full traceback of a failure (it always goes to a log file).")
        return 0
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from . import console
    console.install()  # before DeepSpeed is imported: its logger binds to the filtered stdout
    seen: dict = {}

    def entry(**flags):
        cfg = seen["cfg"] = from_flags(config_cls, flags)
        fn = run
        if isinstance(fn, str):
            import importlib
            module, _, name = fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
        fn(cfg)

    from .distributed import shutdown
    from .runlock import release
    try:
        _check_positionals(argv)
        fire.Fire(entry, command=argv, name=prog)
    except fire.core.FireExit as e:
        return int(e.code or 0)
    except KeyboardInterrupt:
        shutdown(wait=False)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure is turned into a line and a code
        code = report(e, getattr(seen.get("cfg"), "output_dir", None), debug)
        shutdown(wait=False)
        return code
    finally:
        release()  # the output folder's lock, held by rank 0 while the run lives
        console.save(getattr(seen.get("cfg"), "output_dir", None))
    shutdown()
    return 0
