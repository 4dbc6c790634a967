"""The Dockerfiles: lint clean, and no second list of pins (everything goes through `make deps`, which
reads requirements*.txt). Building and running the CPU image is `make docker-test` (.ci/run)."""
import os
import re
import shutil
import subprocess

import pytest

from helpers import REPO

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def read(path):
    with open(os.path.join(REPO, path)) as fh:
        return fh.read()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_is_clean(dockerfile):
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(os.sys.executable), "hadolint")
    p = subprocess.run([hadolint, "--no-color", os.path.join(REPO, dockerfile)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def deps_requirements():
    """The requirements files the Makefile's `deps` target installs (its prerequisites)."""
    rule = re.search(r"^\$\(VENV\)/\.deps: (.+)$", read("Makefile"), re.M)
    assert rule, "Makefile has no $(VENV)/.deps rule"
    return rule.group(1).split()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_the_pins_of_requirements_files_only(dockerfile):
    text = read(dockerfile)
    assert not re.search(r"pip3? install|==\d", text), f"{dockerfile} names packages or pins of its own"
    assert re.search(r"^RUN make deps\b", text, re.M) and re.search(r"^RUN make venv\b", text, re.M)
    # Every file `make deps` reads is in the image before it runs (its own layer, cached by them).
    copied_before = text[:text.index("RUN make deps")]
    for name in deps_requirements() + ["Makefile"]:
        assert re.search(rf"^COPY [^\n]*{re.escape(name)}|^    [^\n]*{re.escape(name)}", copied_before,
                         re.M), f"{dockerfile} does not copy {name} before `make deps`"


def test_torch_pin_has_one_source():
    """The Makefile installs torch first (CPU wheel on CPU hosts) at the pin it reads from
    requirements.txt."""
    makefile = read("Makefile")
    assert re.search(r"grep -E '\^torch==' requirements.txt", makefile)
    assert not re.search(r"torch==\d", makefile)
    assert re.search(r"^torch==\d", read("requirements.txt"), re.M)
