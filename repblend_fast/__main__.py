"""``python -m repblend_fast`` runs the ``repblend-fast`` command (so ``torchrun -m repblend_fast``
works too)."""

import sys

from repblend_fast.cli import main

sys.exit(main())
