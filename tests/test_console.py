"""What a run prints: the plan, one progress bar, the summary and real warnings; the libraries' known
harmless messages go to logs/console-rank<N>.log (minimoe/console.py)."""
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, env

SCRIPT = r"""
import logging, sys, warnings
sys.path.insert(0, sys.argv[1])
from minimoe import console
console.install()
print("world: 2 ranks")
print("No existing process group found, creating a new group named: ep_size_2")
print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler(sys.stdout))  # as DeepSpeed's own handler
logging.getLogger("DeepSpeed").warning("Attempting to get learning rate from scheduler before it has started")
logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("a real warning", UserWarning)
logging.getLogger("transformers.tokenization_utils_base").warning(
    "Token indices sequence length is longer than the specified maximum sequence length (734 > 512)")
sys.stdout.write("a line written "); sys.stdout.write("in pieces\n")
print("done", flush=True)
console.save(sys.argv[2])
"""


def test_known_noise_goes_to_the_log_and_everything_else_to_the_terminal(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT, REPO, str(tmp_path)], env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["world: 2 ranks", "a real DeepSpeed warning", "a line written in pieces",
                                     "done"]
    assert "a real warning" in p.stderr and "all_gather_into_tensor" not in p.stderr
    kept = (tmp_path / "logs" / "console-rank0.log").read_text()
    for text in ("No existing process group", "built successfully", "Attempting to get learning rate",
                 "all_gather_into_tensor", "Token indices sequence length"):
        assert text in kept


def test_nothing_is_kept_where_the_run_made_no_folder(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT, REPO, str(tmp_path / "never")], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_a_two_rank_run_prints_the_plan_one_bar_and_the_summary(straight_run):
    """The tests' reference run (deepspeed launcher, 2 ranks, ep_size 2): none of the known noise on the
    terminal, and the bar is not drawn again under the summary."""
    from minimoe.console import is_noise
    text = (straight_run.parent / "straight.console").read_text()
    lines = [seg for line in text.split("\n") for seg in line.split("\r")]
    assert not [line for line in lines if is_noise(line)]
    assert "FutureWarning" not in text and "Traceback" not in text
    done = next(i for i, line in enumerate(lines) if line.startswith("done:"))
    assert not [line for line in lines[done:] if re.match(r"distill:\s+\d+%", line)], lines[done - 3:]
    kept = (straight_run / "logs" / "console-rank0.log").read_text()
    assert "No existing process group found, creating a new group named: ep_size_2" in kept
    assert os.path.isfile(straight_run / "logs" / "console-rank1.log")
