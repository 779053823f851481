"""lmschool: train a chat language model in three stages with one readable PyTorch codebase."""

import os as _os


def _openmp_waiting(env=_os.environ) -> None:
    """How idle OpenMP threads wait for the next parallel region; set before torch loads libgomp,
    and only where the environment says nothing (OMP_WAIT_POLICY or GOMP_SPINCOUNT set: theirs).

    Threads that sleep at once (PASSIVE) pay a wake-up at every parallel region: a quiet machine
    loses ~45% of its speed on small models (a 0.9M-parameter training step, 1.8x; decoding,
    1.8x). Threads that spin steal the cores from any other busy process: with one beside,
    decoding and small steps ran 2-6x slower with a short spin, 12x with libgomp's long default
    (bench/RESULTS.md). So: a short spin (GOMP_SPINCOUNT=20000, tens of microseconds, then
    sleep) when the machine is idle as lmschool starts (1-minute load average under 0.5), else
    PASSIVE. Two heavy jobs started together both see an idle machine: start the second with
    OMP_WAIT_POLICY=PASSIVE."""
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        idle = _os.getloadavg()[0] < 0.5
    except (AttributeError, OSError):   # no load average on this platform: stay passive
        idle = False
    if idle:
        env["GOMP_SPINCOUNT"] = "20000"


_openmp_waiting()

__version__ = "0.1.0"
