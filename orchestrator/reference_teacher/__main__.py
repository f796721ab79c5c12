"""`python -m orchestrator.reference_teacher`: serve the reference teacher (see the package docstring)."""

import sys

from orchestrator.reference_teacher.server import main

sys.exit(main())
