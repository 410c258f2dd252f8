"""`python -m dit4edit ...` runs the command line, like the `dit4edit` entry point."""

import sys

from .cli import main

sys.exit(main())
