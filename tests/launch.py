"""Running a cachekit entry point under accelerate's launcher, as a multi-process user does."""

from __future__ import annotations

import os
import subprocess
import sys


def accelerate_launch(module: str, args: list[str], num_processes: int) -> None:
    """`accelerate launch -m module args` on `num_processes` processes; fails the test with their stderr's tail.

    On a machine without GPUs accelerate's torchrun runs gloo processes on the CPU, each given one intra-op thread
    (the one the test process has too, tests/conftest.py), so both do the same arithmetic.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
