"""`python -m orchestrator ...` is the `azt` command line."""

import sys

from orchestrator.cli import main

sys.exit(main())
