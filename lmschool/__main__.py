import sys

from lmschool.cli import main

sys.exit(main())
