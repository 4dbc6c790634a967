"""What every config module shares: the user-error type, field help, and the checks of files a run reads or
writes (done before the work, so a bad path costs one line)."""
from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the minimoe checkout


class ConfigError(ValueError):
    """A user error: bad flag, bad file, bad combination. Launchers print it as one line and exit 2."""


def _help(text: str, cli: bool = True, path: bool = False) -> dict:
    """Field metadata; ``path``: the value names files or folders (comma-separated allowed), whose leading
    ``~`` the flag parser expands (the shell leaves it alone after ``--flag=``)."""
    return {"help": text, "cli": cli, "path": path}


def load_json(path: str, what: str) -> dict:
    """Read a JSON file with one-line errors for the usual mistakes. A relative path that is not found
    here is looked up in the minimoe checkout, so the default ``ds_configs/...`` work from any folder."""
    shipped = os.path.join(REPO, path)
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(shipped):
        path = shipped
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a folder, not a JSON file")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path!r} is not a JSON text file (not UTF-8)")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def check_output_dir(path: str, what: str = "--output_dir") -> None:
    """The run folder must be a folder we can create or write: found now, not after the engines are built."""
    if not str(path).strip():
        raise ConfigError(f"{what} is empty: give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # a dangling link: os.makedirs would fail late with "File exists"
            link = repr(path) if existing == os.path.abspath(path) else f"{path!r}: {existing!r}"
            raise ConfigError(f"{what} {link} is a symbolic link to {os.readlink(existing)!r}, which does "
                              f"not exist; create that folder or choose another {what}")
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path!r} cannot be written ({existing!r} is not a writable folder); "
                          f"choose another {what}")


def check_output_file(path: str, what: str) -> None:
    """A file the run will write at its end: checked before the work, not after it."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a folder; give a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), f"{what}'s folder")
