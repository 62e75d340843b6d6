"""`python -m mole.cli` (also what `accelerate launch -m mole.cli` and torchrun run)."""

import sys

from mole.cli import main

sys.exit(main())
