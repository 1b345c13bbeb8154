"""`python -m jaxdec ...`: the `jaxdec` command line, where the console script is not on PATH."""

import sys

from jaxdec.cli import main

sys.exit(main())
