"""``python -m adderquant``: the command line (what ``torchrun -m adderquant`` starts)."""

import sys

from adderquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
