"""`python3 -m ccpu.cli ...`: the same as the `fractal` command (tests and the guest build use it)."""

import sys

from . import main

sys.exit(main())
