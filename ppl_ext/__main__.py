"""`python -m ppl_ext ...` is the `ppl-ext` command."""

import sys

from ._cli import main

sys.exit(main())
