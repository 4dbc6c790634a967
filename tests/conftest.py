import glob
import os
import time

import pytest

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
    from minimoe.distributed import SHM_PREFIX
    for f in glob.glob(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_*"):
        try:
            if os.path.getmtime(f) >= start:
                os.unlink(f)
        except OSError:
            pass
