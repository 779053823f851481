"""Child processes in tests, run so that CI never flakes and a failure says why.

- `run_checked` runs a command to its end and, when it fails, raises with the child's stdout and
  stderr in the message (a bare CalledProcessError says nothing about the cause).
- No fixed timings: the one timeout is a hang guard of many minutes, never what decides a result
  on a busy machine.
- Multi-process runs use `torchrun --standalone`, whose rendezvous binds port 0 (a free port
  chosen by the system), never a fixed --master_port that another job may hold.
"""

from __future__ import annotations

import os
import subprocess
import sys

HANG_GUARD_S = 1800  # a child that takes longer is hung, not slow


def child_env(**extra: str) -> dict:
    """The environment for a child: this one, one OpenMP thread (two children share two cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_checked(args: list[str], *, input: str | None = None, env: dict | None = None,
                cwd=None) -> subprocess.CompletedProcess:
    """Run `args` to its end; on a non-zero exit, fail with everything the child printed."""
    result = subprocess.run(args, input=input, capture_output=True, text=True, env=env or child_env(),
                            cwd=cwd, timeout=HANG_GUARD_S)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited with {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-8000:]}")
    return result


def lmschool(*args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m lmschool ARGS` in a child process (checked as run_checked does)."""
    return run_checked([sys.executable, "-m", "lmschool", *map(str, args)], **kw)


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N ARGS` (a free rendezvous port every time)."""
    return run_checked([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", *map(str, args)], **kw)
