"""`python -m gemmakit ...`, the same as the `gemmakit` command; it is how torchrun starts each rank:
`torchrun --nproc-per-node N -m gemmakit train ...`."""

import sys

from gemmakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
