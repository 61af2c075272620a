"""`python -m stella_distill` (and `accelerate launch -m stella_distill`) runs the CLI."""

import sys

from stella_distill.cli import main

sys.exit(main())
