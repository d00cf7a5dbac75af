"""``python -m adderquant``: the command line (what ``torchrun -m adderquant`` starts)."""

import sys

from adderquant.cli import main

sys.exit(main())
