import glob
import os
import subprocess
import time

import pytest

from helpers import deepspeed_cmd, env, flags, run_ok, tiny_teacher, wiki_slice

# CPU DeepSpeed, quietly; no wandb network; all tests offline.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def sweep_deepspeed_shm():
    """Runs killed on purpose (SIGKILL) cannot unlink their DeepSpeed shm buffers; sweep ours."""
    start = time.time() - 1
    yield
    from minimoe.shm import SHM_PREFIX
    for f in glob.glob(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_*"):
        try:
            if os.path.getmtime(f) >= start:
                os.unlink(f)
        except OSError:
            pass


# The distillation launcher's shared fixtures (tests/test_distill.py, tests/test_multinode.py).
@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    tiny_teacher(str(tmp / "teacher"), "bert", hidden=64, layers=3)
    wiki_slice(str(tmp / "wiki.jsonl"), docs=10)
    return tmp


@pytest.fixture(scope="session")
def straight_run(assets):
    """Uninterrupted reference run under the deepspeed launcher: 2 ranks, 4 experts split 2 + 2."""
    out = assets / "straight"
    # stdout and stderr as a terminal shows them, interleaved (tests/test_console.py reads it)
    p = subprocess.run(deepspeed_cmd(flags(assets, out)), env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:]
    (assets / "straight.console").write_text(p.stdout)
    return out
