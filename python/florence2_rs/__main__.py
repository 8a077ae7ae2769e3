"""`python -m florence2_rs ...`: the `florence2` command."""

import sys

from .apps.cli import main

sys.exit(main())
