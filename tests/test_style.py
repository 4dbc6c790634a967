"""The house style: every tracked .py file keeps its lines within 110 characters (ruff's E501, at
pyproject.toml's [tool.ruff] line-length)."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_python_files() -> list[str]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: the files checked are git's tracked .py files")
    top = subprocess.run([git, "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True, text=True)
    if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(REPO):
        pytest.skip("not a git checkout of minimoe (an sdist?): no tracked-file list to check")
    listed = subprocess.run([git, "ls-files", "-z", "*.py"], cwd=REPO, capture_output=True, text=True,
                            check=True)
    return [f for f in listed.stdout.split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def test_tracked_python_files_fit_the_line_length():
    files = _tracked_python_files()
    assert files, "git ls-files listed no .py files"
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "E501", "--line-length", "110"]
    p = subprocess.run(cmd + files, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, \
        f"python {' '.join(cmd[1:])} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}"
