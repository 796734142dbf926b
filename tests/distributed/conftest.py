"""Running 2 real ranks: torch's launcher with gloo on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

# torch 2.14's gloo sometimes aborts a rank while the process exits ("terminate called
# without an active exception", SIGABRT) after the work is done: seen in about 1 of 6 full
# runs of this suite on this 2-core machine. A run that fails that way is run once more; any
# other failure is reported as it is. The product's exit code on that abort is a known issue
# (docs/scaling.md).
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(*args, timeout: int = 300, module: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *(["-m"] if module else []), *map(str, args)]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr:
            return proc
    return proc
