"""`python -m florence2_rs.serve ...`: the `florence2-serve` command."""

import sys

from .cli import main

sys.exit(main())
