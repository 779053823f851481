"""`python -m lmschool ...` is the `lmschool` command (lmschool/cli.py); torchrun launches stages this way."""

import sys

from lmschool.cli import main

sys.exit(main())
