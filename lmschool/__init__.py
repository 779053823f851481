"""lmschool: train a chat language model in three stages with one readable PyTorch codebase."""

import os as _os

# OpenMP threads that spin while waiting for work (libgomp's default) steal the CPU from each
# other and from any other process: on a shared 2-core machine a training step ran 12x slower
# with one other busy process (bench/RESULTS.md). Must be set before torch loads libgomp; an
# explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
